package arch

import (
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"strconv"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl direction bits (_IOC_NONE, _IOC_WRITE, _IOC_READ).
const (
	dirNone  = 0
	dirWrite = 1
	dirRead  = 2
	dirRW    = dirRead | dirWrite
)

// ioctlSpec is what <linux/kvm.h> says about one ioctl: its name, direction
// and the size of its argument (0 for _IO).
type ioctlSpec struct {
	ident string // Go constant name in ioctl.go
	req   uintptr
	name  string
	dir   uintptr
	size  uintptr
}

// ioctlSpecs lists every ioctl in ioctl.go. The sizes of struct arguments come
// from the Go types; variable-length structs are sized by their fixed header,
// as the kernel's _IOWR(..., struct kvm_cpuid2) etc. are.
var ioctlSpecs = []ioctlSpec{
	{"kvmGetAPIVersion", kvmGetAPIVersion, "KVM_GET_API_VERSION", dirNone, 0},
	{"kvmCreateVM", kvmCreateVM, "KVM_CREATE_VM", dirNone, 0},
	{"kvmGetMSRIndexList", kvmGetMSRIndexList, "KVM_GET_MSR_INDEX_LIST", dirRW, 4}, // struct kvm_msr_list header
	{"kvmCheckExtension", kvmCheckExtension, "KVM_CHECK_EXTENSION", dirNone, 0},
	{"kvmGetVCPUMmapSize", kvmGetVCPUMmapSize, "KVM_GET_VCPU_MMAP_SIZE", dirNone, 0},
	{"kvmGetSupportedCPUID", kvmGetSupportedCPUID, "KVM_GET_SUPPORTED_CPUID", dirRW, 8}, // struct kvm_cpuid2 header
	{"kvmGetEmulatedCPUID", kvmGetEmulatedCPUID, "KVM_GET_EMULATED_CPUID", dirRW, 8},    // struct kvm_cpuid2 header
	{"kvmGetMSRFeatureIdxLst", kvmGetMSRFeatureIdxLst, "KVM_GET_MSR_FEATURE_INDEX_LIST", dirRW, 4},
	{"kvmCreateVCPU", kvmCreateVCPU, "KVM_CREATE_VCPU", dirNone, 0},
	{"kvmGetDirtyLog", kvmGetDirtyLog, "KVM_GET_DIRTY_LOG", dirWrite, sizeOf[dirtyLog]()},
	{"kvmSetUserMemoryRegion", kvmSetUserMemoryRegion, "KVM_SET_USER_MEMORY_REGION", dirWrite, sizeOf[UserMemoryRegion]()},
	{"kvmSetTSSAddr", kvmSetTSSAddr, "KVM_SET_TSS_ADDR", dirNone, 0},
	{"kvmSetIdentityMapAddr", kvmSetIdentityMapAddr, "KVM_SET_IDENTITY_MAP_ADDR", dirWrite, sizeOf[uint64]()},
	{"kvmCreateIRQChip", kvmCreateIRQChip, "KVM_CREATE_IRQCHIP", dirNone, 0},
	{"kvmIRQLine", kvmIRQLine, "KVM_IRQ_LINE", dirWrite, sizeOf[irqLevel]()},
	{"kvmGetIRQChip", kvmGetIRQChip, "KVM_GET_IRQCHIP", dirRW, sizeOf[IRQChip]()},
	// The kernel really declares KVM_SET_IRQCHIP as _IOR.
	{"kvmSetIRQChip", kvmSetIRQChip, "KVM_SET_IRQCHIP", dirRead, sizeOf[IRQChip]()},
	{"kvmIRQLineStatus", kvmIRQLineStatus, "KVM_IRQ_LINE_STATUS", dirRW, sizeOf[irqLevel]()},
	{"kvmIRQFD", kvmIRQFD, "KVM_IRQFD", dirWrite, sizeOf[irqfd]()},
	{"kvmCreatePIT2", kvmCreatePIT2, "KVM_CREATE_PIT2", dirWrite, sizeOf[PITConfig]()},
	{"kvmIOEventFD", kvmIOEventFD, "KVM_IOEVENTFD", dirWrite, sizeOf[ioeventfd]()},
	{"kvmSetClock", kvmSetClock, "KVM_SET_CLOCK", dirWrite, sizeOf[ClockData]()},
	{"kvmGetClock", kvmGetClock, "KVM_GET_CLOCK", dirRead, sizeOf[ClockData]()},
	{"kvmGetPIT2", kvmGetPIT2, "KVM_GET_PIT2", dirRead, sizeOf[PITState2]()},
	{"kvmSetPIT2", kvmSetPIT2, "KVM_SET_PIT2", dirWrite, sizeOf[PITState2]()},
	{"kvmEnableCap", kvmEnableCap, "KVM_ENABLE_CAP", dirWrite, sizeOf[enableCap]()},
	{"kvmResetDirtyRings", kvmResetDirtyRings, "KVM_RESET_DIRTY_RINGS", dirNone, 0},
	{"kvmClearDirtyLog", kvmClearDirtyLog, "KVM_CLEAR_DIRTY_LOG", dirRW, sizeOf[clearDirtyLog]()},
	{"kvmGetStatsFD", kvmGetStatsFD, "KVM_GET_STATS_FD", dirNone, 0},
	{"kvmSetGSIRouting", kvmSetGSIRouting, "KVM_SET_GSI_ROUTING", dirWrite, 8}, // struct kvm_irq_routing header
	{"kvmRun", kvmRun, "KVM_RUN", dirNone, 0},
	{"kvmGetRegs", kvmGetRegs, "KVM_GET_REGS", dirRead, sizeOf[Regs]()},
	{"kvmSetRegs", kvmSetRegs, "KVM_SET_REGS", dirWrite, sizeOf[Regs]()},
	{"kvmGetSregs", kvmGetSregs, "KVM_GET_SREGS", dirRead, sizeOf[Sregs]()},
	{"kvmSetSregs", kvmSetSregs, "KVM_SET_SREGS", dirWrite, sizeOf[Sregs]()},
	{"kvmTranslate", kvmTranslate, "KVM_TRANSLATE", dirRW, sizeOf[translation]()},
	{"kvmInterrupt", kvmInterrupt, "KVM_INTERRUPT", dirWrite, sizeOf[interrupt]()},
	{"kvmGetMSRs", kvmGetMSRs, "KVM_GET_MSRS", dirRW, 8}, // struct kvm_msrs header
	{"kvmSetMSRs", kvmSetMSRs, "KVM_SET_MSRS", dirWrite, 8},
	{"kvmSetCPUID2", kvmSetCPUID2, "KVM_SET_CPUID2", dirWrite, 8}, // struct kvm_cpuid2 header
	{"kvmGetCPUID2", kvmGetCPUID2, "KVM_GET_CPUID2", dirRW, 8},
	{"kvmGetFPU", kvmGetFPU, "KVM_GET_FPU", dirRead, sizeOf[FPU]()},
	{"kvmSetFPU", kvmSetFPU, "KVM_SET_FPU", dirWrite, sizeOf[FPU]()},
	{"kvmGetLAPIC", kvmGetLAPIC, "KVM_GET_LAPIC", dirRead, sizeOf[LAPICState]()},
	{"kvmSetLAPIC", kvmSetLAPIC, "KVM_SET_LAPIC", dirWrite, sizeOf[LAPICState]()},
	{"kvmGetMPState", kvmGetMPState, "KVM_GET_MP_STATE", dirRead, sizeOf[MPState]()},
	{"kvmSetMPState", kvmSetMPState, "KVM_SET_MP_STATE", dirWrite, sizeOf[MPState]()},
	{"kvmNMI", kvmNMI, "KVM_NMI", dirNone, 0},
	{"kvmGetVCPUEvents", kvmGetVCPUEvents, "KVM_GET_VCPU_EVENTS", dirRead, sizeOf[VCPUEvents]()},
	{"kvmSetVCPUEvents", kvmSetVCPUEvents, "KVM_SET_VCPU_EVENTS", dirWrite, sizeOf[VCPUEvents]()},
	{"kvmGetDebugRegs", kvmGetDebugRegs, "KVM_GET_DEBUGREGS", dirRead, sizeOf[DebugRegs]()},
	{"kvmSetDebugRegs", kvmSetDebugRegs, "KVM_SET_DEBUGREGS", dirWrite, sizeOf[DebugRegs]()},
	{"kvmGetXSave", kvmGetXSave, "KVM_GET_XSAVE", dirRead, sizeOf[XSave]()},
	{"kvmSetXSave", kvmSetXSave, "KVM_SET_XSAVE", dirWrite, sizeOf[XSave]()},
	{"kvmGetXCRs", kvmGetXCRs, "KVM_GET_XCRS", dirRead, sizeOf[XCRs]()},
	{"kvmSetXCRs", kvmSetXCRs, "KVM_SET_XCRS", dirWrite, sizeOf[XCRs]()},
	{"kvmGetXSave2", kvmGetXSave2, "KVM_GET_XSAVE2", dirRead, sizeOf[XSave]()},
	{"kvmKVMClockCtrl", kvmKVMClockCtrl, "KVM_KVMCLOCK_CTRL", dirNone, 0},
	{"kvmGetTSCKHz", kvmGetTSCKHz, "KVM_GET_TSC_KHZ", dirNone, 0},
	{"kvmSetTSCKHz", kvmSetTSCKHz, "KVM_SET_TSC_KHZ", dirNone, 0},
}

func TestIoctlSizes(t *testing.T) {
	for _, s := range ioctlSpecs {
		if got := ioctlSize(s.req); got != s.size {
			t.Errorf("ioctlSize(%s = %#x) = %d, want %d (size of the Go argument)", s.ident, s.req, got, s.size)
		}
		if got := s.req >> 30; got != s.dir {
			t.Errorf("direction of %s (%#x) = %d, want %d", s.ident, s.req, got, s.dir)
		}
		if got := (s.req >> 8) & 0xff; got != 0xae {
			t.Errorf("type of %s (%#x) = %#x, want KVMIO (0xae)", s.ident, s.req, got)
		}
		if got := ioctlNames[s.req]; got != s.name {
			t.Errorf("ioctlNames[%s] = %q, want %q", s.ident, got, s.name)
		}
	}
}

// TestStructSizes checks the Go mirrors of kernel structs against the sizes
// and offsets of <linux/kvm.h> / <asm/kvm.h> on x86-64 (measured with gcc).
func TestStructSizes(t *testing.T) {
	tests := []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"Regs", sizeOf[Regs](), 144},
		{"Segment", sizeOf[Segment](), 24},
		{"DTable", sizeOf[DTable](), 16},
		{"Sregs", sizeOf[Sregs](), 312},
		{"FPU", sizeOf[FPU](), 416},
		{"XSave", sizeOf[XSave](), 4096},
		{"XCRs", sizeOf[XCRs](), 392},
		{"LAPICState", sizeOf[LAPICState](), 1024},
		{"MPState", sizeOf[MPState](), 4},
		{"VCPUEvents", sizeOf[VCPUEvents](), 64},
		{"DebugRegs", sizeOf[DebugRegs](), 128},
		{"MSREntry", sizeOf[MSREntry](), 16},
		{"CPUIDEntry", sizeOf[CPUIDEntry](), 40},
		{"IRQChip", sizeOf[IRQChip](), 520},
		{"PITChannelState", sizeOf[PITChannelState](), 24},
		{"PITState2", sizeOf[PITState2](), 112},
		{"PITConfig", sizeOf[PITConfig](), 64},
		{"ClockData", sizeOf[ClockData](), 48},
		{"UserMemoryRegion", sizeOf[UserMemoryRegion](), 32},
		{"dirtyLog", sizeOf[dirtyLog](), 16},
		{"clearDirtyLog", sizeOf[clearDirtyLog](), 24},
		{"enableCap", sizeOf[enableCap](), 104},
		{"irqLevel", sizeOf[irqLevel](), 8},
		{"irqfd", sizeOf[irqfd](), 32},
		{"ioeventfd", sizeOf[ioeventfd](), 64},
		{"translation", sizeOf[translation](), 24},
		{"interrupt", sizeOf[interrupt](), 4},
		// Offsets that padding mistakes would move.
		{"Sregs.GDT", unsafe.Offsetof(Sregs{}.GDT), 192},
		{"Sregs.CR0", unsafe.Offsetof(Sregs{}.CR0), 224},
		{"Sregs.EFER", unsafe.Offsetof(Sregs{}.EFER), 264},
		{"Sregs.InterruptBitmap", unsafe.Offsetof(Sregs{}.InterruptBitmap), 280},
		{"FPU.LastIP", unsafe.Offsetof(FPU{}.LastIP), 136},
		{"FPU.XMM", unsafe.Offsetof(FPU{}.XMM), 152},
		{"FPU.MXCSR", unsafe.Offsetof(FPU{}.MXCSR), 408},
		{"VCPUEvents.SIPIVector", unsafe.Offsetof(VCPUEvents{}.SIPIVector), 16},
		{"VCPUEvents.SMI", unsafe.Offsetof(VCPUEvents{}.SMI), 24},
		{"VCPUEvents.ExceptionHasPayload", unsafe.Offsetof(VCPUEvents{}.ExceptionHasPayload), 55},
		{"VCPUEvents.ExceptionPayload", unsafe.Offsetof(VCPUEvents{}.ExceptionPayload), 56},
		{"DebugRegs.DR7", unsafe.Offsetof(DebugRegs{}.DR7), 40},
		{"XCRs.XCRs", unsafe.Offsetof(XCRs{}.XCRs), 8},
		{"PITChannelState.CountLoadTime", unsafe.Offsetof(PITChannelState{}.CountLoadTime), 16},
		{"PITState2.Flags", unsafe.Offsetof(PITState2{}.Flags), 72},
		{"ClockData.Realtime", unsafe.Offsetof(ClockData{}.Realtime), 16},
		{"ClockData.HostTSC", unsafe.Offsetof(ClockData{}.HostTSC), 24},
		{"CPUIDEntry.EDX", unsafe.Offsetof(CPUIDEntry{}.EDX), 24},
		{"ioeventfd.Flags", unsafe.Offsetof(ioeventfd{}.Flags), 24},
		{"translation.Valid", unsafe.Offsetof(translation{}.Valid), 16},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("size/offset of %s = %d, want %d", tt.name, tt.got, tt.want)
		}
	}
}

