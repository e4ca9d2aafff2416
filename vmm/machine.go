package vmm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"golang.org/x/sys/unix"
)

// Record is one output record a guest emitted.
type Record struct {
	CPU   int
	Value uint64
}

// Result says how a machine ended.
type Result struct {
	// End says how the guest ended (EndNone if Run returned an error).
	End End
	// ExitCode is the code the guest gave to the exit port (EndExitPort).
	ExitCode int
	// Detail says, in words, what ended the guest ("ACPI S5 power-off",
	// "keyboard controller reset", the exception of a triple fault).
	Detail string
	// Records is the number of output records emitted.
	Records uint64
}

// End is how a guest ended.
type End int

// The ways a guest ends.
const (
	// EndNone: the guest did not end by itself (Run failed or was stopped
	// by its context).
	EndNone End = iota
	// EndExitPort: a payload wrote its exit code (or Stop was called).
	EndExitPort
	// EndPowerOff: the guest powered off (ACPI S5, or a KVM shutdown event).
	EndPowerOff
	// EndReboot: the guest asked for a reset (keyboard controller, ACPI
	// reset register, or a KVM reset event). Understudy does not restart it.
	EndReboot
	// EndTripleFault: a Linux guest's vCPU triple-faulted, which resets a
	// PC: a reboot by triple fault (reboot=t) or a crash.
	EndTripleFault
	// EndHalt: every vCPU of a Linux guest stopped for good: halted with
	// interrupts disabled (or, for an application processor, still waiting
	// for a start-up IPI), as Linux leaves them after `halt`
	// (reboot(LINUX_REBOOT_CMD_HALT)). Nothing can wake such a guest.
	EndHalt
)

// String says how the guest ended, in words.
func (e End) String() string {
	switch e {
	case EndNone:
		return "did not end"
	case EndExitPort:
		return "exited"
	case EndPowerOff:
		return "powered off"
	case EndReboot:
		return "rebooted"
	case EndTripleFault:
		return "reset by a triple fault"
	case EndHalt:
		return "halted"
	}
	return fmt.Sprintf("end %d", int(e))
}

// Limits.
const (
	// MinMemSize is the smallest guest RAM a payload machine accepts.
	MinMemSize = 2 << 20
	// MaxCPUs is the largest vCPU count (bounded by the payload stack area).
	MaxCPUs = payloadMaxCPUs
)

// Machine is a VM with its memory, vCPUs and devices.
type Machine struct {
	cfg     Config
	sys     *arch.System
	vm      *arch.VM
	mem     *mmu.Memory
	vcpus   []*vcpu
	io      ioBus
	mmio    mmioBus
	debug   *devices.DebugPort
	payload *loadedPayload
	linux   *linuxGuest // nil for payload machines
	log     *slog.Logger

	// pauseMu serializes Pause, Resume, OnVCPU and CaptureState and guards
	// paused.
	pauseMu sync.Mutex
	paused  bool
	// msrs is the list of MSRs CaptureState saves, probed on first use
	// (under pauseMu) and read by parking vCPUs.
	msrs atomic.Pointer[msrList]
	// captureOnPause makes every vCPU read its own state as it parks
	// (CaptureOnPause).
	captureOnPause atomic.Bool

	// reqMu guards pending and the making of pause records. It is held
	// only briefly, never while waiting for vCPUs, so RequestPause may take
	// it on a vCPU thread. The pause protocol: beginPause publishes a new
	// pause record (cur), then sets pausing and kicks every vCPU; each
	// parks, counting itself in the record's parked word, and sleeps on its
	// bell until the record is released (Resume) or the machine stops,
	// counting itself in left as it goes.
	reqMu   sync.Mutex
	pending bool // a pause has begun and Resume has not ended it
	pausing atomic.Bool
	cur     atomic.Pointer[pauseRec]

	// faultHandler, if set, is offered guest accesses KVM could not fault
	// in (EFAULT from KVM_RUN, KVM_EXIT_MEMORY_FAULT).
	faultHandler atomic.Pointer[FaultHandler]

	stopping atomic.Bool
	stopCh   chan struct{}
	stopOnce sync.Once
	// resMu guards result and runErr.
	resMu  sync.Mutex
	result Result
	runErr error
	ran    atomic.Bool
	// halted is set once Run has returned: no vCPU is in KVM_RUN any more,
	// so vCPU state may be read from any thread.
	halted atomic.Bool
	// vcpuWG counts running vCPU goroutines; Close waits for them.
	vcpuWG sync.WaitGroup
	// haltEvery is how often a Linux machine checks whether its guest has
	// halted for good (see watchHalt); 0 turns the check off.
	haltEvery time.Duration
}

