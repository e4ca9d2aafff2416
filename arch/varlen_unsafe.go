package arch

import (
	"encoding/binary"
	"errors"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Variable-length KVM structs (kvm_cpuid2, kvm_msrs, kvm_msr_list) are built
// in byte buffers: an 8-byte (or 4-byte) header followed by the entries.

const maxCPUIDEntries = 256

func getCPUID(fd int, req uintptr) ([]CPUIDEntry, error) {
	n := maxCPUIDEntries
	for {
		buf := make([]byte, 8+n*int(unsafe.Sizeof(CPUIDEntry{})))
		binary.LittleEndian.PutUint32(buf, uint32(n))
		_, err := ioctlRetry(fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) && n < 4096 {
			n *= 2
			continue
		}
		if err != nil {
			return nil, err
		}
		got := int(binary.LittleEndian.Uint32(buf))
		ents := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[8])), got)
		return append([]CPUIDEntry(nil), ents...), nil
	}
}

func setCPUID(fd int, req uintptr, ents []CPUIDEntry) error {
	buf := make([]byte, 8+len(ents)*int(unsafe.Sizeof(CPUIDEntry{})))
	binary.LittleEndian.PutUint32(buf, uint32(len(ents)))
	copy(unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[8])), len(ents)), ents)
	_, err := ioctlRetry(fd, req, unsafe.Pointer(&buf[0]))
	return err
}

func getMSRList(fd int, req uintptr) ([]uint32, error) {
	n := 512
	for {
		buf := make([]uint32, 1+n)
		buf[0] = uint32(n)
		_, err := ioctlRetry(fd, req, unsafe.Pointer(&buf[0]))
		if errors.Is(err, unix.E2BIG) && n < 65536 {
			n = int(buf[0]) + 1
			continue
		}
		if err != nil {
			return nil, err
		}
		return append([]uint32(nil), buf[1:1+buf[0]]...), nil
	}
}

// msrs does KVM_GET_MSRS / KVM_SET_MSRS on entries; it returns how many
// entries the kernel processed.
func msrs(fd int, req uintptr, ents []MSREntry) (int, error) {
	if len(ents) == 0 {
		return 0, nil
	}
	esz := int(unsafe.Sizeof(MSREntry{}))
	buf := make([]byte, 8+len(ents)*esz)
	binary.LittleEndian.PutUint32(buf, uint32(len(ents)))
	view := unsafe.Slice((*MSREntry)(unsafe.Pointer(&buf[8])), len(ents))
	copy(view, ents)
	r, err := ioctlRetry(fd, req, unsafe.Pointer(&buf[0]))
	if err != nil {
		return 0, err
	}
	copy(ents, view)
	return int(r), nil
}
