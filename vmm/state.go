package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// MachineState is everything about a paused machine except its memory: the
// configuration needed to rebuild it, every vCPU's registers and in-kernel
// state, the VM's interrupt controllers, PIT and kvmclock, and the state of
// every device. CaptureState takes it, Restore puts it into a new machine,
// and MarshalBinary/UnmarshalBinary encode it (state_encoding.go).
// Fault tolerance streams memory separately; WriteSnapshot writes both.
type MachineState struct {
	Config  StateConfig
	VCPUs   []VCPUState // one per vCPU, in id order
	VM      VMState
	Devices DeviceStates
}

// StateConfig is the machine configuration a restore rebuilds.
type StateConfig struct {
	MemSize uint64       // guest RAM in bytes
	CPUs    int          // number of vCPUs
	Regions []mmu.Region // guest-physical layout of RAM (what mmu.New makes for MemSize)
	// Payload names the payload the machine booted (informational).
	Payload string
	// DataBase and DataSize are the payload's data area (large-page
	// candidates of the restored machine).
	DataBase, DataSize uint64
}

// VCPUState is one vCPU's state, each field as the corresponding KVM_GET_*
// ioctl returns it, except FPU, which is taken from the XSAVE area's legacy
// region (see fpuFromXSave).
type VCPUState struct {
	Regs      arch.Regs
	Sregs     arch.Sregs // includes EFER, APIC base and the FS/GS bases
	FPU       arch.FPU
	XSave     []byte // the whole XSAVE area (KVM_GET_XSAVE2 where supported)
	XCRs      arch.XCRs
	MSRs      []arch.MSREntry
	LAPIC     arch.LAPICState
	Events    arch.VCPUEvents
	MPState   arch.MPState
	DebugRegs arch.DebugRegs
	CPUID     []arch.CPUIDEntry
	TSCKHz    uint32 // TSC frequency
}

// VMState is the VM-wide in-kernel device state.
type VMState struct {
	// IRQChips are the PIC master, PIC slave and IOAPIC, in ChipID order.
	IRQChips [3]arch.IRQChip
	PIT      arch.PITState2
	Clock    arch.ClockData // kvmclock
}

// DeviceStates holds the saved state of each VMM device. Each device's
// state type and its encoding live next to the device.
type DeviceStates struct {
	DebugPort devices.DebugPortState
	// UART is the serial port of a Linux machine (vmm/devices/uart_state.go); nil for
	// payload machines. Its presence makes a state a Linux machine's.
	UART *devices.UARTState
	// Platform is a Linux machine's ACPI PM and keyboard controller state
	// (vmm/devices/platform_state.go); nil for payload machines.
	Platform *devices.PlatformState
	// Virtio is a Linux machine's virtio-mmio devices, in the machine's
	// device order (disks, then network interfaces): each is one
	// transport's SaveState encoding, its device's state included
	// (vmm/virtio/mmio_state.go). Empty for a machine without any.
	Virtio [][]byte
}

// MSR numbers Understudy names. EFER, the APIC base and the FS/GS bases are
// saved in Sregs rather than as MSRs.
const (
	msrTSC              = 0x10
	msrKVMWallClock     = 0x11
	msrKVMSystemTime    = 0x12
	msrSysenterCS       = 0x174
	msrSysenterESP      = 0x175
	msrSysenterEIP      = 0x176
	msrPAT              = 0x277
	msrTSCDeadline      = 0x6e0
	msrSTAR             = 0xc0000081
	msrLSTAR            = 0xc0000082
	msrCSTAR            = 0xc0000083
	msrSFMASK           = 0xc0000084
	msrKernelGSBase     = 0xc0000102
	msrTSCAux           = 0xc0000103
	msrKVMWallClockNew  = 0x4b564d00
	msrKVMSystemTimeNew = 0x4b564d01
)

// essentialMSRs are saved whenever KVM_GET_MSRS can read them, even if
// KVM_GET_MSR_INDEX_LIST does not list them.
var essentialMSRs = []uint32{
	msrTSC, msrSysenterCS, msrSysenterESP, msrSysenterEIP, msrSTAR, msrLSTAR, msrCSTAR, msrSFMASK,
	msrKernelGSBase, msrTSCAux, msrPAT, msrKVMWallClock, msrKVMSystemTime, msrKVMWallClockNew, msrKVMSystemTimeNew,
}

