package arch

// KVM ioctl request numbers for x86-64. Each value was checked against
// <linux/kvm.h> with a C compiler; TestIoctlSizes checks that the size encoded
// in every _IOR/_IOW/_IOWR number equals the size of the Go struct passed with it.
const (
	// System ioctls (on /dev/kvm).
	kvmGetAPIVersion       = 0xae00
	kvmCreateVM            = 0xae01
	kvmGetMSRIndexList     = 0xc004ae02
	kvmCheckExtension      = 0xae03
	kvmGetVCPUMmapSize     = 0xae04
	kvmGetSupportedCPUID   = 0xc008ae05
	kvmGetEmulatedCPUID    = 0xc008ae09
	kvmGetMSRFeatureIdxLst = 0xc004ae0a

	// VM ioctls.
	kvmCreateVCPU          = 0xae41
	kvmGetDirtyLog         = 0x4010ae42
	kvmSetUserMemoryRegion = 0x4020ae46
	kvmSetTSSAddr          = 0xae47
	kvmSetIdentityMapAddr  = 0x4008ae48
	kvmCreateIRQChip       = 0xae60
	kvmIRQLine             = 0x4008ae61
	kvmGetIRQChip          = 0xc208ae62
	kvmSetIRQChip          = 0x8208ae63
	kvmIRQLineStatus       = 0xc008ae67
	kvmIRQFD               = 0x4020ae76
	kvmCreatePIT2          = 0x4040ae77
	kvmIOEventFD           = 0x4040ae79
	kvmSetClock            = 0x4030ae7b
	kvmGetClock            = 0x8030ae7c
	kvmGetPIT2             = 0x8070ae9f
	kvmSetPIT2             = 0x4070aea0
	kvmEnableCap           = 0x4068aea3
	kvmResetDirtyRings     = 0xaec7
	kvmClearDirtyLog       = 0xc018aec0
	kvmGetStatsFD          = 0xaece
	kvmSetGSIRouting       = 0x4008ae6a

	// vCPU ioctls.
	kvmRun           = 0xae80
	kvmGetRegs       = 0x8090ae81
	kvmSetRegs       = 0x4090ae82
	kvmGetSregs      = 0x8138ae83
	kvmSetSregs      = 0x4138ae84
	kvmTranslate     = 0xc018ae85
	kvmInterrupt     = 0x4004ae86
	kvmGetMSRs       = 0xc008ae88
	kvmSetMSRs       = 0x4008ae89
	kvmSetCPUID2     = 0x4008ae90
	kvmGetCPUID2     = 0xc008ae91
	kvmGetFPU        = 0x81a0ae8c
	kvmSetFPU        = 0x41a0ae8d
	kvmGetLAPIC      = 0x8400ae8e
	kvmSetLAPIC      = 0x4400ae8f
	kvmGetMPState    = 0x8004ae98
	kvmSetMPState    = 0x4004ae99
	kvmNMI           = 0xae9a
	kvmGetVCPUEvents = 0x8040ae9f
	kvmSetVCPUEvents = 0x4040aea0
	kvmGetDebugRegs  = 0x8080aea1
	kvmSetDebugRegs  = 0x4080aea2
	kvmGetXSave      = 0x9000aea4
	kvmSetXSave      = 0x5000aea5
	kvmGetXCRs       = 0x8188aea6
	kvmSetXCRs       = 0x4188aea7
	kvmGetXSave2     = 0x9000aecf
	kvmKVMClockCtrl  = 0xaead
	kvmGetTSCKHz     = 0xaea3
	kvmSetTSCKHz     = 0xaea2
)