// FaultHandler is offered, on a vCPU thread, a guest access that KVM could
// not fault in, with the guest-physical addresses the faulting instruction
// may have touched (empty if unknown). It returns true if it resolved the
// fault and the vCPU should retry, false if the fault is real.
type FaultHandler func(gpas []uint64) bool

// SetFaultHandler installs (or, with nil, removes) the fault handler.
func (m *Machine) SetFaultHandler(h FaultHandler) {
	if h == nil {
		m.faultHandler.Store(nil)
		return
	}
	m.faultHandler.Store(&h)
}

// maxFaultRetries bounds consecutive retried faults on one vCPU without a
// normal exit in between, so a fault that retrying cannot fix stops the
// machine instead of spinning.
const maxFaultRetries = 1000

type vcpu struct {
	id     int
	faults int // consecutive retried faults (touched only by this vCPU's goroutine)
	// exitPending is set while the last KVM_RUN returned an exit that KVM
	// completes only on the next KVM_RUN (touched only by this vCPU's goroutine).
	exitPending bool
	cpu         *arch.VCPU
	tid         atomic.Int32
	started     chan struct{}
	exits       atomic.Uint64

	// bell is the futex word a parked vCPU sleeps on (park_unsafe.go); it
	// is rung when a command arrives, when its pause is released and when
	// the machine stops. cmdMu guards cmd, the OnVCPU function waiting to
	// run on the parked vCPU's thread.
	bell  atomic.Uint32
	cmdMu sync.Mutex
	cmd   func()

	// The vCPU's saved state. These fields are touched only by the thread
	// that runs the vCPU (its own; once Run is over, the caller's) and, under
	// pauseMu, while it is parked.
	//
	// static holds what cannot change once the vCPU has run (read once).
	static *vcpuStatic
	// parked is the state the vCPU read as it parked (CaptureOnPause);
	// parkedOK says it is current: set when parking, cleared when the vCPU
	// leaves its park or OnVCPU runs a function on it.
	parked   VCPUState
	parkedOK bool
}

