package vmm

// Pausing. Pause asks every vCPU to stop (kick), and each parks on its own
// thread: it counts itself in the pause's record, reads its own state if
// capture at parking is on, and sleeps on its bell until Resume releases
// it, serving OnVCPU commands meanwhile. See pauseRec and park_unsafe.go.

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"golang.org/x/sys/unix"
)

// procs counts the vCPU threads of every running machine: Run raises
// GOMAXPROCS by its vCPUs while they run (reserveProcs).
var procs struct {
	mu          sync.Mutex
	base, extra int
}

// reserveProcs raises GOMAXPROCS by n processors until the returned
// function is called. A vCPU thread spends its life in system calls (KVM_RUN,
// or the futex wait of its park) and keeps its processor there until the
// runtime's monitor takes it back, which can take milliseconds; meanwhile a
// woken vCPU, or the goroutine that paused the machine, would wait for a
// processor. One processor per vCPU on top of the others means a thread
// coming back from a system call always finds one idle.
func reserveProcs(n int) func() {
	procs.mu.Lock()
	defer procs.mu.Unlock()
	if procs.extra == 0 {
		procs.base = runtime.GOMAXPROCS(0)
	}
	procs.extra += n
	runtime.GOMAXPROCS(procs.base + procs.extra)
	return func() {
		procs.mu.Lock()
		defer procs.mu.Unlock()
		procs.extra -= n
		runtime.GOMAXPROCS(procs.base + procs.extra)
	}
}

// pauseRec is one pause. parked, captured and left are futex words that
// count the vCPUs that have parked, that have then read their own state
// (CaptureOnPause; at once if it is off), and that have left their park
// again; the vCPU that completes a count wakes its waiter. stoppedBit is set
// in each once the machine stops, so that no waiter sleeps through the stop.
// released is set when Resume lets the vCPUs go.
type pauseRec struct {
	n                      uint32 // the machine's vCPUs
	parked, captured, left atomic.Uint32
	released               atomic.Bool
}

// stoppedBit marks a pause record's counts once the machine has stopped.
const stoppedBit = 1 << 31

// stop marks the record for a stopped machine and wakes its waiters.
func (p *pauseRec) stop() {
	for _, w := range []*atomic.Uint32{&p.parked, &p.captured, &p.left} {
		w.Or(stoppedBit)
		futexWake(w)
	}
}

// count adds a vCPU to w and wakes the waiter once all are counted.
func (p *pauseRec) count(w *atomic.Uint32) {
	if w.Add(1) == p.n {
		futexWake(w)
	}
}

// wait waits until w counts every vCPU. It returns false if the machine
// stopped first. It sleeps in a futex wait rather than on a channel: the
// vCPU that completes the count wakes this thread directly, with no
// goroutine hand-off in between.
func (p *pauseRec) wait(w *atomic.Uint32) bool {
	for {
		c := w.Load()
		if c&stoppedBit != 0 {
			return false
		}
		if c >= p.n {
			return true
		}
		futexWait(w, c)
	}
}

// waitCaptured waits until every parked vCPU has read its own state (see
// CaptureOnPause): its saved state may be used, or changed, from then on.
// The caller holds pauseMu and the machine is paused.
func (m *Machine) waitCaptured() error {
	if p := m.cur.Load(); !p.wait(&p.captured) {
		return ErrStopped
	}
	return nil
}

// ring wakes the vCPU if it is parked, to look at its command, its pause
// and the machine again.
func (v *vcpu) ring() {
	v.bell.Add(1)
	futexWake(&v.bell)
}

// kick forces vCPU v out of KVM_RUN: immediate_exit covers the window before
// it enters the kernel, the signal the time inside it.
func (m *Machine) kick(v *vcpu) {
	v.cpu.SetImmediateExit(true)
	if tid := v.tid.Load(); tid != 0 {
		// SIGURG is the Go runtime's preemption signal: harmless to Go code,
		// and enough to make KVM_RUN return EINTR.
		_ = unix.Tgkill(unix.Getpid(), int(tid), unix.SIGURG)
	}
}