// xsaveLegacySize is the size of struct kvm_xsave, the smallest XSAVE area.
const xsaveLegacySize = 4096

// msrBatch is how many MSRs one KVM_GET_MSRS/KVM_SET_MSRS handles here
// (KVM refuses 256 or more).
const msrBatch = 128

// msrList is the set of MSRs CaptureState saves, probed once per machine.
type msrList struct {
	indices []uint32 // readable, in KVM's list order, then essentialMSRs
	dropped []uint32 // candidates KVM_GET_MSRS refused
}

// probeMSRs reads every candidate on c and keeps those KVM can read.
func probeMSRs(c *arch.VCPU, cands []uint32) (*msrList, error) {
	l := &msrList{}
	for rest := cands; len(rest) > 0; {
		batch := rest[:min(len(rest), msrBatch)]
		ents, err := c.MSRs(batch)
		if ioe := (*arch.IoctlError)(nil); errors.As(err, &ioe) {
			return nil, err
		}
		l.indices = append(l.indices, batch[:len(ents)]...)
		rest = rest[len(ents):]
		if err != nil {
			// KVM stopped at the first MSR it cannot read: skip it.
			l.dropped = append(l.dropped, rest[0])
			rest = rest[1:]
		}
	}
	return l, nil
}

// savedMSRs returns the machine's MSR list, probing it on vCPU 0 the first
// time. The caller holds pauseMu and the machine is paused.
func (m *Machine) savedMSRs() (*msrList, error) {
	if l := m.msrs.Load(); l != nil {
		return l, nil
	}
	list, err := m.sys.MSRIndexList()
	if err != nil {
		return nil, err
	}
	cands := list
	for _, idx := range essentialMSRs {
		if !slices.Contains(cands, idx) {
			cands = append(cands, idx)
		}
	}
	var l *msrList
	err = m.onVCPU(0, func(c *arch.VCPU) error {
		var err error
		l, err = probeMSRs(c, cands)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("probe MSRs: %w", err)
	}
	m.msrs.Store(l)
	return l, nil
}

// CaptureOnPause turns on (or off) capture at parking: every vCPU reads
// its own state (see VCPUState) on its own thread as soon as it has
// stopped, all vCPUs at once, while the caller of Pause (which returns once
// they have stopped) goes on, for instance to copy guest memory. So
// CaptureState of the paused machine needs no vCPU ioctls: it waits, if
// need be, for the vCPUs to finish reading. A checkpointer, which captures
// at every pause, turns it on. Until the first CaptureState has probed the
// MSRs to save, vCPUs park without capturing.
func (m *Machine) CaptureOnPause(on bool) { m.captureOnPause.Store(on) }

// captureParked reads parking vCPU v's state on its own thread, if capture
// at parking is on.
func (m *Machine) captureParked(v *vcpu) {
	v.parkedOK = false
	if !m.captureOnPause.Load() {
		return
	}
	l := m.msrs.Load()
	if l == nil {
		return
	}
	v.parked = VCPUState{}
	v.parkedOK = v.capture(l.indices, &v.parked) == nil
}

// CaptureState returns the state of a paused machine (see MachineState), or
// of one whose Run has returned; it fails with ErrNotPaused unless Pause has
// returned and Resume has not been called since, or Run is over. A vCPU's
// state is what it read as it parked (CaptureOnPause), or else is read now
// on the vCPU's own thread, all such vCPUs at once (after Run, on the
// caller's). Guest memory is not copied.
func (m *Machine) CaptureState() (*MachineState, error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if !m.paused && !m.halted.Load() {
		return nil, fmt.Errorf("capture state: %w", ErrNotPaused)
	}
	if !m.halted.Load() {
		if err := m.waitCaptured(); err != nil {
			return nil, fmt.Errorf("capture state: %w", err)
		}
	}
	msrs, err := m.savedMSRs()
	if err != nil {
		return nil, fmt.Errorf("capture state: %w", err)
	}
	st := &MachineState{
		Config: StateConfig{
			MemSize: m.mem.Size(), CPUs: len(m.vcpus), Regions: m.mem.Regions(),
			Payload: m.payload.name, DataBase: m.payload.dataBase, DataSize: m.payload.dataSize,
		},
		VCPUs: make([]VCPUState, len(m.vcpus)),
	}
	if err := m.captureVCPUs(msrs.indices, st.VCPUs); err != nil {
		return nil, fmt.Errorf("capture state: %w", err)
	}
	if st.VM, err = captureVM(m.vm); err != nil {
		return nil, fmt.Errorf("capture state: %w", err)
	}
	st.Devices.DebugPort = m.debug.Save()
	if m.linux != nil {
		u := m.linux.uart.Save()
		st.Devices.UART = &u
		p := devices.SavePlatform(m.linux.pm, m.linux.kbd)
		st.Devices.Platform = &p
		for _, s := range m.linux.virtio {
			if !s.t.Quiesced() {
				// Run is over and the pause did not quiesce it.
				if err := s.t.Quiesce(); err != nil {
					return nil, fmt.Errorf("capture state: %w", err)
				}
			}
			b, err := s.t.SaveState()
			if err != nil {
				return nil, fmt.Errorf("capture state: %w", err)
			}
			st.Devices.Virtio = append(st.Devices.Virtio, b)
		}
	}
	return st, nil
}

// captureVCPUs fills out[i] with vCPU i's state: what it read as it parked,
// or else read now on its own thread, the vCPUs that need it all at once.
// The caller holds pauseMu.
func (m *Machine) captureVCPUs(msrs []uint32, out []VCPUState) error {
	errs := make([]error, len(m.vcpus))
	var wg sync.WaitGroup
	for i, v := range m.vcpus {
		if v.parkedOK {
			out[i] = v.parked
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = m.onVCPU(i, func(*arch.VCPU) error { return v.capture(msrs, &out[i]) })
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

// vcpuStatic is the part of a vCPU's state that cannot change once it has
// run: KVM refuses a different CPUID after the first KVM_RUN, and Understudy
// sets the TSC frequency only before (restoreVCPU).
type vcpuStatic struct {
	cpuid  []arch.CPUIDEntry
	tscKHz uint32
}

// capture reads the vCPU's state into s, on the thread that runs it. CPUID
// and the TSC frequency are read once (vcpuStatic), and the legacy FPU state
// is taken from the XSAVE area's first 512 bytes, where KVM keeps it.
func (v *vcpu) capture(msrs []uint32, s *VCPUState) error {
	c := v.cpu
	if v.static == nil {
		cpuid, err := c.CPUID()
		if err != nil {
			return err
		}
		khz, err := c.TSCKHz()
		if err != nil {
			return err
		}
		v.static = &vcpuStatic{cpuid: cpuid, tscKHz: khz}
	}
	s.CPUID, s.TSCKHz = slices.Clone(v.static.cpuid), v.static.tscKHz
	var err error
	for rest := msrs; len(rest) > 0; {
		n := min(len(rest), msrBatch)
		ents, err := c.MSRs(rest[:n])
		if err != nil {
			return err
		}
		s.MSRs = append(s.MSRs, ents...)
		rest = rest[n:]
	}
	if s.Sregs, err = c.Sregs(); err != nil {
		return err
	}
	if s.Regs, err = c.Regs(); err != nil {
		return err
	}
	if s.XSave, err = c.XSave(); err != nil {
		return err
	}
	s.FPU = fpuFromXSave(s.XSave)
	if s.XCRs, err = c.XCRs(); err != nil {
		return err
	}
	if s.LAPIC, err = c.LAPIC(); err != nil {
		return err
	}
	if s.Events, err = c.Events(); err != nil {
		return err
	}
	if s.MPState, err = c.MPState(); err != nil {
		return err
	}
	if s.DebugRegs, err = c.DebugRegs(); err != nil {
		return err
	}
	return nil
}

// fpuFromXSave returns the legacy FPU/SSE state (struct kvm_fpu) held in an
// XSAVE area's legacy region, which has the FXSAVE layout: FCW, FSW, the
// abridged tag word, FOP, FIP, FDP, MXCSR, then ST0-7 and XMM0-15 in 16-byte
// slots. Restore sets the FPU state before the XSAVE area, which supersedes
// it, so the saved FPU state only has to agree with the area.
func fpuFromXSave(x []byte) arch.FPU {
	var f arch.FPU
	if len(x) < 416 {
		return f
	}
	f.FCW = le.Uint16(x[0:])
	f.FSW = le.Uint16(x[2:])
	f.FTWX = x[4]
	f.LastOpcode = le.Uint16(x[6:])
	f.LastIP = le.Uint64(x[8:])
	f.LastDP = le.Uint64(x[16:])
	f.MXCSR = le.Uint32(x[24:])
	for i := range f.FPR {
		copy(f.FPR[i][:], x[32+16*i:])
	}
	for i := range f.XMM {
		copy(f.XMM[i][:], x[160+16*i:])
	}
	return f
}

// captureVM reads the VM-wide in-kernel device state.
func captureVM(vm *arch.VM) (VMState, error) {
	var s VMState
	var err error
	for i := range s.IRQChips {
		if s.IRQChips[i], err = vm.IRQChip(uint32(i)); err != nil {
			return s, err
		}
	}
	if s.PIT, err = vm.PIT2(); err != nil {
		return s, err
	}
	if s.Clock, err = vm.Clock(); err != nil {
		return s, err
	}
	return s, nil
}

// RestoreConfig holds what a restored machine takes from its new host and
// its caller rather than from the saved state.
type RestoreConfig struct {
	// KVMDevice is the KVM device node; empty means /dev/kvm.
	KVMDevice string
	// Backing selects anonymous or memfd guest RAM (Restore only).
	Backing mmu.Backing
	// Console receives the guest's console bytes (nil: discarded).
	Console io.Writer
	// ConsoleIn is a Linux guest's serial input, as in LinuxConfig.
	ConsoleIn io.Reader
	// OnRecord and OnMark are a payload guest's, as in PayloadConfig.
	OnRecord func(Record)
	OnMark   func(cpu int, phase uint32)
	// Affinity, if set, pins vCPU i's thread to host CPU Affinity[i].
	Affinity []int
	// Disks and Nets are a Linux machine's virtio devices on this host,
	// given again: the state's virtio-blk devices take Disks in order (the
	// same size and content as when the state was captured), its
	// virtio-net devices Nets (a tap here; the MAC is the state's, and a
	// NetConfig.MAC other than it is refused).
	Disks []DiskConfig
	Nets  []NetConfig
	// NetCarried, if set, is what Machine.SealNetOutput returned for the
	// checkpoint being restored: the frames the primary still held. They
	// are written to the taps before the restored guest transmits (a
	// malformed encoding is refused). See output.go.
	NetCarried []byte
	// Logger receives warnings (a TSC rate this host cannot scale to) and
	// device diagnostics (nil: slog.Default()).
	Logger *slog.Logger
}

// Restore builds a new machine from st and a memory image: exactly
// st.Config.MemSize bytes in backing order (the regions of st.Config.Regions
// one after the other), read from image to its end. It does not run the
// payload loader. The machine is ready to Run and continues where the
// captured one stopped.
func Restore(cfg RestoreConfig, st *MachineState, image io.Reader) (*Machine, error) {
	if image == nil {
		return nil, errors.New("restore: no memory image given")
	}
	return restore(cfg, st, nil, image)
}

// RestoreMemory is Restore with guest RAM that already holds the image. The
// machine takes mem over: it closes it, also when RestoreMemory fails.
func RestoreMemory(cfg RestoreConfig, st *MachineState, mem *mmu.Memory) (*Machine, error) {
	if mem == nil {
		return nil, errors.New("restore: no guest memory given")
	}
	return restore(cfg, st, mem, nil)
}

func restore(cfg RestoreConfig, st *MachineState, mem *mmu.Memory, image io.Reader) (*Machine, error) {
	closeMem := func() {
		if mem != nil {
			mem.Close()
		}
	}
	if st == nil {
		closeMem()
		return nil, errors.New("restore: no machine state given")
	}
	if err := st.validate(); err != nil {
		closeMem()
		return nil, fmt.Errorf("restore: %w", err)
	}
	if mem != nil && mem.Size() != st.Config.MemSize {
		closeMem()
		return nil, fmt.Errorf("restore: guest memory of %s given, the state needs %s", option.FormatSize(mem.Size()), option.FormatSize(st.Config.MemSize))
	}
	mc := Config{
		KVMDevice: cfg.KVMDevice, MemSize: st.Config.MemSize, CPUs: st.Config.CPUs, Backing: cfg.Backing,
		Console: cfg.Console, Affinity: cfg.Affinity, Logger: cfg.Logger,
	}
	linux := st.Devices.UART != nil
	if linux {
		mc.Linux = &LinuxConfig{ConsoleIn: cfg.ConsoleIn}
	} else {
		mc.Payload = &PayloadConfig{Name: st.Config.Payload, OnRecord: cfg.OnRecord, OnMark: cfg.OnMark}
	}
	if err := checkConfig(&mc); err != nil {
		closeMem()
		return nil, fmt.Errorf("restore: %w", err)
	}
	if !linux && len(cfg.Disks)+len(cfg.Nets)+len(cfg.NetCarried) > 0 {
		closeMem()
		return nil, errors.New("restore: disks, network interfaces or carried frames given for a payload machine, which has none")
	}
	carried, err := virtio.DecodeHeldFrames(cfg.NetCarried)
	if err != nil {
		closeMem()
		return nil, fmt.Errorf("restore: %w", err)
	}
	m, err := build(mc, mem, linux)
	if err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	m.payload = &loadedPayload{name: st.Config.Payload, dataBase: st.Config.DataBase, dataSize: st.Config.DataSize}
	if linux {
		// A Linux machine: its devices, with their state restored below.
		m.linux = &linuxGuest{consoleIn: cfg.ConsoleIn}
		if err := m.linux.openVirtio(cfg, st.Devices.Virtio); err != nil {
			m.Close()
			return nil, fmt.Errorf("restore: %w", err)
		}
		if err := m.addLinuxDevices(); err != nil {
			m.Close()
			return nil, fmt.Errorf("restore: %w", err)
		}
	}
	if err := m.restore(st, image); err != nil {
		m.Close()
		return nil, fmt.Errorf("restore: %w", err)
	}
	if err := m.sendCarried(carried); err != nil {
		m.Close()
		return nil, fmt.Errorf("restore: %w", err)
	}
	if linux && len(m.linux.virtio) > 0 {
		// Guest memory, vCPUs and interrupt controllers hold the state:
		// kick every queue, then tell the segment where the NICs are.
		m.resumeVirtio()
		m.linux.announcing.Add(1)
		go func() {
			defer m.linux.announcing.Done()
			m.announce()
		}()
	}
	return m, nil
}

// Announce rounds after a restore, as QEMU's announce-self: 5 rounds, the
// first gap 50 ms, each next one 100 ms longer.
const (
	announceRounds  = 5
	announceInitial = 50 * time.Millisecond
	announceStep    = 100 * time.Millisecond
)

// announce sends each virtio-net device's RARP announcement (virtio.Net's
// Announce) announceRounds times, until the machine stops.
func (m *Machine) announce() {
	var nets []*virtio.Net
	for _, s := range m.linux.virtio {
		if n, ok := s.dev.(*virtio.Net); ok {
			nets = append(nets, n)
		}
	}
	if len(nets) == 0 {
		return
	}
	gap := announceInitial
	warned := make([]bool, len(nets)) // one warning per NIC (a tap that is down fails every round)
	for round := range announceRounds {
		select {
		case <-m.stopCh:
			return
		default:
		}
		for i, n := range nets {
			if err := n.Announce(); err != nil && m.log != nil && !warned[i] {
				warned[i] = true
				m.log.Warn("announce", "round", round, "err", err)
			}
		}
		if round == announceRounds-1 {
			return
		}
		t := time.NewTimer(gap)
		select {
		case <-m.stopCh:
			t.Stop()
			return
		case <-t.C:
		}
		gap += announceStep
	}
}

// openVirtio opens the virtio backends of a restored Linux machine: one per
// state in states, in order, virtio-blk devices from cfg.Disks and
// virtio-net devices from cfg.Nets, each list used up exactly. A
// virtio-net device gets the state's MAC address.
func (g *linuxGuest) openVirtio(cfg RestoreConfig, states [][]byte) error {
	var blocks, nets int
	for _, b := range states {
		_, id, _, err := virtio.DecodeTransportState(b)
		if err != nil {
			return err
		}
		if id == virtio.DeviceIDBlock {
			blocks++
		} else {
			nets++
		}
	}
	if blocks != len(cfg.Disks) || nets != len(cfg.Nets) {
		return fmt.Errorf("the state has %d disks and %d network interfaces; %d disks and %d network interfaces given", blocks, nets, len(cfg.Disks), len(cfg.Nets))
	}
	ok := false
	defer func() {
		if !ok {
			g.close()
			g.virtio = nil
		}
	}()
	var di, ni int
	for _, b := range states {
		_, id, body, _ := virtio.DecodeTransportState(b)
		if id == virtio.DeviceIDBlock {
			d := cfg.Disks[di]
			bs, err := virtio.DecodeBlockState(body)
			if err != nil {
				return fmt.Errorf("disk %d: %w", di, err)
			}
			if bs.ReadOnly != d.ReadOnly {
				return fmt.Errorf("disk %d (%s): read-only is %t, the state's disk %t", di, d.Path, d.ReadOnly, bs.ReadOnly)
			}
			dev, err := virtio.NewBlock(d.Path, d.ReadOnly)
			if err != nil {
				return fmt.Errorf("disk %d: %w", di, err)
			}
			if d.Fingerprint != nil {
				if err := dev.SetFingerprint(d.Fingerprint); err != nil {
					dev.Close()
					return fmt.Errorf("disk %d: %w", di, err)
				}
			}
			g.addVirtio(fmt.Sprintf("virtio-blk %s", d.Path), dev)
			di++
			continue
		}
		n := cfg.Nets[ni]
		ns, err := virtio.DecodeNetState(body)
		if err != nil {
			return fmt.Errorf("network interface %d: %w", ni, err)
		}
		if n.MAC != nil && !bytes.Equal(n.MAC, ns.MAC) {
			return fmt.Errorf("network interface %d: MAC %s given, the state's is %s", ni, n.MAC, ns.MAC)
		}
		dev, err := virtio.NewNet(n.Tap, ns.MAC)
		if err != nil {
			return fmt.Errorf("network interface %d: %w", ni, err)
		}
		g.addVirtio(fmt.Sprintf("virtio-net %s", n.Tap), dev)
		ni++
	}
	ok = true
	return nil
}

// restore loads the memory image (if any) and puts st into a freshly built
// machine.
func (m *Machine) restore(st *MachineState, image io.Reader) error {
	if got := m.mem.Regions(); !slices.Equal(got, st.Config.Regions) {
		return fmt.Errorf("the state's memory layout %v differs from this machine's %v", st.Config.Regions, got)
	}
	if image != nil { // nil: RestoreMemory's memory holds the image
		if err := m.loadImage(image); err != nil {
			return err
		}
	}
	// Every page now holds what the VMM put there.
	for _, r := range m.mem.Regions() {
		if err := m.mem.MarkDirty(r.GPA, r.Size); err != nil {
			return err
		}
	}
	xsaveSize := xsaveLegacySize
	if n := m.vm.CheckExtension(arch.CapXSave2); n > xsaveSize {
		xsaveSize = n
	}
	for i, v := range m.vcpus {
		if err := restoreVCPU(v.cpu, &st.VCPUs[i], xsaveSize, m.log); err != nil {
			return fmt.Errorf("vCPU %d: %w", i, err)
		}
	}
	if err := restoreVM(m.vm, &st.VM); err != nil {
		return err
	}
	if st.Devices.UART != nil {
		if err := m.linux.uart.Restore(*st.Devices.UART); err != nil {
			return err
		}
		if st.Devices.Platform != nil {
			devices.RestorePlatform(m.linux.pm, m.linux.kbd, *st.Devices.Platform)
		}
		for i, b := range st.Devices.Virtio {
			// Guest memory holds the image: LoadState checks the rings
			// against it, and the disk against the state's fingerprint.
			if err := m.linux.virtio[i].t.LoadState(b); err != nil {
				return err
			}
		}
	}
	return m.debug.Restore(st.Devices.DebugPort)
}

// loadImage reads exactly the whole of guest RAM from r.
func (m *Machine) loadImage(r io.Reader) error {
	b := m.mem.Backing()
	n, err := io.ReadFull(r, b)
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("memory image ends after %d of %d bytes", n, len(b))
	}
	if err != nil {
		return fmt.Errorf("read memory image: %w", err)
	}
	// The image must end here; reading on also lets a checking reader
	// verify what follows the image.
	var extra [1]byte
	switch _, err := io.ReadFull(r, extra[:]); {
	case err == nil:
		return fmt.Errorf("memory image is longer than the state's %s of guest memory", option.FormatSize(uint64(len(b))))
	case !errors.Is(err, io.EOF):
		return fmt.Errorf("read memory image: %w", err)
	}
	return nil
}

// restoreVCPU puts s into a vCPU that has not run. The order matters: CPUID
// first (KVM checks XCR0, MSRs and more against it), the TSC frequency
// before the TSC, MSRs before the special registers, the special registers
// (APIC base) before the LAPIC, the TSC deadline after the LAPIC (KVM drops
// it unless the LAPIC timer is in TSC-deadline mode), XSAVE after the legacy
// FPU state it supersedes, then events, MP state and debug registers.
// xsaveSize is what KVM_SET_XSAVE wants on this host; a smaller saved area
// is zero-padded (its XSTATE_BV has no bits for the missing components).
//
// A TSC frequency this host cannot scale to is a warning on log, not an
// error, as in QEMU's incoming migration: two hosts (or two boots of one
// emulated CPU) calibrate a few hundred ppm apart, KVM scales only beyond
// its tolerance and only with hardware TSC scaling, and a Linux guest's
// kvmclock follows the host's rate, so its clock stays right. Only a guest
// that times with the raw TSC sees it run a little fast or slow.
func restoreVCPU(c *arch.VCPU, s *VCPUState, xsaveSize int, log *slog.Logger) error {
	if err := c.SetCPUID(s.CPUID); err != nil {
		return err
	}
	if s.TSCKHz != 0 {
		khz, err := c.TSCKHz()
		if err != nil {
			return err
		}
		if khz != s.TSCKHz {
			if err := c.SetTSCKHz(s.TSCKHz); err != nil {
				log.Warn("TSC frequency differs and cannot be scaled; the guest's TSC runs at this host's rate",
					"host_khz", khz, "state_khz", s.TSCKHz, "err", err)
			}
		}
	}
	var deadline []arch.MSREntry
	msrs := make([]arch.MSREntry, 0, len(s.MSRs))
	for _, e := range s.MSRs {
		if e.Index == msrTSCDeadline {
			deadline = append(deadline, e)
		} else {
			msrs = append(msrs, e)
		}
	}
	if err := setMSRs(c, msrs); err != nil {
		return err
	}
	if err := c.SetSregs(s.Sregs); err != nil {
		return err
	}
	if err := c.SetRegs(s.Regs); err != nil {
		return err
	}
	if err := c.SetFPU(s.FPU); err != nil {
		return err
	}
	xs := s.XSave
	if len(xs) < xsaveSize {
		xs = make([]byte, xsaveSize)
		copy(xs, s.XSave)
	}
	if err := c.SetXSave(xs); err != nil {
		return err
	}
	// A host without XSAVE (QEMU's qemu64 CPU, under which the appliance
	// runs its nested guests) reports no XCRs, and KVM refuses
	// KVM_SET_XCRS there whatever it holds.
	if s.XCRs.NrXCRs > 0 {
		if err := c.SetXCRs(s.XCRs); err != nil {
			return err
		}
	}
	if err := c.SetLAPIC(s.LAPIC); err != nil {
		return err
	}
	if err := setMSRs(c, deadline); err != nil {
		return err
	}
	if err := c.SetEvents(s.Events); err != nil {
		return err
	}
	if err := c.SetMPState(s.MPState); err != nil {
		return err
	}
	return c.SetDebugRegs(s.DebugRegs)
}

// setMSRs writes ents in batches KVM accepts.
func setMSRs(c *arch.VCPU, ents []arch.MSREntry) error {
	for len(ents) > 0 {
		n := min(len(ents), msrBatch)
		if err := c.SetMSRs(ents[:n]); err != nil {
			return err
		}
		ents = ents[n:]
	}
	return nil
}

// restoreVM puts the VM-wide device state back. kvmclock continues from the
// captured value: the time the machine spent saved is not added (the
// captured realtime and host TSC are not passed on).
func restoreVM(vm *arch.VM, s *VMState) error {
	for _, c := range s.IRQChips {
		if err := vm.SetIRQChip(c); err != nil {
			return fmt.Errorf("irqchip %d: %w", c.ChipID, err)
		}
	}
	if err := vm.SetPIT2(s.PIT); err != nil {
		return err
	}
	return vm.SetClock(arch.ClockData{Clock: s.Clock.Clock})
}
