package mmu

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// mapAligned maps size bytes aligned to align: anonymous private memory when
// fd < 0, otherwise a shared mapping of fd. It reserves size+align bytes of
// address space, then maps the real memory at the aligned address inside it
// and releases the rest.
func mapAligned(fd int, size, align uint64) ([]byte, error) {
	resv, err := unix.MmapPtr(-1, 0, nil, uintptr(size+align), unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("reserve %d bytes of address space: %w", size+align, err)
	}
	base := uintptr(resv)
	aligned := (base + uintptr(align) - 1) &^ (uintptr(align) - 1)
	flags := unix.MAP_FIXED | unix.MAP_NORESERVE
	mfd := fd
	if fd < 0 {
		flags |= unix.MAP_PRIVATE | unix.MAP_ANONYMOUS
		mfd = -1
	} else {
		flags |= unix.MAP_SHARED
	}
	p, err := unix.MmapPtr(mfd, 0, unsafe.Add(resv, aligned-base), uintptr(size), unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		unix.MunmapPtr(resv, uintptr(size+align))
		return nil, fmt.Errorf("map %d bytes of guest memory: %w", size, err)
	}
	if head := aligned - base; head > 0 {
		unix.MunmapPtr(resv, head)
	}
	if tail := base + uintptr(size+align) - (aligned + uintptr(size)); tail > 0 {
		unix.MunmapPtr(unsafe.Add(resv, aligned-base+uintptr(size)), tail)
	}
	return unsafe.Slice((*byte)(p), size), nil
}

// unmap releases a mapping made by mapAligned.
func unmap(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return unix.MunmapPtr(unsafe.Pointer(&b[0]), uintptr(len(b)))
}

// mincore fills vec (one byte per 4 KiB page of b) with residency flags.
func mincore(b, vec []byte) error {
	if len(b) == 0 {
		return nil
	}
	_, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(unsafe.Pointer(&vec[0])))
	if errno != 0 {
		return errno
	}
	return nil
}

// sliceAddr returns the address of b's first byte.
func sliceAddr(b []byte) uintptr { return uintptr(unsafe.Pointer(&b[0])) }
