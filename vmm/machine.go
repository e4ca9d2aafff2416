package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/payload"
	"golang.org/x/sys/unix"
)

// Config describes a machine: what every machine has (memory, vCPUs, the
// console, ...) and its guest, which is either a payload (Payload) or a
// Linux kernel (Linux), never both.
type Config struct {
	// KVMDevice is the KVM device node; empty means /dev/kvm.
	KVMDevice string
	// MemSize is guest RAM in bytes, a multiple of 2 MiB.
	MemSize uint64
	// CPUs is the number of vCPUs.
	CPUs int
	// Backing selects anonymous or memfd guest RAM.
	Backing mmu.Backing
	// Console receives the guest's console bytes (nil: discarded).
	Console io.Writer
	// Logger receives device diagnostics (nil: slog.Default()).
	Logger *slog.Logger
	// Affinity, if set, pins vCPU i's thread to host CPU Affinity[i].
	Affinity []int

	// Payload, if set, makes the guest a payload (boot_payload.go).
	Payload *PayloadConfig
	// Linux, if set, makes the guest a Linux kernel (boot_linux.go).
	Linux *LinuxConfig
}

// PayloadConfig is a payload guest: a small long-mode program from package
// vmm/payload (or a flat binary) that talks to the VMM through the debug
// port (vmm/devices).
type PayloadConfig struct {
	// Name is a built-in payload name or a path to a flat binary.
	Name string
	// Options are the payload's options (name → value).
	Options map[string]string
	// OnRecord, if set, is called on the emitting vCPU's thread for every
	// output record. It must not block for long.
	OnRecord func(Record)
	// OnMark, if set, is called for every phase marker.
	OnMark func(cpu int, phase uint32)
	// Guest4K lists guest-physical 2 MiB regions the payload's page tables
	// map with 4 KiB pages instead of one 2 MiB page.
	Guest4K []uint64
}

// LinuxConfig is a Linux guest: a bzImage booted through the 64-bit boot
// protocol (2.12 or later). A Linux machine has a serial port (COM1), a
// keyboard controller that can reset it, ACPI power-off, and the virtio
// devices of Disks and Nets.
type LinuxConfig struct {
	// Kernel is the path of the bzImage.
	Kernel string
	// Initrd is the path of the initial RAM disk (optional).
	Initrd string
	// Cmdline is the kernel command line; empty means DefaultCmdline. A
	// virtio_mmio.device= entry for each virtio device is appended.
	Cmdline string
	// ConsoleIn, if set, is the guest's serial input: its bytes arrive on
	// COM1 (nil: the guest receives nothing).
	ConsoleIn io.Reader
	// Disks are the guest's virtio-blk disks.
	Disks []DiskConfig
	// Nets are the guest's virtio-net interfaces.
	Nets []NetConfig
}

// DiskConfig is a virtio-blk disk backed by a file.
type DiskConfig struct {
	Path     string // the disk image (a regular file or block device)
	ReadOnly bool   // the guest sees a read-only disk; the file is opened read-only
}

// NetConfig is a virtio-net interface backed by an existing tap device.
type NetConfig struct {
	Tap string           // name of the tap device, which must exist
	MAC net.HardwareAddr // the guest's MAC address (nil: DefaultMAC of its index)
}

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

// checkGuest checks that cfg describes one guest, a payload or a Linux
// kernel, with only the settings that apply to it.
func checkGuest(cfg *Config) error {
	p, l := cfg.Payload, cfg.Linux
	switch {
	case l != nil && l.Kernel == "":
		return errors.New("an initrd, command line, serial input, disks and network interfaces are for Linux guests: no kernel given")
	case p != nil && l != nil && p.Name == "":
		return errors.New("payload options, callbacks and 4 KiB guest regions are for payload guests, not Linux guests")
	case p != nil && l != nil:
		return fmt.Errorf("both a payload (%s) and a Linux kernel (%s) given: a machine runs one guest", p.Name, l.Kernel)
	case l == nil && (p == nil || p.Name == ""):
		return fmt.Errorf("no payload given and no Linux kernel: a machine needs one (built-in payloads: %s)", strings.Join(payload.Names(), ", "))
	}
	return nil
}

// checkConfig validates the parts of cfg every machine needs, before KVM is
// touched, and fills defaults.
func checkConfig(cfg *Config) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return fmt.Errorf("%d vCPUs: want 1..%d", cfg.CPUs, MaxCPUs)
	}
	if cfg.MemSize < MinMemSize {
		return fmt.Errorf("guest memory %s is too small: payload guests need at least %s", option.FormatSize(cfg.MemSize), option.FormatSize(MinMemSize))
	}
	if cfg.MemSize%mmu.RegionSize != 0 {
		return fmt.Errorf("guest memory %s: must be a multiple of 2 MiB", option.FormatSize(cfg.MemSize))
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	for _, c := range cfg.Affinity {
		if c < 0 || c >= runtime.NumCPU() {
			return fmt.Errorf("vCPU affinity: host CPU %d does not exist (this host has %d)", c, runtime.NumCPU())
		}
	}
	return nil
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
	return time.Since(start), nil
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