// New validates cfg and builds the machine: KVM VM, in-kernel irqchip and
// PIT, guest memory, vCPUs, devices, and the payload or Linux kernel loaded
// and ready to run.
func New(cfg Config) (*Machine, error) {
	if err := checkGuest(&cfg); err != nil {
		return nil, err
	}
	if err := checkConfig(&cfg); err != nil {
		return nil, err
	}
	if cfg.Linux != nil {
		return newLinux(cfg)
	}
	pl, err := resolvePayload(cfg)
	if err != nil {
		return nil, err
	}
	m, err := build(cfg, nil, false)
	if err != nil {
		return nil, err
	}
	m.payload = pl
	if err := m.setDefaultCPUID(); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.loadPayload(pl); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// build creates what New and Restore share: the KVM VM with its TSS region,
// in-kernel irqchip and PIT, guest memory registered in memory slots, the
// vCPUs (without CPUID, which the caller sets first) and the debug port
// device (on the port bus unless linux is set: Linux machines add their own
// devices). The guest is not loaded. If mem is nil, build allocates
// cfg.MemSize of RAM; otherwise the machine takes mem over (and closes it,
// even on error).
func build(cfg Config, mem *mmu.Memory, linux bool) (*Machine, error) {
	m := &Machine{cfg: cfg, mem: mem, stopCh: make(chan struct{}), log: cfg.Logger, haltEvery: haltCheckInterval}
	if m.log == nil {
		m.log = slog.Default()
	}
	ok := false
	defer func() {
		if !ok {
			m.Close()
		}
	}()
	var err error
	if m.sys, err = arch.Open(cfg.KVMDevice); err != nil {
		return nil, err
	}
	if max := m.sys.MaxVCPUs(); cfg.CPUs > max {
		return nil, fmt.Errorf("%d vCPUs: KVM allows at most %d", cfg.CPUs, max)
	}
	if m.vm, err = m.sys.CreateVM(); err != nil {
		return nil, err
	}
	if err := m.vm.SetTSSAddr(tssAddrKVM); err != nil {
		return nil, err
	}
	if err := m.vm.CreateIRQChip(); err != nil {
		return nil, err
	}
	if err := m.vm.CreatePIT2(arch.PITSpeakerDummy); err != nil {
		return nil, err
	}
	if m.mem == nil {
		if m.mem, err = mmu.New(mmu.Config{Size: cfg.MemSize, Backing: cfg.Backing}); err != nil {
			return nil, err
		}
	}
	if err := m.mem.Register(m.vm, 0); err != nil {
		return nil, err
	}
	for i := 0; i < cfg.CPUs; i++ {
		c, err := m.vm.CreateVCPU(i)
		if err != nil {
			return nil, fmt.Errorf("create vCPU %d: %w", i, err)
		}
		m.vcpus = append(m.vcpus, &vcpu{id: i, cpu: c, started: make(chan struct{})})
	}
	var onRecord func(cpu int, value uint64)
	var onMark func(cpu int, phase uint32)
	if p := cfg.Payload; p != nil {
		if p.OnRecord != nil {
			onRecord = func(cpu int, value uint64) { p.OnRecord(Record{CPU: cpu, Value: value}) }
		}
		onMark = p.OnMark
	}
	m.debug = devices.NewDebugPort(cfg.CPUs, cfg.Console, onRecord, onMark, m.guestExit)
	if !linux {
		if err := m.io.add(m.debug); err != nil {
			return nil, err
		}
	}
	ok = true
	return m, nil
}

// setDefaultCPUID gives every vCPU the host's supported CPUID, with its own
// APIC id and topology.
func (m *Machine) setDefaultCPUID() error {
	supported, err := m.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	for _, v := range m.vcpus {
		if err := v.cpu.SetCPUID(arch.CPUIDForVCPU(supported, v.id, len(m.vcpus))); err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
	}
	return nil
}

// Memory returns guest RAM.
func (m *Machine) Memory() *mmu.Memory { return m.mem }

// VM returns the KVM VM.
func (m *Machine) VM() *arch.VM { return m.vm }

// NumCPUs returns the number of vCPUs.
func (m *Machine) NumCPUs() int { return len(m.vcpus) }

// Exits returns the number of KVM exits vCPU i has handled.
func (m *Machine) Exits(i int) uint64 { return m.vcpus[i].exits.Load() }

// ErrClosed is the Run error of a machine closed while it ran.
var ErrClosed = errors.New("machine closed")

// Close stops the machine if it is running, waits for its vCPUs to leave
// the guest, and releases the VM, vCPUs and memory.
func (m *Machine) Close() error {
	m.finish(0, ErrClosed)
	m.vcpuWG.Wait()
	var errs []error
	// Devices first: their goroutines raise interrupts through the VM and
	// write guest memory.
	if m.linux != nil {
		errs = append(errs, m.linux.close())
	}
	for _, v := range m.vcpus {
		errs = append(errs, v.cpu.Close())
	}
	m.vcpus = nil
	if m.vm != nil {
		errs = append(errs, m.vm.Close())
		m.vm = nil
	}
	if m.mem != nil {
		errs = append(errs, m.mem.Close())
		m.mem = nil
	}
	if m.sys != nil {
		errs = append(errs, m.sys.Close())
		m.sys = nil
	}
	return errors.Join(errs...)
}

// Run runs every vCPU until the guest ends (Result.End says how: exit port,
// power-off, reboot, triple fault, halt), a vCPU fails, or ctx ends (which
// returns ctx's error). It may be called once.
func (m *Machine) Run(ctx context.Context) (Result, error) {
	if !m.ran.CompareAndSwap(false, true) {
		return Result{}, errors.New("machine already ran")
	}
	watchDone := make(chan struct{})
	if m.linux != nil && m.haltEvery > 0 {
		// Before the vCPUs run: KVM_GET_STATS_FD waits for KVM_RUN to end.
		go m.watchHalt(m.haltEvery, m.blockingStats(), watchDone)
	} else {
		close(watchDone)
	}
	defer reserveProcs(len(m.vcpus))()
	for _, v := range m.vcpus {
		m.vcpuWG.Add(1)
		go func(v *vcpu) {
			defer m.vcpuWG.Done()
			if err := m.runVCPU(v); err != nil {
				m.finish(0, err)
			}
		}(v)
	}
	for _, v := range m.vcpus {
		<-v.started
	}
	if m.linux != nil {
		m.linux.uart.Start(m.linux.consoleIn)
	}
	select {
	case <-ctx.Done():
		m.finish(0, ctx.Err())
	case <-m.stopCh:
	}
	<-watchDone
	m.vcpuWG.Wait()
	m.halted.Store(true)
	if m.linux != nil {
		// No vCPU reads the serial port any more: stop feeding it.
		m.linux.uart.Stop()
	}
	m.resMu.Lock()
	defer m.resMu.Unlock()
	m.result.Records = m.debug.Records()
	return m.result, m.runErr
}

// Stop ends Run as if the guest had exited with code.
func (m *Machine) Stop(code int) { m.finish(code, nil) }

// guestExit is the exit port's callback.
func (m *Machine) guestExit(code int) { m.finish(code, nil) }

// finish records the first outcome, an exit code (err == nil) or an error,
// and stops every vCPU.
func (m *Machine) finish(code int, err error) {
	end := EndExitPort
	if err != nil {
		end = EndNone
	}
	m.end(Result{End: end, ExitCode: code}, err)
}

// guestEnded ends the run because the guest ended as end says.
func (m *Machine) guestEnded(end End, detail string) {
	m.end(Result{End: end, Detail: detail}, nil)
}

// end records the first outcome and stops every vCPU.
func (m *Machine) end(res Result, err error) {
	m.stopOnce.Do(func() {
		m.resMu.Lock()
		m.result.End, m.result.ExitCode, m.result.Detail = res.End, res.ExitCode, res.Detail
		m.runErr = err
		m.resMu.Unlock()
		m.stopping.Store(true)
		close(m.stopCh)
		m.reqMu.Lock()
		if p := m.cur.Load(); p != nil {
			p.stop()
		}
		m.reqMu.Unlock()
		for _, v := range m.vcpus {
			m.kick(v)
			v.ring()
		}
	})
}

// runVCPU is one vCPU's goroutine.
func (m *Machine) runVCPU(v *vcpu) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if v.id < len(m.cfg.Affinity) {
		var set unix.CPUSet
		set.Set(m.cfg.Affinity[v.id])
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			close(v.started)
			return fmt.Errorf("vCPU %d: pin to host CPU %d: %w", v.id, m.cfg.Affinity[v.id], err)
		}
	}
	v.tid.Store(int32(unix.Gettid()))
	close(v.started)
	for {
		if m.stopping.Load() {
			return nil
		}
		if m.pausing.Load() {
			if !v.exitPending {
				m.park(v)
				continue
			}
			// KVM finishes the instruction of an I/O (or MMIO) exit only
			// on the next KVM_RUN. With immediate_exit set, that KVM_RUN
			// completes it and returns EINTR without running guest code,
			// so the parked vCPU's state is past the instruction and a
			// snapshot of it does not repeat the I/O.
			v.cpu.SetImmediateExit(true)
		}
		err := v.cpu.Run()
		v.exitPending = err == nil
		// EAGAIN: a vCPU that waited for INIT/SIPI (an application
		// processor) has just been started and must enter again.
		if arch.IsInterrupted(err) || errors.Is(err, unix.EAGAIN) {
			// A kick's immediate_exit has done its work: clear it, or every
			// later KVM_RUN returns at once and the guest never runs again.
			// park clears it too, but a pause's kick can land after this
			// vCPU parked (it saw pausing before its kick came); Resume then
			// lets it go with the flag set. The loop's check of pausing comes
			// after the clear (a fenced store), so a kick that follows finds
			// either this vCPU parking or the flag it sets intact.
			v.cpu.SetImmediateExit(false)
			continue
		}
		if errors.Is(err, unix.EFAULT) && m.offerFault(v, nil) {
			continue
		}
		if err != nil {
			return m.exitError(v, "KVM_RUN failed", err.Error())
		}
		v.faults = 0
		v.exits.Add(1)
		if err := m.handleExit(v); err != nil {
			return err
		}
	}
}