// Pause stops every vCPU outside the guest and returns how long it took
// from the request until the last vCPU parked. A paused vCPU has completed
// the instruction of its last exit, so its state is consistent.
func (m *Machine) Pause() (time.Duration, error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	return m.pauseLocked()
}

// pauseLocked is Pause for a caller that holds pauseMu.
func (m *Machine) pauseLocked() (time.Duration, error) {
	if m.stopping.Load() {
		return 0, ErrStopped
	}
	if m.paused {
		return 0, ErrPaused
	}
	start := time.Now()
	p := m.beginPause()
	if !p.wait(&p.parked) {
		m.endPause()
		return 0, ErrStopped
	}
	m.paused = true
	m.quiesceVirtio()
	return time.Since(start), nil
}

// quiesceVirtio quiesces every virtio transport of a paused machine (see
// virtio.Transport.Quiesce): block requests the guest made available
// complete now, writing guest memory through the VMM's dirty bitmap, so
// that whoever paused the machine harvests the dirty pages after them, and
// no device writes guest memory until Resume. The caller holds pauseMu.
// Its only errors are host failures to raise the interrupt of a completed
// request: they are logged, not returned, since the pause itself holds (and
// a restore raises the interrupt again from the transport's interrupt
// status, which the state keeps).
func (m *Machine) quiesceVirtio() {
	if m.linux == nil {
		return
	}
	for _, s := range m.linux.virtio {
		if s.t == nil {
			continue
		}
		if err := s.t.Quiesce(); err != nil && m.log != nil {
			m.log.Warn("virtio quiesce", "device", s.name, "err", err)
		}
	}
}

// resumeVirtio ends the transports' quiescence and kicks every queue
// (virtio.Transport.Resume). Its errors are the guest's (a malformed ring):
// they are logged and the machine keeps running.
func (m *Machine) resumeVirtio() {
	if m.linux == nil {
		return
	}
	for _, s := range m.linux.virtio {
		if s.t == nil {
			continue
		}
		if err := s.t.Resume(); err != nil && m.log != nil {
			m.log.Warn("virtio resume", "device", s.name, "err", err)
		}
	}
}

// PauseWait is Pause for a controller that shares the machine with others
// (checkpoints and large-page sampling both pause it, each for moments):
// while another one has the machine paused (ErrPaused) it waits for that
// pause to end, up to timeout, rather than fail.
func (m *Machine) PauseWait(timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	for {
		d, err := m.Pause()
		if !errors.Is(err, ErrPaused) || time.Since(start) > timeout {
			return d, err
		}
		time.Sleep(20 * time.Microsecond)
	}
}

// RequestPause starts a pause without waiting for it: every vCPU stops
// before it next enters the guest. It never blocks, so an OnRecord or OnMark
// callback may call it to stop the guest right after that output, on the
// vCPU's own thread. The machine counts as paused only once Pause (which
// then just waits for the vCPUs to park) has returned; until then OnVCPU,
// CaptureState and Resume refuse it. Calling it while a pause is under way
// or the machine is paused or stopped does nothing.
func (m *Machine) RequestPause() {
	if m.stopping.Load() {
		return
	}
	m.beginPause()
}

// beginPause starts a pause unless one is under way, and returns its
// record.
func (m *Machine) beginPause() *pauseRec {
	m.reqMu.Lock()
	defer m.reqMu.Unlock()
	if !m.pending {
		m.pending = true
		p := &pauseRec{n: uint32(len(m.vcpus))}
		if m.stopping.Load() {
			p.stop() // end has run: nothing would mark this record
		}
		m.cur.Store(p)
		m.pausing.Store(true)
		for _, v := range m.vcpus {
			m.kick(v)
		}
	}
	return m.cur.Load()
}