// TestIoctlNames checks that every constant in ioctl.go's const block has a
// name in ioctlNames and an entry in ioctlSpecs (so a new ioctl cannot skip
// TestIoctlSizes).
func TestIoctlNames(t *testing.T) {
	f, err := parser.ParseFile(token.NewFileSet(), "ioctl.go", nil, 0)
	if err != nil {
		t.Fatalf("parse ioctl.go: %v", err)
	}
	specs := map[string]ioctlSpec{}
	for _, s := range ioctlSpecs {
		specs[s.ident] = s
	}
	consts := 0
	for _, decl := range f.Decls {
		gd, ok := decl.(*ast.GenDecl)
		if !ok || gd.Tok != token.CONST {
			continue
		}
		for _, spec := range gd.Specs {
			vs := spec.(*ast.ValueSpec)
			for i, id := range vs.Names {
				consts++
				lit, ok := vs.Values[i].(*ast.BasicLit)
				if !ok {
					t.Errorf("%s: value is not a literal", id.Name)
					continue
				}
				v, err := strconv.ParseUint(lit.Value, 0, 64)
				if err != nil {
					t.Errorf("%s: %v", id.Name, err)
					continue
				}
				if name, ok := ioctlNames[uintptr(v)]; !ok || !strings.HasPrefix(name, "KVM_") {
					t.Errorf("ioctlNames[%s (%#x)] = %q, %v; want a KVM_ name", id.Name, v, name, ok)
				}
				s, ok := specs[id.Name]
				if !ok {
					t.Errorf("%s is missing from ioctlSpecs", id.Name)
				} else if s.req != uintptr(v) {
					t.Errorf("ioctlSpecs[%s].req = %#x, want %#x", id.Name, s.req, v)
				}
			}
		}
	}
	if consts != len(ioctlSpecs) || consts != len(ioctlNames) {
		t.Errorf("ioctl.go has %d constants, ioctlSpecs %d, ioctlNames %d; want all equal", consts, len(ioctlSpecs), len(ioctlNames))
	}
}

