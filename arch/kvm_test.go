package arch

// Host-KVM tests: they use the real /dev/kvm and skip only when it does not
// exist.

import (
	"encoding/binary"
	"errors"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"

	"golang.org/x/sys/unix"
)

// openKVM opens /dev/kvm, skipping the test only if the device is absent.
func openKVM(t *testing.T) *System {
	t.Helper()
	kvmtest.Require(t)
	sys, err := Open("")
	if err != nil {
		t.Fatalf("Open(%q) = %v", DefaultDevice, err)
	}
	t.Cleanup(func() { sys.Close() })
	return sys
}

const testSlotSize = 2 << 20

// testMachine is a VM with an in-kernel irqchip and PIT, one 2 MiB memory
// slot at GPA 0 (slot 0) and one vCPU.
type testMachine struct {
	sys *System
	vm  *VM
	mem []byte
	cpu *VCPU
}

func newTestMachine(t *testing.T, slotFlags uint32) *testMachine {
	t.Helper()
	sys := openKVM(t)
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatalf("CreateVM() = %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatalf("CreateIRQChip() = %v", err)
	}
	if err := vm.CreatePIT2(PITSpeakerDummy); err != nil {
		t.Fatalf("CreatePIT2(PITSpeakerDummy) = %v", err)
	}
	mem := mmapAnon(t, testSlotSize)
	r := UserMemoryRegion{Slot: 0, Flags: slotFlags, MemorySize: testSlotSize, UserspaceAddr: SliceAddr(mem)}
	if err := vm.SetUserMemoryRegion(r); err != nil {
		t.Fatalf("SetUserMemoryRegion(%+v) = %v", r, err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatalf("CreateVCPU(0) = %v", err)
	}
	t.Cleanup(func() { cpu.Close() })
	return &testMachine{sys: sys, vm: vm, mem: mem, cpu: cpu}
}

func mmapAnon(t *testing.T, size int) []byte {
	t.Helper()
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap %d bytes: %v", size, err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	return mem
}

// wantIoctlErr checks that err is an *IoctlError for op wrapping errno.
func wantIoctlErr(t *testing.T, call string, err error, op string, errno unix.Errno) {
	t.Helper()
	var ie *IoctlError
	if !errors.As(err, &ie) || ie.Op != op || !errors.Is(err, errno) {
		t.Errorf("%s = %v, want *IoctlError{Op: %q} wrapping %v", call, err, op, errno)
		return
	}
	if want := op + ": " + errno.Error(); err.Error() != want {
		t.Errorf("%s error text = %q, want %q", call, err.Error(), want)
	}
}

func TestSystemKVM(t *testing.T) {
	sys := openKVM(t)
	if sys.FD() < 0 {
		t.Errorf("FD() = %d, want >= 0", sys.FD())
	}
	if n := sys.MaxVCPUs(); n <= 0 {
		t.Errorf("MaxVCPUs() = %d, want > 0", n)
	}
	if n := sys.VCPUMmapSize(); n < 4096 || n%4096 != 0 {
		t.Errorf("VCPUMmapSize() = %d, want a positive multiple of 4096", n)
	}
	for _, c := range []int{CapUserMemory, CapIRQChip, CapPIT2, CapMPState, CapVCPUEvents, CapDebugRegs, CapXSave, CapXCRs, CapReadonlyMem, CapImmediateExit} {
		if got := sys.CheckExtension(c); got == 0 {
			t.Errorf("CheckExtension(%d) = 0, want supported", c)
		}
	}
	if got := sys.CheckExtension(-1); got != 0 {
		t.Errorf("CheckExtension(-1) = %d, want 0", got)
	}
	cpuid, err := sys.SupportedCPUID()
	if err != nil || len(cpuid) == 0 {
		t.Fatalf("SupportedCPUID() = %d entries, %v; want some", len(cpuid), err)
	}
	leaves := map[uint32]bool{}
	for _, e := range cpuid {
		leaves[e.Function] = true
	}
	for _, l := range []uint32{0, 1, KVMCPUIDSignature} {
		if !leaves[l] {
			t.Errorf("SupportedCPUID() has no leaf %#x", l)
		}
	}
	msrs, err := sys.MSRIndexList()
	if err != nil || len(msrs) == 0 {
		t.Fatalf("MSRIndexList() = %d MSRs, %v; want some", len(msrs), err)
	}
	for _, m := range []uint32{msrSysenterCS, msrSTAR, msrLSTAR} {
		if !slices.Contains(msrs, m) {
			t.Errorf("MSRIndexList() does not contain %#x", m)
		}
	}
}

// MSRs used by the round-trip test.
const (
	msrSysenterCS  = 0x174
	msrSysenterESP = 0x175
	msrSysenterEIP = 0x176
	msrSTAR        = 0xc0000081
	msrLSTAR       = 0xc0000082
)

func TestVMBasics(t *testing.T) {
	m := newTestMachine(t, 0)
	if m.vm.System() != m.sys {
		t.Errorf("VM.System() = %p, want %p", m.vm.System(), m.sys)
	}
	if m.vm.FD() < 0 || m.cpu.FD() < 0 || m.cpu.ID() != 0 {
		t.Errorf("VM.FD() = %d, VCPU.FD() = %d, VCPU.ID() = %d; want fds >= 0 and id 0", m.vm.FD(), m.cpu.FD(), m.cpu.ID())
	}
	if got := m.vm.CheckExtension(CapUserMemory); got == 0 {
		t.Errorf("VM.CheckExtension(CapUserMemory) = 0, want supported")
	}
	if err := m.vm.EnableCap(1, 1, 2, 3, 4, 5); err == nil || !strings.Contains(err.Error(), "at most 4") {
		t.Errorf("EnableCap(1, 5 args) = %v, want an error about at most 4 args", err)
	}
	// A second vCPU with the same id is refused.
	if c, err := m.vm.CreateVCPU(0); err == nil {
		c.Close()
		t.Errorf("CreateVCPU(0) twice = nil error, want EEXIST")
	} else {
		wantIoctlErr(t, "CreateVCPU(0) twice", err, "KVM_CREATE_VCPU", unix.EEXIST)
	}
	// With an in-kernel irqchip, KVM_INTERRUPT is refused.
	wantIoctlErr(t, "Interrupt(32)", m.cpu.Interrupt(32), "KVM_INTERRUPT", unix.ENXIO)
	if err := m.cpu.NMI(); err != nil {
		t.Errorf("NMI() = %v", err)
	}
	khz, err := m.cpu.TSCKHz()
	if err != nil || khz == 0 {
		t.Errorf("TSCKHz() = %d, %v; want > 0", khz, err)
	}
	if err := m.cpu.SetTSCKHz(khz); err != nil {
		t.Errorf("SetTSCKHz(%d) = %v", khz, err)
	}
	// Paging is off in the reset state: linear = physical.
	gpa, valid, err := m.cpu.Translate(0x12345)
	if err != nil || !valid || gpa != 0x12345 {
		t.Errorf("Translate(0x12345) = %#x, %v, %v; want 0x12345, true, nil", gpa, valid, err)
	}
}

func TestSetUserMemoryRegionErrors(t *testing.T) {
	m := newTestMachine(t, 0)
	base := SliceAddr(m.mem)
	tests := []struct {
		name  string
		r     UserMemoryRegion
		errno unix.Errno
	}{
		{"unaligned address", UserMemoryRegion{Slot: 1, GuestPhysAddr: 1 << 30, MemorySize: 4096, UserspaceAddr: base + 1}, unix.EINVAL},
		{"unaligned size", UserMemoryRegion{Slot: 1, GuestPhysAddr: 1 << 30, MemorySize: 4095, UserspaceAddr: base}, unix.EINVAL},
		{"unaligned GPA", UserMemoryRegion{Slot: 1, GuestPhysAddr: 1<<30 + 1, MemorySize: 4096, UserspaceAddr: base}, unix.EINVAL},
		{"overlapping slot", UserMemoryRegion{Slot: 1, GuestPhysAddr: 0x1000, MemorySize: 4096, UserspaceAddr: base}, unix.EEXIST},
		{"resize existing slot", UserMemoryRegion{Slot: 0, MemorySize: testSlotSize / 2, UserspaceAddr: base}, unix.EINVAL},
	}
	for _, tt := range tests {
		err := m.vm.SetUserMemoryRegion(tt.r)
		wantIoctlErr(t, tt.name+": SetUserMemoryRegion", err, "KVM_SET_USER_MEMORY_REGION", tt.errno)
	}
	// Deleting a slot (size 0) and re-adding it works.
	if err := m.vm.SetUserMemoryRegion(UserMemoryRegion{Slot: 0}); err != nil {
		t.Errorf("SetUserMemoryRegion(delete slot 0) = %v", err)
	}
	r := UserMemoryRegion{Slot: 0, Flags: MemReadonly, MemorySize: testSlotSize, UserspaceAddr: base}
	if err := m.vm.SetUserMemoryRegion(r); err != nil {
		t.Errorf("SetUserMemoryRegion(%+v) = %v", r, err)
	}
}

func TestVCPURoundTrip(t *testing.T) {
	m := newTestMachine(t, 0)
	cpu := m.cpu

	// CPUID first: XCR0 and some MSRs are validated against it.
	sup, err := m.sys.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	want := CPUIDForVCPU(sup, 0, 1)
	if err := cpu.SetCPUID(want); err != nil {
		t.Fatalf("SetCPUID(%d entries) = %v", len(want), err)
	}
	t.Run("CPUID", func(t *testing.T) {
		got, err := cpu.CPUID()
		if err != nil {
			t.Fatalf("CPUID() = %v", err)
		}
		// Every entry set comes back, except that a kernel may leave out
		// leaves that are all zero (6.18's KVM drops 0x1d, 0x1e and 0x24
		// so), which read as zero all the same.
		type leaf struct{ fn, index uint32 }
		set := map[leaf]bool{}
		for _, e := range want {
			set[leaf{e.Function, e.Index}] = true
		}
		back := map[leaf]bool{}
		for _, e := range got {
			if !set[leaf{e.Function, e.Index}] {
				t.Errorf("CPUID() has leaf %#x index %d, which was not set", e.Function, e.Index)
			}
			back[leaf{e.Function, e.Index}] = true
		}
		for _, e := range want {
			if !back[leaf{e.Function, e.Index}] && e.EAX|e.EBX|e.ECX|e.EDX != 0 {
				t.Errorf("CPUID() lacks leaf %#x index %d (%+v)", e.Function, e.Index, e)
			}
		}
		for _, e := range got {
			if e.Function == 1 {
				if e.EBX>>16 != 0x0001 || e.ECX&CPUIDHypervisorBit == 0 {
					t.Errorf("CPUID() leaf 1 EBX = %#x ECX = %#x, want APIC id 0, count 1, hypervisor bit", e.EBX, e.ECX)
				}
			}
		}
	})

	t.Run("Regs", func(t *testing.T) {
		want := Regs{RAX: 0x1111, RBX: 0x2222, RCX: 0x3333, RDX: 0x4444, RSI: 0x5555, RDI: 0x6666,
			RSP: 0x7777, RBP: 0x8888, R8: 8, R9: 9, R10: 10, R11: 11, R12: 12, R13: 13, R14: 14,
			R15: 0xffff_ffff_ffff_ff15, RIP: 0x1234, RFLAGS: RFLAGSReserved | 1<<0 | 1<<6}
		if err := cpu.SetRegs(want); err != nil {
			t.Fatalf("SetRegs(%+v) = %v", want, err)
		}
		if got, err := cpu.Regs(); err != nil || got != want {
			t.Errorf("Regs() = %+v, %v; want %+v", got, err, want)
		}
	})

	t.Run("Sregs", func(t *testing.T) {
		s, err := cpu.Sregs()
		if err != nil {
			t.Fatal(err)
		}
		s.GDT = DTable{Base: 0x1000, Limit: 0x37}
		s.IDT = DTable{Base: 0x2000, Limit: 0xfff}
		s.CR2 = 0xdead_b000
		s.CR3 = 0x5000
		s.DS.Base, s.DS.Selector = 0x10000, 0x1000
		s.CS.Base, s.CS.Selector = 0, 0
		if err := cpu.SetSregs(s); err != nil {
			t.Fatalf("SetSregs = %v", err)
		}
		got, err := cpu.Sregs()
		if err != nil {
			t.Fatal(err)
		}
		if got.GDT != s.GDT || got.IDT != s.IDT || got.CR2 != s.CR2 || got.CR3 != s.CR3 ||
			got.DS.Base != s.DS.Base || got.DS.Selector != s.DS.Selector || got.CS.Base != 0 || got.CS.Selector != 0 {
			t.Errorf("Sregs() = GDT %+v IDT %+v CR2 %#x CR3 %#x DS %#x:%#x CS %#x:%#x; want GDT %+v IDT %+v CR2 %#x CR3 %#x DS %#x:%#x CS 0:0",
				got.GDT, got.IDT, got.CR2, got.CR3, got.DS.Selector, got.DS.Base, got.CS.Selector, got.CS.Base,
				s.GDT, s.IDT, s.CR2, s.CR3, s.DS.Selector, s.DS.Base)
		}
	})

	t.Run("FPU", func(t *testing.T) {
		f, err := cpu.FPU()
		if err != nil {
			t.Fatal(err)
		}
		// KVM_GET_FPU/KVM_SET_FPU do not carry MXCSR (the kernel copies
		// every field but that one); XSave covers it.
		f.FCW = 0x027f
		for i := range f.XMM[3] {
			f.XMM[3][i] = byte(0xa0 + i)
		}
		for i := 0; i < 10; i++ {
			f.FPR[2][i] = byte(0x50 + i)
		}
		if err := cpu.SetFPU(f); err != nil {
			t.Fatalf("SetFPU = %v", err)
		}
		got, err := cpu.FPU()
		if err != nil || got.FCW != f.FCW || got.XMM[3] != f.XMM[3] || [10]byte(got.FPR[2][:10]) != [10]byte(f.FPR[2][:10]) {
			t.Errorf("FPU() = FCW %#x XMM3 % x FPR2 % x, %v; want %#x % x % x",
				got.FCW, got.XMM[3], got.FPR[2][:10], err, f.FCW, f.XMM[3], f.FPR[2][:10])
		}
	})

	t.Run("XSave", func(t *testing.T) {
		x, err := cpu.XSave()
		if err != nil || len(x) < 4096 {
			t.Fatalf("XSave() = %d bytes, %v; want at least 4096", len(x), err)
		}
		// Legacy region: MXCSR at 24, XMM5 at 160+5*16. The SSE component
		// is loaded only if XSTATE_BV (offset 512) has bit 1.
		const mxcsr = 0x1fa0
		binary.LittleEndian.PutUint32(x[24:], mxcsr)
		xmm5 := x[160+5*16 : 160+6*16]
		for i := range xmm5 {
			xmm5[i] = byte(0xc0 + i)
		}
		binary.LittleEndian.PutUint64(x[512:], binary.LittleEndian.Uint64(x[512:])|3)
		if err := cpu.SetXSave(x); err != nil {
			t.Fatalf("SetXSave(%d bytes) = %v", len(x), err)
		}
		got, err := cpu.XSave()
		if err != nil || len(got) != len(x) {
			t.Fatalf("XSave() after SetXSave = %d bytes, %v; want %d", len(got), err, len(x))
		}
		if g := binary.LittleEndian.Uint32(got[24:]); g != mxcsr || !slices.Equal(got[160+5*16:160+6*16], xmm5) {
			t.Errorf("XSave() after SetXSave: MXCSR %#x XMM5 % x; want %#x % x", g, got[160+5*16:160+6*16], mxcsr, xmm5)
		}
		// The FPU view sees the same register.
		if f, err := cpu.FPU(); err != nil || !slices.Equal(f.XMM[5][:], xmm5) {
			t.Errorf("FPU().XMM[5] = % x, %v; want % x", f.XMM[5], err, xmm5)
		}
		// KVM reads the whole KVM_CAP_XSAVE2-sized area: a shorter buffer
		// is refused before the ioctl.
		for _, n := range []int{0, 4095, len(x) - 1} {
			if err := cpu.SetXSave(x[:n]); err == nil || !strings.Contains(err.Error(), "want at least") {
				t.Errorf("SetXSave(%d of %d bytes) = %v, want a size error", n, len(x), err)
			}
		}
	})

	t.Run("XCRs", func(t *testing.T) {
		x, err := cpu.XCRs()
		if err != nil || x.NrXCRs == 0 || x.XCRs[0].XCR != 0 {
			t.Fatalf("XCRs() = %+v, %v; want XCR0", x, err)
		}
		// x87 | SSE | AVX if the guest may use it.
		want := uint64(3)
		for _, e := range sup {
			if e.Function == 0xd && e.Index == 0 && e.EAX&4 != 0 {
				want = 7
			}
		}
		x.NrXCRs = 1
		x.XCRs[0].Value = want
		if err := cpu.SetXCRs(x); err != nil {
			t.Fatalf("SetXCRs(XCR0 = %#x) = %v", want, err)
		}
		got, err := cpu.XCRs()
		if err != nil || got.XCRs[0].XCR != 0 || got.XCRs[0].Value != want {
			t.Errorf("XCRs() = %+v, %v; want XCR0 = %#x", got.XCRs[0], err, want)
		}
	})

	t.Run("MSRs", func(t *testing.T) {
		want := []MSREntry{
			{Index: msrSysenterCS, Data: 0x10},
			{Index: msrSysenterESP, Data: 0xffff_8000_0000_1230},
			{Index: msrSysenterEIP, Data: 0xffff_ffff_8100_4560},
			{Index: msrSTAR, Data: 0x0023_0010_0000_0000},
			{Index: msrLSTAR, Data: 0xffff_ffff_8123_4000},
		}
		if err := cpu.SetMSRs(want); err != nil {
			t.Fatalf("SetMSRs(%+v) = %v", want, err)
		}
		idx := make([]uint32, len(want))
		for i, e := range want {
			idx[i] = e.Index
		}
		got, err := cpu.MSRs(idx)
		if err != nil || !slices.Equal(got, want) {
			t.Errorf("MSRs(%#x) = %+v, %v; want %+v", idx, got, err, want)
		}
		if got, err := cpu.MSRs(nil); err != nil || len(got) != 0 {
			t.Errorf("MSRs(nil) = %+v, %v; want none", got, err)
		}
		// An MSR that does not exist stops the batch at its index.
		got, err = cpu.MSRs([]uint32{msrSysenterCS, 0xdead0000, msrSTAR})
		if err == nil || len(got) != 1 || got[0] != want[0] || !strings.Contains(err.Error(), "0xdead0000") {
			t.Errorf("MSRs(0x174, 0xdead0000, STAR) = %+v, %v; want the first entry and an error naming 0xdead0000", got, err)
		}
		if err := cpu.SetMSRs([]MSREntry{{Index: 0xdead0000, Data: 1}}); err == nil || !strings.Contains(err.Error(), "0xdead0000") {
			t.Errorf("SetMSRs(0xdead0000) = %v, want an error naming the MSR", err)
		}
	})

	t.Run("LAPIC", func(t *testing.T) {
		l, err := cpu.LAPIC()
		if err != nil {
			t.Fatal(err)
		}
		put := func(l *LAPICState, reg int, v uint32) {
			l.Regs[reg], l.Regs[reg+1], l.Regs[reg+2], l.Regs[reg+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		}
		get := func(l *LAPICState, reg int) uint32 {
			return uint32(l.Regs[reg]) | uint32(l.Regs[reg+1])<<8 | uint32(l.Regs[reg+2])<<16 | uint32(l.Regs[reg+3])<<24
		}
		const tpr, lvtTimer, lvt0 = 0x80, 0x320, 0x350
		put(&l, tpr, 0x30)
		put(&l, lvtTimer, 0x0001_00ef) // masked, vector 0xef
		put(&l, lvt0, 0x0000_0700)     // ExtINT
		if err := cpu.SetLAPIC(l); err != nil {
			t.Fatalf("SetLAPIC = %v", err)
		}
		got, err := cpu.LAPIC()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range []int{tpr, lvtTimer, lvt0} {
			if g, w := get(&got, r), get(&l, r); g != w {
				t.Errorf("LAPIC() register %#x = %#x, want %#x", r, g, w)
			}
		}
	})

	t.Run("Events", func(t *testing.T) {
		e, err := cpu.Events()
		if err != nil {
			t.Fatal(err)
		}
		e.NMI.Masked = 1
		if err := cpu.SetEvents(e); err != nil {
			t.Fatalf("SetEvents(NMI masked) = %v", err)
		}
		got, err := cpu.Events()
		if err != nil || got.NMI.Masked != 1 {
			t.Errorf("Events().NMI = %+v, %v; want Masked 1", got.NMI, err)
		}
	})

	t.Run("MPState", func(t *testing.T) {
		for _, s := range []uint32{MPStateHalted, MPStateRunnable} {
			if err := cpu.SetMPState(MPState{State: s}); err != nil {
				t.Fatalf("SetMPState(%d) = %v", s, err)
			}
			if got, err := cpu.MPState(); err != nil || got.State != s {
				t.Errorf("MPState() = %+v, %v; want %d", got, err, s)
			}
		}
	})

	t.Run("DebugRegs", func(t *testing.T) {
		d, err := cpu.DebugRegs()
		if err != nil {
			t.Fatal(err)
		}
		d.DB = [4]uint64{0x1000, 0x2000, 0xffff_8000_0000_3000, 0x4000}
		d.DR7 = 0x400 | 0x3 | 0x3<<16 // L0/G0, RW0 = read/write
		d.DR6 = 0xffff0ff0 | 1<<14
		if err := cpu.SetDebugRegs(d); err != nil {
			t.Fatalf("SetDebugRegs = %v", err)
		}
		got, err := cpu.DebugRegs()
		if err != nil || got.DB != d.DB || got.DR7 != d.DR7 || got.DR6 != d.DR6 {
			t.Errorf("DebugRegs() = DB %#x DR6 %#x DR7 %#x, %v; want %#x %#x %#x", got.DB, got.DR6, got.DR7, err, d.DB, d.DR6, d.DR7)
		}
	})
}

func TestVMDeviceRoundTrip(t *testing.T) {
	m := newTestMachine(t, 0)
	vm := m.vm

	t.Run("IRQChip", func(t *testing.T) {
		type change struct{ off, val byte }
		tests := []struct {
			chip uint32
			set  []change
		}{
			// struct kvm_pic_state: imr at 2, irq_base at 5.
			{IRQChipPICMaster, []change{{2, 0xa5}, {5, 0x20}}},
			{IRQChipPICSlave, []change{{2, 0x5a}, {5, 0x28}}},
			// struct kvm_ioapic_state: id at 12, redirtbl[5] at 24+5*8:
			// masked, vector 0x35.
			{IRQChipIOAPIC, []change{{12, 0x3 << 0}, {24 + 5*8, 0x35}, {24 + 5*8 + 2, 0x01}}},
		}
		for _, tt := range tests {
			c, err := vm.IRQChip(tt.chip)
			if err != nil || c.ChipID != tt.chip {
				t.Fatalf("IRQChip(%d) = chip %d, %v", tt.chip, c.ChipID, err)
			}
			for _, ch := range tt.set {
				c.Chip[ch.off] = ch.val
			}
			if err := vm.SetIRQChip(c); err != nil {
				t.Fatalf("SetIRQChip(%d) = %v", tt.chip, err)
			}
			got, err := vm.IRQChip(tt.chip)
			if err != nil {
				t.Fatal(err)
			}
			if got.Chip != c.Chip {
				t.Errorf("IRQChip(%d) after SetIRQChip = % x, want % x", tt.chip, got.Chip[:64], c.Chip[:64])
			}
		}
		_, err := vm.IRQChip(7)
		wantIoctlErr(t, "IRQChip(7)", err, "KVM_GET_IRQCHIP", unix.EINVAL)
	})

	t.Run("PIT2", func(t *testing.T) {
		p, err := vm.PIT2()
		if err != nil {
			t.Fatal(err)
		}
		ch := &p.Channels[2]
		ch.Count = 0x1234
		ch.Mode = 3
		ch.RWMode = 3
		ch.BCD = 0
		ch.Gate = 1
		if err := vm.SetPIT2(p); err != nil {
			t.Fatalf("SetPIT2 = %v", err)
		}
		got, err := vm.PIT2()
		g := got.Channels[2]
		if err != nil || g.Count != 0x1234 || g.Mode != 3 || g.RWMode != 3 || g.Gate != 1 {
			t.Errorf("PIT2().Channels[2] = %+v, %v; want Count 0x1234 Mode 3 RWMode 3 Gate 1", g, err)
		}
	})

	t.Run("Clock", func(t *testing.T) {
		const want = 1 << 40
		start := time.Now()
		if err := vm.SetClock(ClockData{Clock: want}); err != nil {
			t.Fatalf("SetClock(%d) = %v", uint64(want), err)
		}
		got, err := vm.Clock()
		// Only the time between the two calls may have passed (and a
		// millisecond for the clocks' granularity).
		if passed := uint64(time.Since(start) + time.Millisecond); err != nil || got.Clock < want || got.Clock > want+passed {
			t.Errorf("Clock() = %d, %v; want at most %v after %d", got.Clock, err, time.Duration(passed), uint64(want))
		}
	})

	t.Run("IRQLine", func(t *testing.T) {
		// Make ISA line 4 level-triggered (ELCR, offset 14 of struct
		// kvm_pic_state); then the master PIC's IRR (offset 1) follows the
		// line: set while raised, clear once lowered.
		c, err := vm.IRQChip(IRQChipPICMaster)
		if err != nil {
			t.Fatal(err)
		}
		c.Chip[14] |= 1 << 4
		if err := vm.SetIRQChip(c); err != nil {
			t.Fatal(err)
		}
		for _, level := range []bool{true, false, true, false} {
			if err := vm.IRQLine(4, level); err != nil {
				t.Fatalf("IRQLine(4, %v) = %v", level, err)
			}
			c, err := vm.IRQChip(IRQChipPICMaster)
			if got := c.Chip[1]&(1<<4) != 0; err != nil || got != level {
				t.Errorf("master PIC IRR bit 4 after IRQLine(4, %v) = %v, %v; want %v", level, got, err, level)
			}
		}
	})

	t.Run("EventFDs", func(t *testing.T) {
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(efd)
		if err := vm.IRQFD(efd, 5, 0); err != nil {
			t.Errorf("IRQFD(%d, 5, 0) = %v", efd, err)
		}
		if err := vm.IRQFD(efd, 5, IRQFDDeassign); err != nil {
			t.Errorf("IRQFD(%d, 5, deassign) = %v", efd, err)
		}
		if err := vm.IOEventFD(efd, 0x510, 2, 0, IOEventFDPIO); err != nil {
			t.Errorf("IOEventFD(port 0x510) = %v", err)
		}
		// The same registration twice is refused.
		wantIoctlErr(t, "IOEventFD(port 0x510) twice", vm.IOEventFD(efd, 0x510, 2, 0, IOEventFDPIO), "KVM_IOEVENTFD", unix.EEXIST)
		if err := vm.IOEventFD(efd, 0x510, 2, 0, IOEventFDPIO|IOEventFDDeassign); err != nil {
			t.Errorf("IOEventFD(port 0x510, deassign) = %v", err)
		}
		if err := vm.IOEventFD(efd, 0xd000_0000, 4, 7, IOEventFDDatamatch); err != nil {
			t.Errorf("IOEventFD(MMIO, datamatch) = %v", err)
		}
	})
}

func TestRunImmediateExit(t *testing.T) {
	m := newTestMachine(t, 0)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	m.cpu.SetImmediateExit(true)
	err := m.cpu.Run()
	if !IsInterrupted(err) {
		t.Fatalf("Run() with immediate_exit = %v, want EINTR", err)
	}
	wantIoctlErr(t, "Run() with immediate_exit", err, "KVM_RUN", unix.EINTR)
	// It stays set until cleared: a second Run exits at once too.
	if err := m.cpu.Run(); !IsInterrupted(err) {
		t.Errorf("second Run() with immediate_exit = %v, want EINTR", err)
	}
	m.cpu.SetImmediateExit(false)
}

func TestStatsKVM(t *testing.T) {
	m := newTestMachine(t, 0)
	for _, tt := range []struct {
		name  string
		open  func() (*Stats, error)
		stat  string
		vcpus bool
	}{
		{"VM", m.vm.StatsFD, "pages_4k", false},
		{"VCPU", m.cpu.StatsFD, "exits", true},
	} {
		s, err := tt.open()
		if err != nil {
			t.Fatalf("%s.StatsFD() = %v", tt.name, err)
		}
		defer s.Close()
		if s.ID == "" || len(s.Descs) == 0 {
			t.Errorf("%s.StatsFD() = ID %q, %d descriptors; want an ID and descriptors", tt.name, s.ID, len(s.Descs))
		}
		for _, d := range s.Descs {
			if !s.Has(d.Name) {
				t.Errorf("%s stats: Has(%q) = false for a listed descriptor", tt.name, d.Name)
			}
			if _, err := s.Value(d.Name); err != nil {
				t.Errorf("%s stats: Value(%q) = %v", tt.name, d.Name, err)
			}
		}
		if !s.Has(tt.stat) {
			t.Errorf("%s stats: Has(%q) = false, want true", tt.name, tt.stat)
		}
		if _, err := s.Value("no_such_stat"); err == nil || !strings.Contains(err.Error(), "no_such_stat") {
			t.Errorf("%s stats: Value(no_such_stat) = %v, want an error naming it", tt.name, err)
		}
	}
}

func TestDirtyLogKVM(t *testing.T) {
	const words = testSlotSize / PageSize / 64
	t.Run("manual protect", func(t *testing.T) {
		sys := openKVM(t)
		vm, err := sys.CreateVM()
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.EnableManualDirtyLogProtect(false); err != nil {
			t.Fatalf("EnableManualDirtyLogProtect(false) = %v", err)
		}
		mem := mmapAnon(t, testSlotSize)
		for _, r := range []UserMemoryRegion{
			{Slot: 0, Flags: MemLogDirtyPages, MemorySize: testSlotSize, UserspaceAddr: SliceAddr(mem)},
			{Slot: 1, GuestPhysAddr: 1 << 30, MemorySize: testSlotSize, UserspaceAddr: SliceAddr(mem)},
		} {
			if err := vm.SetUserMemoryRegion(r); err != nil {
				t.Fatalf("SetUserMemoryRegion(%+v) = %v", r, err)
			}
		}
		bitmap := make([]uint64, words)
		for i := range bitmap {
			bitmap[i] = ^uint64(0) // must be overwritten
		}
		if err := vm.GetDirtyLog(0, bitmap); err != nil {
			t.Fatalf("GetDirtyLog(0) = %v", err)
		}
		if i := slices.IndexFunc(bitmap, func(w uint64) bool { return w != 0 }); i >= 0 {
			t.Errorf("GetDirtyLog(0) on a fresh slot: word %d = %#x, want all zero", i, bitmap[i])
		}
		if err := vm.ClearDirtyLog(0, 0, testSlotSize/PageSize, bitmap); err != nil {
			t.Errorf("ClearDirtyLog(0, 0, %d) = %v", testSlotSize/PageSize, err)
		}
		if err := vm.ClearDirtyLog(0, 64, 64, bitmap[:1]); err != nil {
			t.Errorf("ClearDirtyLog(0, 64, 64) = %v", err)
		}
		if err := vm.ClearDirtyLog(0, 0, testSlotSize/PageSize, bitmap[:words-1]); err == nil || !strings.Contains(err.Error(), "too small") {
			t.Errorf("ClearDirtyLog with a %d-word bitmap = %v, want a too-small error", words-1, err)
		}
		wantIoctlErr(t, "ClearDirtyLog(first page 1)", vm.ClearDirtyLog(0, 1, 64, bitmap), "KVM_CLEAR_DIRTY_LOG", unix.EINVAL)
		wantIoctlErr(t, "ClearDirtyLog(past the slot)", vm.ClearDirtyLog(0, testSlotSize/PageSize, 64, bitmap), "KVM_CLEAR_DIRTY_LOG", unix.EINVAL)
		// A slot without dirty logging has no log.
		wantIoctlErr(t, "GetDirtyLog(1) without logging", vm.GetDirtyLog(1, bitmap), "KVM_GET_DIRTY_LOG", unix.ENOENT)
		wantIoctlErr(t, "ClearDirtyLog(1) without logging", vm.ClearDirtyLog(1, 0, 64, bitmap), "KVM_CLEAR_DIRTY_LOG", unix.ENOENT)
		wantIoctlErr(t, "GetDirtyLog(9) no such slot", vm.GetDirtyLog(9, bitmap), "KVM_GET_DIRTY_LOG", unix.ENOENT)
		if err := vm.GetDirtyLog(0, nil); err == nil {
			t.Errorf("GetDirtyLog(0, nil) = nil error, want one")
		}
	})
	t.Run("initially set", func(t *testing.T) {
		sys := openKVM(t)
		vm, err := sys.CreateVM()
		if err != nil {
			t.Fatal(err)
		}
		defer vm.Close()
		if err := vm.EnableManualDirtyLogProtect(true); err != nil {
			t.Fatalf("EnableManualDirtyLogProtect(true) = %v", err)
		}
		mem := mmapAnon(t, testSlotSize)
		r := UserMemoryRegion{Slot: 0, Flags: MemLogDirtyPages, MemorySize: testSlotSize, UserspaceAddr: SliceAddr(mem)}
		if err := vm.SetUserMemoryRegion(r); err != nil {
			t.Fatalf("SetUserMemoryRegion(%+v) = %v", r, err)
		}
		// With KVM_DIRTY_LOG_INITIALLY_SET every page starts dirty, until
		// cleared.
		bitmap := make([]uint64, words)
		if err := vm.GetDirtyLog(0, bitmap); err != nil {
			t.Fatalf("GetDirtyLog(0) = %v", err)
		}
		for i, w := range bitmap {
			if w != ^uint64(0) {
				t.Fatalf("GetDirtyLog(0) with initially-set: word %d = %#x, want all ones", i, w)
			}
		}
		clear := make([]uint64, 1)
		clear[0] = 0xff
		if err := vm.ClearDirtyLog(0, 64, 64, clear); err != nil {
			t.Fatalf("ClearDirtyLog(0, 64, 64, 0xff) = %v", err)
		}
		if err := vm.GetDirtyLog(0, bitmap); err != nil {
			t.Fatal(err)
		}
		for i, w := range bitmap {
			want := ^uint64(0)
			if i == 1 {
				want = ^uint64(0xff)
			}
			if w != want {
				t.Errorf("GetDirtyLog(0) after clearing pages 64-71: word %d = %#x, want %#x", i, w, want)
			}
		}
	})
}