// endPause releases the parked vCPUs and returns the pause's record, whose
// left word counts them as they go.
func (m *Machine) endPause() *pauseRec {
	m.reqMu.Lock()
	p := m.cur.Load()
	m.pending = false
	m.pausing.Store(false)
	p.released.Store(true)
	m.reqMu.Unlock()
	for _, v := range m.vcpus {
		v.ring()
	}
	return p
}

// Resume lets paused vCPUs run again and returns how long it took until the
// last one left its parked state.
func (m *Machine) Resume() (time.Duration, error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	return m.resumeLocked()
}

// resumeLocked is Resume for a caller that holds pauseMu.
func (m *Machine) resumeLocked() (time.Duration, error) {
	if m.stopping.Load() {
		return 0, ErrStopped
	}
	if !m.paused {
		return 0, ErrNotPaused
	}
	start := time.Now()
	m.paused = false
	m.resumeVirtio()
	p := m.endPause()
	if !p.wait(&p.left) {
		return 0, ErrStopped
	}
	return time.Since(start), nil
}

// OnVCPU runs fn on paused vCPU i's own OS thread (once Run has returned,
// on the caller's) and returns its error.
func (m *Machine) OnVCPU(i int, fn func(*arch.VCPU) error) error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	return m.onVCPU(i, fn)
}

// onVCPU is OnVCPU for a caller that holds pauseMu.
func (m *Machine) onVCPU(i int, fn func(*arch.VCPU) error) error {
	if i < 0 || i >= len(m.vcpus) {
		return fmt.Errorf("vCPU %d: machine has %d", i, len(m.vcpus))
	}
	if m.halted.Load() {
		// Run is over: no thread runs this vCPU any more.
		m.vcpus[i].parkedOK = false
		return fn(m.vcpus[i].cpu)
	}
	if !m.paused {
		return ErrNotPaused
	}
	v := m.vcpus[i]
	if err := m.waitCaptured(); err != nil {
		return err
	}
	// fn may change the vCPU's state: what it read as it parked is stale.
	v.parkedOK = false
	done := make(chan error, 1)
	v.cmdMu.Lock()
	v.cmd = func() { done <- fn(v.cpu) }
	v.cmdMu.Unlock()
	v.ring()
	select {
	case err := <-done:
		return err
	case <-m.stopCh:
		// The vCPU may have left for good without taking the command; if
		// it took it, the command runs to its end.
		v.cmdMu.Lock()
		taken := v.cmd == nil
		v.cmd = nil
		v.cmdMu.Unlock()
		if taken {
			return <-done
		}
		return ErrStopped
	}
}

// onEveryVCPU runs fn(i, vCPU i) on every paused vCPU's own thread, all at
// once, and returns the first error. The caller holds pauseMu.
func (m *Machine) onEveryVCPU(fn func(i int, c *arch.VCPU) error) error {
	errs := make([]error, len(m.vcpus))
	var wg sync.WaitGroup
	for i := range m.vcpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.onVCPU(i, func(c *arch.VCPU) error { return fn(i, c) })
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
	}
	return nil
}

// park holds vCPU v until Resume or Stop, serving OnVCPU requests. It
// sleeps on the vCPU's bell (a futex word), not on a Go channel: see
// park_unsafe.go.
func (m *Machine) park(v *vcpu) {
	// Clear immediate_exit before counting: once Pause returns, a later
	// Pause may set it again and must not have it cleared under it.
	v.cpu.SetImmediateExit(false)
	p := m.cur.Load()
	// The vCPU has stopped: Pause may return while it reads its state, and
	// the caller copy guest memory meanwhile.
	p.count(&p.parked)
	m.captureParked(v)
	p.count(&p.captured)
	for {
		bell := v.bell.Load()
		v.cmdMu.Lock()
		fn := v.cmd
		v.cmd = nil
		v.cmdMu.Unlock()
		switch {
		case fn != nil:
			fn()
			continue
		case p.released.Load():
			v.parkedOK = false
			p.count(&p.left)
			return
		case m.stopping.Load():
			return
		}
		futexWait(&v.bell, bell)
	}
}