func TestIoctlError(t *testing.T) {
	tests := []struct {
		req   uintptr
		errno unix.Errno
		want  string
	}{
		{kvmRun, unix.EINTR, "KVM_RUN: " + unix.EINTR.Error()},
		{kvmSetUserMemoryRegion, unix.EINVAL, "KVM_SET_USER_MEMORY_REGION: " + unix.EINVAL.Error()},
		{0xdead, unix.ENOTTY, "ioctl 0xdead: " + unix.ENOTTY.Error()},
	}
	for _, tt := range tests {
		err := ioctlError(tt.req, tt.errno)
		if got := err.Error(); got != tt.want {
			t.Errorf("ioctlError(%#x, %v).Error() = %q, want %q", tt.req, tt.errno, got, tt.want)
		}
		if !errors.Is(err, tt.errno) {
			t.Errorf("errors.Is(ioctlError(%#x, %v), %v) = false, want true", tt.req, tt.errno, tt.errno)
		}
		var ie *IoctlError
		if !errors.As(err, &ie) || ie.Err != tt.errno {
			t.Errorf("errors.As(ioctlError(%#x, %v)) = %v, want *IoctlError wrapping %v", tt.req, tt.errno, ie, tt.errno)
		}
	}
	if got := IsInterrupted(ioctlError(kvmRun, unix.EINTR)); !got {
		t.Errorf("IsInterrupted(KVM_RUN EINTR) = false, want true")
	}
	if got := IsInterrupted(ioctlError(kvmRun, unix.EAGAIN)); got {
		t.Errorf("IsInterrupted(KVM_RUN EAGAIN) = true, want false")
	}
}

func TestSliceAddr(t *testing.T) {
	if got := SliceAddr(nil); got != 0 {
		t.Errorf("SliceAddr(nil) = %#x, want 0", got)
	}
	b := make([]byte, 16)
	if got, want := SliceAddr(b[4:]), uint64(uintptr(unsafe.Pointer(&b[4]))); got != want {
		t.Errorf("SliceAddr(b[4:]) = %#x, want %#x", got, want)
	}
	if got := wordsAddr(nil); got != 0 {
		t.Errorf("wordsAddr(nil) = %#x, want 0", got)
	}
}
