package arch

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// keepAlive keeps v reachable until this call (see runtime.KeepAlive).
func keepAlive(v any) { runtime.KeepAlive(v) }

// Exit reasons (KVM_EXIT_*).
const (
	ExitUnknown        = 0
	ExitException      = 1
	ExitIO             = 2
	ExitHypercall      = 3
	ExitDebug          = 4
	ExitHLT            = 5
	ExitMMIO           = 6
	ExitIRQWindowOpen  = 7
	ExitShutdown       = 8
	ExitFailEntry      = 9
	ExitIntr           = 10
	ExitSetTPR         = 11
	ExitTPRAccess      = 12
	ExitNMI            = 16
	ExitInternalError  = 17
	ExitSystemEvent    = 24
	ExitIOAPICEOI      = 26
	ExitHyperV         = 27
	ExitX86RDMSR       = 29
	ExitX86WRMSR       = 30
	ExitDirtyRingFull  = 31
	ExitAPResetHold    = 32
	ExitX86BusLock     = 33
	ExitNotify         = 37
	ExitMemoryFault    = 39
	exitReasonNameSize = 40
)

var exitNames = [exitReasonNameSize]string{
	ExitUnknown: "KVM_EXIT_UNKNOWN", ExitException: "KVM_EXIT_EXCEPTION", ExitIO: "KVM_EXIT_IO",
	ExitHypercall: "KVM_EXIT_HYPERCALL", ExitDebug: "KVM_EXIT_DEBUG", ExitHLT: "KVM_EXIT_HLT",
	ExitMMIO: "KVM_EXIT_MMIO", ExitIRQWindowOpen: "KVM_EXIT_IRQ_WINDOW_OPEN",
	ExitShutdown: "KVM_EXIT_SHUTDOWN", ExitFailEntry: "KVM_EXIT_FAIL_ENTRY", ExitIntr: "KVM_EXIT_INTR",
	ExitSetTPR: "KVM_EXIT_SET_TPR", ExitTPRAccess: "KVM_EXIT_TPR_ACCESS", ExitNMI: "KVM_EXIT_NMI",
	ExitInternalError: "KVM_EXIT_INTERNAL_ERROR", ExitSystemEvent: "KVM_EXIT_SYSTEM_EVENT",
	ExitIOAPICEOI: "KVM_EXIT_IOAPIC_EOI", ExitHyperV: "KVM_EXIT_HYPERV", ExitX86RDMSR: "KVM_EXIT_X86_RDMSR",
	ExitX86WRMSR: "KVM_EXIT_X86_WRMSR", ExitDirtyRingFull: "KVM_EXIT_DIRTY_RING_FULL",
	ExitAPResetHold: "KVM_EXIT_AP_RESET_HOLD", ExitX86BusLock: "KVM_EXIT_X86_BUS_LOCK",
	ExitNotify: "KVM_EXIT_NOTIFY", ExitMemoryFault: "KVM_EXIT_MEMORY_FAULT",
}

// ExitName returns the kernel's name for an exit reason.
func ExitName(reason uint32) string {
	if reason < exitReasonNameSize && exitNames[reason] != "" {
		return exitNames[reason]
	}
	return fmt.Sprintf("KVM_EXIT_%d", reason)
}

// System event types (KVM_SYSTEM_EVENT_*).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// Internal-error suberrors (KVM_INTERNAL_ERROR_*).
const (
	InternalErrorEmulation        = 1
	InternalErrorSimulEx          = 2
	InternalErrorDeliveryEv       = 3
	InternalErrorUnexpectedExitRe = 4
)

// Offsets into struct kvm_run.
const (
	runImmediateExit = 1
	runExitReason    = 8
	runExit          = 32 // the exit-reason union
	runExitSize      = 256
)

// VCPU is a KVM virtual CPU fd with its mapped run area. KVM_RUN must always
// be called from the same OS thread (lock the goroutine with
// runtime.LockOSThread); state ioctls may come from any thread while the vCPU
// is not running.
type VCPU struct {
	fd     int
	id     int
	vm     *VM
	runMem []byte
	run    runArea
}

