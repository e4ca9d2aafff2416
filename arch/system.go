package arch

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// DefaultDevice is the KVM device node.
const DefaultDevice = "/dev/kvm"

// Capabilities (KVM_CAP_*) used by Understudy.
const (
	CapIRQChip               = 0
	CapHLT                   = 1
	CapUserMemory            = 3
	CapSetTSSAddr            = 4
	CapExtCPUID              = 7
	CapNrVCPUs               = 9
	CapNrMemslots            = 10
	CapPIT                   = 11
	CapMPState               = 14
	CapSyncMMU               = 16
	CapIRQRouting            = 25
	CapIRQFD                 = 32
	CapPIT2                  = 33
	CapPITState2             = 35
	CapIOEventFD             = 36
	CapAdjustClock           = 39
	CapVCPUEvents            = 41
	CapDebugRegs             = 50
	CapXSave                 = 55
	CapXCRs                  = 56
	CapGetTSCKHz             = 61
	CapMaxVCPUs              = 66
	CapKVMClockCtrl          = 76
	CapReadonlyMem           = 81
	CapImmediateExit         = 136
	CapManualDirtyLogProtect = 168
	CapDirtyLogRing          = 192
	CapBinaryStatsFD         = 203
	CapXSave2                = 208
	CapMemoryFaultInfo       = 232
)

// Flags for CapManualDirtyLogProtect.
const (
	ManualProtectEnable   = 1 << 0
	ManualProtectInitSet  = 1 << 1
	expectedKVMAPIVersion = 12
)

// System is an open /dev/kvm: the system-level fd.
type System struct {
	fd       int
	mmapSize int
}

// Open opens the KVM device at path (DefaultDevice if empty) and checks the
// API version. A missing device wraps ErrNoKVM.
func Open(path string) (*System, error) {
	if path == "" {
		path = DefaultDevice
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return nil, fmt.Errorf("%w: %s does not exist (is the kvm module loaded?)", ErrNoKVM, path)
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		return nil, fmt.Errorf("%w: no permission to open %s (run as root or join the kvm group)", ErrNoKVM, path)
	case err != nil:
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	s := &System{fd: fd}
	v, err := ioctlVal(fd, kvmGetAPIVersion, 0)
	if err != nil {
		s.Close()
		return nil, err
	}
	if v != expectedKVMAPIVersion {
		s.Close()
		return nil, fmt.Errorf("%s: KVM API version %d, want %d", path, v, expectedKVMAPIVersion)
	}
	n, err := ioctlVal(fd, kvmGetVCPUMmapSize, 0)
	if err != nil {
		s.Close()
		return nil, err
	}
	s.mmapSize = int(n)
	return s, nil
}

// Close closes the device fd. VMs created from it stay valid.
func (s *System) Close() error { return unix.Close(s.fd) }

// FD returns the raw file descriptor.
func (s *System) FD() int { return s.fd }

// CheckExtension returns KVM_CHECK_EXTENSION for cap (0 = unsupported).
func (s *System) CheckExtension(cap int) int {
	r, err := ioctlVal(s.fd, kvmCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// VCPUMmapSize is the size of each vCPU's shared run area.
func (s *System) VCPUMmapSize() int { return s.mmapSize }

// MaxVCPUs returns the largest vCPU count KVM allows in one VM.
func (s *System) MaxVCPUs() int {
	if n := s.CheckExtension(CapMaxVCPUs); n > 0 {
		return n
	}
	if n := s.CheckExtension(CapNrVCPUs); n > 0 {
		return n
	}
	return 4
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	return getCPUID(s.fd, kvmGetSupportedCPUID)
}

// MSRIndexList returns the MSRs KVM saves and restores (KVM_GET_MSR_INDEX_LIST).
func (s *System) MSRIndexList() ([]uint32, error) {
	return getMSRList(s.fd, kvmGetMSRIndexList)
}

// CreateVM creates a new VM.
func (s *System) CreateVM() (*VM, error) {
	var fd uintptr
	var err error
	for {
		// KVM_CREATE_VM may fail with EINTR when a signal arrives.
		fd, err = ioctlVal(s.fd, kvmCreateVM, 0)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		return nil, err
	}
	return &VM{fd: int(fd), sys: s}, nil
}
