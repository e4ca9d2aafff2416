package main

import (
	"fmt"
	"unsafe"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// mapTag maps one private anonymous page at va, never over an existing
// mapping (MAP_FIXED_NOREPLACE), and writes boot.LiveTag at its start. The
// page stays mapped for the life of the process; mapTag returns it. A kernel older than 4.17,
// which takes MAP_FIXED_NOREPLACE for a hint, may place the page elsewhere:
// that is an error too.
func mapTag(va uint64) ([]byte, error) {
	want := unsafe.Add(unsafe.Pointer(nil), uintptr(va)) // memory outside Go's heap
	p, err := unix.MmapPtr(-1, 0, want, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_FIXED_NOREPLACE|unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("map the tagged page at %#x: %w", va, err)
	}
	if p != want {
		unix.MunmapPtr(p, pageSize)
		return nil, fmt.Errorf("map the tagged page at %#x: the kernel placed it at %#x", va, uintptr(p))
	}
	page := unsafe.Slice((*byte)(p), pageSize)
	copy(page, boot.LiveTag)
	return page, nil
}