// ID returns the vCPU index.
func (c *VCPU) ID() int { return c.id }

// FD returns the raw file descriptor.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps the run area and closes the fd.
func (c *VCPU) Close() error {
	err := unix.Munmap(c.runMem)
	if cerr := unix.Close(c.fd); err == nil {
		err = cerr
	}
	return err
}

// Run enters the guest until the next exit. An exit caused by a signal or by
// immediate_exit returns an error wrapping unix.EINTR (see IsInterrupted).
func (c *VCPU) Run() error {
	_, err := ioctlVal(c.fd, kvmRun, 0)
	return err
}

// IsInterrupted reports whether err is KVM_RUN's EINTR (a kick).
func IsInterrupted(err error) bool { return errors.Is(err, unix.EINTR) }

// SetImmediateExit sets run->immediate_exit; while it is set, KVM_RUN returns
// EINTR at once. It is safe to call from any goroutine.
func (c *VCPU) SetImmediateExit(on bool) {
	var v uint8
	if on {
		v = 1
	}
	c.run.storeByte(runImmediateExit, v)
}

// ExitReason returns run->exit_reason of the last exit.
func (c *VCPU) ExitReason() uint32 {
	return binary.LittleEndian.Uint32(c.runMem[runExitReason:])
}

// exitData returns the exit-reason union of the run area.
func (c *VCPU) exitData() []byte { return c.runMem[runExit : runExit+runExitSize] }

// IOExit describes a KVM_EXIT_IO.
type IOExit struct {
	Out   bool
	Size  int // 1, 2 or 4
	Port  uint16
	Count int
	// Data is the count*size bytes inside the run area: written by the guest
	// for Out, to be filled by the VMM for In.
	Data []byte
}

// Exit directions of IOExit.
const (
	ioIn  = 0
	ioOut = 1
)

// IO decodes the last KVM_EXIT_IO. It fails if the kernel's data offset or
// length points outside the run area.
func (c *VCPU) IO() (IOExit, error) {
	d := c.exitData()
	e := IOExit{
		Out:   d[0] == ioOut,
		Size:  int(d[1]),
		Port:  binary.LittleEndian.Uint16(d[2:]),
		Count: int(binary.LittleEndian.Uint32(d[4:])),
	}
	off := binary.LittleEndian.Uint64(d[8:])
	n := uint64(e.Size) * uint64(e.Count)
	if off > uint64(len(c.runMem)) || n > uint64(len(c.runMem))-off {
		return e, fmt.Errorf("KVM_EXIT_IO: data at %#x+%d outside the %d-byte run area", off, n, len(c.runMem))
	}
	e.Data = c.runMem[off : off+n]
	return e, nil
}

// MMIOExit describes a KVM_EXIT_MMIO.
type MMIOExit struct {
	Addr  uint64
	Write bool
	// Data is the access's len bytes inside the run area.
	Data []byte
}

// MMIO decodes the last KVM_EXIT_MMIO.
func (c *VCPU) MMIO() MMIOExit {
	d := c.exitData()
	n := binary.LittleEndian.Uint32(d[16:])
	if n > 8 {
		n = 8
	}
	return MMIOExit{Addr: binary.LittleEndian.Uint64(d), Write: d[20] != 0, Data: d[8 : 8+n]}
}

// InternalError returns the suberror and data words of a KVM_EXIT_INTERNAL_ERROR.
func (c *VCPU) InternalError() (suberror uint32, data []uint64) {
	d := c.exitData()
	suberror = binary.LittleEndian.Uint32(d)
	n := binary.LittleEndian.Uint32(d[4:])
	if n > 16 {
		n = 16
	}
	for i := uint32(0); i < n; i++ {
		data = append(data, binary.LittleEndian.Uint64(d[8+8*i:]))
	}
	return suberror, data
}

// SystemEvent returns the type and flags of a KVM_EXIT_SYSTEM_EVENT.
func (c *VCPU) SystemEvent() (typ uint32, flags uint64) {
	d := c.exitData()
	return binary.LittleEndian.Uint32(d), binary.LittleEndian.Uint64(d[8:])
}

