package mmu

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Host-side large mappings of guest regions.
//
// KVM maps a guest region with a 2 MiB entry only when the host page behind
// it is huge; on shadow-paging hosts (PVM) the guest must also map the region
// with a 2 MiB page. Collapse makes the host page huge on a running guest
// (MADV_COLLAPSE); Split makes the host map it with 4 KiB entries again, so
// KVM falls back to 4 KiB mappings; HugeBacked checks the host side through
// /proc/self/pagemap and /proc/kpageflags.

// regionRange returns the backing bytes of region r.
func (m *Memory) regionRange(r uint64) ([]byte, error) {
	off, err := m.Offset(r*RegionSize, RegionSize)
	if err != nil {
		return nil, fmt.Errorf("region %d: %w", r, err)
	}
	return m.mem[off : off+RegionSize], nil
}

// Collapse asks the host kernel to back region r with one huge page.
func (m *Memory) Collapse(r uint64) error {
	b, err := m.regionRange(r)
	if err != nil {
		return err
	}
	if err := unix.Madvise(b, unix.MADV_COLLAPSE); err != nil {
		return fmt.Errorf("collapse region %d (MADV_COLLAPSE): %w", r, err)
	}
	return nil
}

// Split makes the host map region r with 4 KiB entries (the huge page stays
// allocated; only its mapping is split). It briefly write-protects the
// region's first page, which splits the huge mapping, then restores it.
func (m *Memory) Split(r uint64) error {
	b, err := m.regionRange(r)
	if err != nil {
		return err
	}
	if err := unix.Mprotect(b[:PageSize], unix.PROT_READ); err != nil {
		return fmt.Errorf("split region %d: %w", r, err)
	}
	if err := unix.Mprotect(b[:PageSize], unix.PROT_READ|unix.PROT_WRITE); err != nil {
		return fmt.Errorf("split region %d: restore: %w", r, err)
	}
	return nil
}

// kpageflags bits.
const (
	kpfCompoundHead = 1 << 15
	kpfTHP          = 1 << 22
)

// HugeBacked reports whether region r is backed by a single transparent huge
// page: its first page is the head of a THP at a 2 MiB-aligned frame and its
// last page is that THP's last frame. It needs CAP_SYS_ADMIN (page frame
// numbers in pagemap).
func (m *Memory) HugeBacked(r uint64) (bool, error) {
	b, err := m.regionRange(r)
	if err != nil {
		return false, err
	}
	first, err := pfnOf(b, 0)
	if err != nil || first == 0 {
		return false, err
	}
	last, err := pfnOf(b, RegionSize-PageSize)
	if err != nil {
		return false, err
	}
	if first%(RegionSize/PageSize) != 0 || last != first+RegionSize/PageSize-1 {
		return false, nil
	}
	flags, err := readU64("/proc/kpageflags", int64(first)*8)
	if err != nil {
		return false, err
	}
	return flags&kpfTHP != 0 && flags&kpfCompoundHead != 0, nil
}

// pfnOf returns the page frame number behind b[off], or 0 if not present.
func pfnOf(b []byte, off uint64) (uint64, error) {
	va := uint64(sliceAddr(b)) + off
	e, err := readU64("/proc/self/pagemap", int64(va/PageSize)*8)
	if err != nil {
		return 0, err
	}
	if e&(1<<63) == 0 {
		return 0, nil
	}
	pfn := e & (1<<55 - 1)
	if pfn == 0 {
		return 0, fmt.Errorf("/proc/self/pagemap shows no page frame numbers (needs CAP_SYS_ADMIN)")
	}
	return pfn, nil
}

func readU64(path string, off int64) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var buf [8]byte
	if _, err := f.ReadAt(buf[:], off); err != nil {
		return 0, fmt.Errorf("read %s at %#x: %w", path, off, err)
	}
	return binary.LittleEndian.Uint64(buf[:]), nil
}