// ioctlNames maps request numbers to the kernel's names for error messages.
var ioctlNames = map[uintptr]string{
	kvmGetAPIVersion: "KVM_GET_API_VERSION", kvmCreateVM: "KVM_CREATE_VM",
	kvmGetMSRIndexList: "KVM_GET_MSR_INDEX_LIST", kvmCheckExtension: "KVM_CHECK_EXTENSION",
	kvmGetVCPUMmapSize: "KVM_GET_VCPU_MMAP_SIZE", kvmGetSupportedCPUID: "KVM_GET_SUPPORTED_CPUID",
	kvmGetEmulatedCPUID: "KVM_GET_EMULATED_CPUID", kvmGetMSRFeatureIdxLst: "KVM_GET_MSR_FEATURE_INDEX_LIST",
	kvmCreateVCPU: "KVM_CREATE_VCPU", kvmGetDirtyLog: "KVM_GET_DIRTY_LOG",
	kvmSetUserMemoryRegion: "KVM_SET_USER_MEMORY_REGION", kvmSetTSSAddr: "KVM_SET_TSS_ADDR",
	kvmSetIdentityMapAddr: "KVM_SET_IDENTITY_MAP_ADDR", kvmCreateIRQChip: "KVM_CREATE_IRQCHIP",
	kvmIRQLine: "KVM_IRQ_LINE", kvmGetIRQChip: "KVM_GET_IRQCHIP", kvmSetIRQChip: "KVM_SET_IRQCHIP",
	kvmIRQLineStatus: "KVM_IRQ_LINE_STATUS", kvmIRQFD: "KVM_IRQFD", kvmCreatePIT2: "KVM_CREATE_PIT2",
	kvmIOEventFD: "KVM_IOEVENTFD", kvmSetClock: "KVM_SET_CLOCK", kvmGetClock: "KVM_GET_CLOCK",
	kvmGetPIT2: "KVM_GET_PIT2", kvmSetPIT2: "KVM_SET_PIT2", kvmEnableCap: "KVM_ENABLE_CAP",
	kvmResetDirtyRings: "KVM_RESET_DIRTY_RINGS", kvmClearDirtyLog: "KVM_CLEAR_DIRTY_LOG",
	kvmGetStatsFD: "KVM_GET_STATS_FD", kvmSetGSIRouting: "KVM_SET_GSI_ROUTING",
	kvmRun: "KVM_RUN", kvmGetRegs: "KVM_GET_REGS", kvmSetRegs: "KVM_SET_REGS",
	kvmGetSregs: "KVM_GET_SREGS", kvmSetSregs: "KVM_SET_SREGS", kvmTranslate: "KVM_TRANSLATE",
	kvmInterrupt: "KVM_INTERRUPT", kvmGetMSRs: "KVM_GET_MSRS", kvmSetMSRs: "KVM_SET_MSRS",
	kvmSetCPUID2: "KVM_SET_CPUID2", kvmGetCPUID2: "KVM_GET_CPUID2", kvmGetFPU: "KVM_GET_FPU",
	kvmSetFPU: "KVM_SET_FPU", kvmGetLAPIC: "KVM_GET_LAPIC", kvmSetLAPIC: "KVM_SET_LAPIC",
	kvmGetMPState: "KVM_GET_MP_STATE", kvmSetMPState: "KVM_SET_MP_STATE", kvmNMI: "KVM_NMI",
	kvmGetVCPUEvents: "KVM_GET_VCPU_EVENTS", kvmSetVCPUEvents: "KVM_SET_VCPU_EVENTS",
	kvmGetDebugRegs: "KVM_GET_DEBUGREGS", kvmSetDebugRegs: "KVM_SET_DEBUGREGS",
	kvmGetXSave: "KVM_GET_XSAVE", kvmSetXSave: "KVM_SET_XSAVE", kvmGetXCRs: "KVM_GET_XCRS",
	kvmSetXCRs: "KVM_SET_XCRS", kvmGetXSave2: "KVM_GET_XSAVE2", kvmKVMClockCtrl: "KVM_KVMCLOCK_CTRL",
	kvmGetTSCKHz: "KVM_GET_TSC_KHZ", kvmSetTSCKHz: "KVM_SET_TSC_KHZ",
}

// ioctlSize returns the argument size encoded in an ioctl request number.
func ioctlSize(req uintptr) uintptr { return (req >> 16) & 0x3fff }