// FailEntry returns the hardware entry failure reason of a KVM_EXIT_FAIL_ENTRY.
func (c *VCPU) FailEntry() (reason uint64, cpu uint32) {
	d := c.exitData()
	return binary.LittleEndian.Uint64(d), binary.LittleEndian.Uint32(d[8:])
}

// MemoryFault returns the flags, GPA and size of a KVM_EXIT_MEMORY_FAULT.
func (c *VCPU) MemoryFault() (flags, gpa, size uint64) {
	d := c.exitData()
	return binary.LittleEndian.Uint64(d), binary.LittleEndian.Uint64(d[8:]), binary.LittleEndian.Uint64(d[16:])
}

// Regs returns the general-purpose registers.
func (c *VCPU) Regs() (Regs, error) {
	var r Regs
	err := ioctlOf(c.fd, kvmGetRegs, &r)
	return r, err
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error { return ioctlOf(c.fd, kvmSetRegs, &r) }

// Sregs returns the special registers.
func (c *VCPU) Sregs() (Sregs, error) {
	var s Sregs
	err := ioctlOf(c.fd, kvmGetSregs, &s)
	return s, err
}

// SetSregs sets the special registers.
func (c *VCPU) SetSregs(s Sregs) error { return ioctlOf(c.fd, kvmSetSregs, &s) }

// FPU returns the legacy FPU/SSE state.
func (c *VCPU) FPU() (FPU, error) {
	var f FPU
	err := ioctlOf(c.fd, kvmGetFPU, &f)
	return f, err
}

// SetFPU sets the legacy FPU/SSE state.
func (c *VCPU) SetFPU(f FPU) error { return ioctlOf(c.fd, kvmSetFPU, &f) }

// XSave returns the XSAVE area. With KVM_CAP_XSAVE2 it uses KVM_GET_XSAVE2
// and returns the full (possibly larger than 4 KiB) area.
func (c *VCPU) XSave() ([]byte, error) {
	if n := c.vm.CheckExtension(CapXSave2); n > 0 {
		b := make([]byte, n)
		return b, ioctlBytes(c.fd, kvmGetXSave2, b)
	}
	b := make([]byte, sizeOf[XSave]())
	return b, ioctlBytes(c.fd, kvmGetXSave, b)
}

// SetXSave restores an area returned by XSave.
func (c *VCPU) SetXSave(b []byte) error {
	// KVM_SET_XSAVE reads as many bytes as KVM_GET_XSAVE2 returns (the
	// KVM_CAP_XSAVE2 size), which may exceed the legacy 4 KiB.
	want := int(sizeOf[XSave]())
	if n := c.vm.CheckExtension(CapXSave2); n > want {
		want = n
	}
	if len(b) < want {
		return fmt.Errorf("KVM_SET_XSAVE: area of %d bytes, want at least %d", len(b), want)
	}
	return ioctlBytes(c.fd, kvmSetXSave, b)
}

// XCRs returns the extended control registers.
func (c *VCPU) XCRs() (XCRs, error) {
	var x XCRs
	err := ioctlOf(c.fd, kvmGetXCRs, &x)
	return x, err
}

// SetXCRs sets the extended control registers.
func (c *VCPU) SetXCRs(x XCRs) error { return ioctlOf(c.fd, kvmSetXCRs, &x) }

// MSRs reads the MSRs whose indices are given.
func (c *VCPU) MSRs(indices []uint32) ([]MSREntry, error) {
	ents := make([]MSREntry, len(indices))
	for i, idx := range indices {
		ents[i].Index = idx
	}
	n, err := msrs(c.fd, kvmGetMSRs, ents)
	if err != nil {
		return nil, err
	}
	if n != len(ents) {
		return ents[:n], fmt.Errorf("KVM_GET_MSRS: read %d of %d MSRs, failed at %#x", n, len(ents), ents[n].Index)
	}
	return ents, nil
}

// SetMSRs writes MSRs.
func (c *VCPU) SetMSRs(ents []MSREntry) error {
	cp := append([]MSREntry(nil), ents...)
	n, err := msrs(c.fd, kvmSetMSRs, cp)
	if err != nil {
		return err
	}
	if n != len(ents) {
		return fmt.Errorf("KVM_SET_MSRS: wrote %d of %d MSRs, failed at %#x", n, len(ents), ents[n].Index)
	}
	return nil
}

// LAPIC returns the local APIC register page.
func (c *VCPU) LAPIC() (LAPICState, error) {
	var l LAPICState
	err := ioctlOf(c.fd, kvmGetLAPIC, &l)
	return l, err
}

// SetLAPIC sets the local APIC register page.
func (c *VCPU) SetLAPIC(l LAPICState) error { return ioctlOf(c.fd, kvmSetLAPIC, &l) }

// Events returns pending exception, interrupt and NMI state.
func (c *VCPU) Events() (VCPUEvents, error) {
	var e VCPUEvents
	err := ioctlOf(c.fd, kvmGetVCPUEvents, &e)
	return e, err
}

// SetEvents restores pending exception, interrupt and NMI state.
func (c *VCPU) SetEvents(e VCPUEvents) error { return ioctlOf(c.fd, kvmSetVCPUEvents, &e) }

// MPState returns the multiprocessing state.
func (c *VCPU) MPState() (MPState, error) {
	var m MPState
	err := ioctlOf(c.fd, kvmGetMPState, &m)
	return m, err
}

// SetMPState sets the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error { return ioctlOf(c.fd, kvmSetMPState, &m) }

// DebugRegs returns the debug registers.
func (c *VCPU) DebugRegs() (DebugRegs, error) {
	var d DebugRegs
	err := ioctlOf(c.fd, kvmGetDebugRegs, &d)
	return d, err
}

// SetDebugRegs sets the debug registers.
func (c *VCPU) SetDebugRegs(d DebugRegs) error { return ioctlOf(c.fd, kvmSetDebugRegs, &d) }

// CPUID returns the CPUID entries set on this vCPU.
func (c *VCPU) CPUID() ([]CPUIDEntry, error) { return getCPUID(c.fd, kvmGetCPUID2) }

// SetCPUID sets the vCPU's CPUID entries.
func (c *VCPU) SetCPUID(ents []CPUIDEntry) error { return setCPUID(c.fd, kvmSetCPUID2, ents) }

// Translate translates a guest virtual address through the vCPU's current
// page tables (KVM_TRANSLATE).
func (c *VCPU) Translate(gva uint64) (gpa uint64, valid bool, err error) {
	t := translation{LinearAddress: gva}
	if err := ioctlOf(c.fd, kvmTranslate, &t); err != nil {
		return 0, false, err
	}
	return t.PhysicalAddress, t.Valid != 0, nil
}

// Interrupt queues an external interrupt (only without an in-kernel irqchip).
func (c *VCPU) Interrupt(vector uint32) error {
	i := interrupt{IRQ: vector}
	return ioctlOf(c.fd, kvmInterrupt, &i)
}

// NMI queues a non-maskable interrupt.
func (c *VCPU) NMI() error {
	_, err := ioctlVal(c.fd, kvmNMI, 0)
	return err
}

// KVMClockCtrl tells the guest's kvmclock that the vCPU was paused by the host.
func (c *VCPU) KVMClockCtrl() error {
	_, err := ioctlVal(c.fd, kvmKVMClockCtrl, 0)
	return err
}

// TSCKHz returns the vCPU's TSC frequency in kHz.
func (c *VCPU) TSCKHz() (uint32, error) {
	r, err := ioctlVal(c.fd, kvmGetTSCKHz, 0)
	return uint32(r), err
}

// SetTSCKHz sets the vCPU's TSC frequency in kHz.
func (c *VCPU) SetTSCKHz(khz uint32) error {
	_, err := ioctlVal(c.fd, kvmSetTSCKHz, uintptr(khz))
	return err
}

// StatsFD returns the vCPU's binary statistics fd.
func (c *VCPU) StatsFD() (*Stats, error) {
	fd, err := ioctlVal(c.fd, kvmGetStatsFD, 0)
	if err != nil {
		return nil, err
	}
	return newStats(int(fd))
}
