package vmm

import (
	"fmt"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

// Halt detection. Linux's `halt` (reboot(LINUX_REBOOT_CMD_HALT)) ends in
// stop_this_cpu on every CPU: interrupts disabled, HLT forever. With the
// in-kernel irqchip KVM handles HLT itself, so no exit tells the VMM, and
// the run would never end. A Linux machine therefore checks, every
// haltCheckInterval, whether every vCPU has stopped for good:
//
//   - halted (KVM_MP_STATE_HALTED) with RFLAGS.IF clear and no NMI, SMI or
//     exception pending: only an NMI, INIT or SMI could wake it, and only
//     another vCPU could send one; or
//   - an application processor still waiting for INIT/SIPI
//     (KVM_MP_STATE_UNINITIALIZED or INIT_RECEIVED), which only another
//     vCPU can start;
//
// and at least one vCPU is halted. It ends the run with EndHalt once two
// checks in a row find that. A guest idling normally halts with interrupts
// enabled and is never taken for a halted one.
//
// Reading mp_state and registers needs the vCPUs out of KVM_RUN, so a
// check pauses the machine for a moment. To avoid pausing a busy guest, it
// first reads each vCPU's "blocking" statistic (KVM's binary stats, Linux
// 5.16 and later): unless every vCPU is blocked in KVM, the guest is not
// halted and the check ends there. A check holds pauseMu throughout, so a
// concurrent Pause waits for it rather than failing, and it skips the check
// while someone else has the machine paused or a pause is under way.

const (
	// haltCheckInterval is how often a Linux machine checks for a halt.
	haltCheckInterval = 500 * time.Millisecond
	// haltChecks is how many checks in a row must find the guest halted.
	haltChecks = 2
)

// vcpuStop is what a halt check saw of one paused vCPU.
type vcpuStop struct {
	state  uint32 // arch.MPState*
	rflags uint64
	rip    uint64
	// pending is set when an NMI, SMI or exception is pending or being
	// injected: the vCPU will run again.
	pending bool
}

// stoppedForGood says whether the vCPU can only run again if another vCPU
// wakes it, and whether it is halted.
func (s vcpuStop) stoppedForGood() (stopped, halted bool) {
	if s.pending {
		return false, false
	}
	switch s.state {
	case arch.MPStateHalted:
		return s.rflags&arch.RFLAGSIF == 0, true
	case arch.MPStateUninitialized, arch.MPStateInitReceived:
		return true, false
	}
	return false, false
}

// guestHalted says whether every vCPU has stopped for good with at least
// one halted, and if so describes it.
func guestHalted(vs []vcpuStop) (bool, string) {
	var halted []int
	waiting := 0
	for i, s := range vs {
		stopped, h := s.stoppedForGood()
		if !stopped {
			return false, ""
		}
		if h {
			halted = append(halted, i)
		} else {
			waiting++
		}
	}
	if len(halted) == 0 {
		return false, ""
	}
	var b strings.Builder
	if len(vs) == 1 {
		b.WriteString("the vCPU halted with interrupts disabled")
	} else {
		fmt.Fprintf(&b, "%d of %d vCPUs halted with interrupts disabled", len(halted), len(vs))
		if waiting > 0 {
			fmt.Fprintf(&b, ", %d never started", waiting)
		}
	}
	first := vs[halted[0]]
	fmt.Fprintf(&b, " (vCPU %d at RIP %#x)", halted[0], first.rip)
	return true, b.String()
}

// watchHalt checks for a halted guest every interval until the machine
// stops, and ends the run with EndHalt when haltChecks checks in a row
// find one. stats are the vCPUs' blockingStats, which it closes; it closes
// done when it returns.
func (m *Machine) watchHalt(interval time.Duration, stats []*arch.Stats, done chan<- struct{}) {
	defer close(done)
	defer func() {
		for _, s := range stats {
			if s != nil {
				s.Close()
			}
		}
	}()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	streak := 0
	for {
		select {
		case <-m.stopCh:
			return
		case <-tick.C:
		}
		if !allBlocking(stats) {
			streak = 0
			continue
		}
		halted, detail := m.checkHalted()
		if !halted {
			streak = 0
			continue
		}
		if streak++; streak >= haltChecks {
			m.guestEnded(EndHalt, detail)
			return
		}
	}
}

// blockingStats opens each vCPU's KVM statistics for its "blocking" flag.
// An entry is nil where KVM has none (older kernels); the checks then pause
// the machine every time. It must run while no vCPU is in KVM_RUN (KVM
// serializes vCPU ioctls with it).
func (m *Machine) blockingStats() []*arch.Stats {
	out := make([]*arch.Stats, len(m.vcpus))
	for i, v := range m.vcpus {
		s, err := v.cpu.StatsFD()
		if err != nil {
			continue
		}
		if !s.Has("blocking") {
			s.Close()
			continue
		}
		out[i] = s
	}
	return out
}

// allBlocking reports whether every vCPU may be blocked in KVM: false as
// soon as one vCPU's statistics say it is not.
func allBlocking(stats []*arch.Stats) bool {
	for _, s := range stats {
		if s == nil {
			continue
		}
		if b, err := s.Value("blocking"); err == nil && b == 0 {
			return false
		}
	}
	return true
}

// checkHalted pauses the machine, reads every vCPU's state, resumes it and
// says whether the guest is halted (see guestHalted). It reports false
// when the machine is stopping, or paused by someone else, or a pause is
// under way.
func (m *Machine) checkHalted() (bool, string) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	m.reqMu.Lock()
	busy := m.pending
	m.reqMu.Unlock()
	if busy || m.paused || m.stopping.Load() {
		return false, ""
	}
	if _, err := m.pauseLocked(); err != nil {
		return false, ""
	}
	vs := make([]vcpuStop, len(m.vcpus))
	err := m.onEveryVCPU(func(i int, c *arch.VCPU) error {
		mp, err := c.MPState()
		if err != nil {
			return err
		}
		regs, err := c.Regs()
		if err != nil {
			return err
		}
		ev, err := c.Events()
		if err != nil {
			return err
		}
		vs[i] = vcpuStop{
			state: mp.State, rflags: regs.RFLAGS, rip: regs.RIP,
			pending: ev.NMI.Pending != 0 || ev.NMI.Injected != 0 || ev.SMI.Pending != 0 ||
				ev.Exception.Pending != 0 || ev.Exception.Injected != 0 || ev.Interrupt.Injected != 0,
		}
		return nil
	})
	// Resume even a halted guest: a later check must find it the same way.
	// Resume fails only if the machine stopped meanwhile.
	if _, rerr := m.resumeLocked(); rerr != nil || err != nil {
		return false, ""
	}
	return guestHalted(vs)
}
