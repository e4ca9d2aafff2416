package mmu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/arch"
	"golang.org/x/sys/unix"
)

// Page and region sizes.
const (
	PageSize   = arch.PageSize
	RegionSize = arch.LargePageSize
)

// MMIO hole below 4 GiB: guest RAM above HoleStart is placed at 4 GiB.
const (
	HoleStart = 3 << 30
	HoleEnd   = 4 << 30
)

// Backing selects what backs guest RAM.
type Backing int

const (
	// Anonymous is private anonymous memory.
	Anonymous Backing = iota
	// Memfd is a shared memfd mapping, which another process can map too.
	Memfd
)

func (b Backing) String() string {
	if b == Memfd {
		return "memfd"
	}
	return "anonymous"
}

// Config describes guest RAM.
type Config struct {
	Size    uint64  // bytes; a non-zero multiple of 2 MiB
	Backing Backing // Anonymous (default) or Memfd
	// THP asks the host for transparent huge pages (MADV_HUGEPAGE).
	THP bool
}

// Region is one contiguous range of guest-physical RAM.
type Region struct {
	GPA    uint64 // guest-physical start
	Size   uint64
	Offset uint64 // offset into the backing
	Slot   uint32 // KVM memory slot
}

// ErrOutOfRange is wrapped by every access outside guest RAM.
var ErrOutOfRange = errors.New("guest-physical address out of range")

// Memory is guest RAM: one 2 MiB-aligned host mapping laid out in one or two
// guest-physical regions (split around the MMIO hole below 4 GiB).
type Memory struct {
	cfg     Config
	mem     []byte
	fd      int
	regions []Region
	// dirty has one bit per 4 KiB page of the backing, set by VMM writes.
	dirty []atomic.Uint64
	// logging is set while KVM dirty logging is on (see EnableDirtyLog).
	logging atomic.Bool
	// revokeMu guards revoked and the start of dirty logging: access to
	// guest pages is revoked (the refault sampler) only while dirty logging
	// is off, and EnableDirtyLog waits until nothing is revoked, because
	// checkpoints then copy guest memory through the VMM's mapping.
	revokeMu   sync.Mutex
	revokeDone *sync.Cond
	revoked    bool
}

// ErrLogging is returned for a revocation of access while dirty logging
// is on.
var ErrLogging = errors.New("dirty logging is on: guest memory is being copied, access cannot be revoked")

// beginRevoke allows access to guest pages to be revoked until endRevoke,
// unless dirty logging is on.
func (m *Memory) beginRevoke() error {
	m.revokeMu.Lock()
	defer m.revokeMu.Unlock()
	if m.logging.Load() {
		return ErrLogging
	}
	m.revoked = true
	return nil
}

// endRevoke says every revoked page has its access back.
func (m *Memory) endRevoke() {
	m.revokeMu.Lock()
	m.revoked = false
	m.revokeDone.Broadcast()
	m.revokeMu.Unlock()
}

// startLogging marks dirty logging on once no page has its access revoked.
func (m *Memory) startLogging() {
	m.revokeMu.Lock()
	for m.revoked {
		m.revokeDone.Wait()
	}
	m.logging.Store(true)
	m.revokeMu.Unlock()
}

// DirtyLogging reports whether KVM dirty logging is on for this memory.
// While it is, KVM maps guest memory with 4 KiB pages only.
func (m *Memory) DirtyLogging() bool { return m.logging.Load() }

// New allocates guest RAM.
func New(cfg Config) (*Memory, error) {
	if cfg.Size == 0 || cfg.Size%RegionSize != 0 {
		return nil, fmt.Errorf("guest memory of %d bytes: want a non-zero multiple of 2 MiB", cfg.Size)
	}
	m := &Memory{cfg: cfg, fd: -1}
	m.revokeDone = sync.NewCond(&m.revokeMu)
	if cfg.Backing == Memfd {
		fd, err := unix.MemfdCreate("understudy-guest-ram", unix.MFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("memfd_create: %w", err)
		}
		if err := unix.Ftruncate(fd, int64(cfg.Size)); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("size memfd to %d bytes: %w", cfg.Size, err)
		}
		m.fd = fd
	}
	mem, err := mapAligned(m.fd, cfg.Size, RegionSize)
	if err != nil {
		if m.fd >= 0 {
			unix.Close(m.fd)
		}
		return nil, err
	}
	m.mem = mem
	if cfg.THP {
		if err := unix.Madvise(mem, unix.MADV_HUGEPAGE); err != nil {
			m.Close()
			return nil, fmt.Errorf("madvise(MADV_HUGEPAGE): %w", err)
		}
	}
	m.regions = Layout(cfg.Size)
	m.dirty = make([]atomic.Uint64, (cfg.Size/PageSize+63)/64)
	return m, nil
}

// Layout returns the guest-physical layout of size bytes of RAM: at GPA 0,
// with what would overlap the MMIO hole below 4 GiB moved to 4 GiB. Every
// process that knows the size computes the same layout.
func Layout(size uint64) []Region {
	if size <= HoleStart {
		return []Region{{GPA: 0, Size: size}}
	}
	return []Region{{GPA: 0, Size: HoleStart}, {GPA: HoleEnd, Size: size - HoleStart, Offset: HoleStart, Slot: 1}}
}

// Size returns the amount of RAM in bytes.
func (m *Memory) Size() uint64 { return m.cfg.Size }

// Regions returns the guest-physical layout.
func (m *Memory) Regions() []Region { return append([]Region(nil), m.regions...) }

// Backing returns the whole host mapping (all regions, in offset order).
func (m *Memory) Backing() []byte { return m.mem }

// FD returns the memfd, or -1 for anonymous memory.
func (m *Memory) FD() int { return m.fd }

// Close unmaps the memory. It must not be used afterwards.
func (m *Memory) Close() error {
	err := unmap(m.mem)
	m.mem = nil
	if m.fd >= 0 {
		if cerr := unix.Close(m.fd); err == nil {
			err = cerr
		}
		m.fd = -1
	}
	return err
}

// Register creates one KVM memory slot per region. flags are slot flags such
// as arch.MemLogDirtyPages.
func (m *Memory) Register(vm *arch.VM, flags uint32) error {
	for _, r := range m.regions {
		err := vm.SetUserMemoryRegion(arch.UserMemoryRegion{
			Slot: r.Slot, Flags: flags, GuestPhysAddr: r.GPA, MemorySize: r.Size,
			UserspaceAddr: arch.SliceAddr(m.mem[r.Offset : r.Offset+r.Size]),
		})
		if err != nil {
			return fmt.Errorf("register guest memory slot %d (GPA %#x, %d MiB): %w", r.Slot, r.GPA, r.Size>>20, err)
		}
	}
	return nil
}

// Offset translates [gpa, gpa+n) to an offset into the backing. The range
// must lie inside one region.
func (m *Memory) Offset(gpa, n uint64) (uint64, error) { return LayoutOffset(m.regions, gpa, n) }

// LayoutOffset translates [gpa, gpa+n) to an offset into a backing laid out
// as regions. The range must lie inside one region.
func LayoutOffset(regions []Region, gpa, n uint64) (uint64, error) {
	for _, r := range regions {
		if gpa >= r.GPA && gpa-r.GPA < r.Size {
			if n > r.Size-(gpa-r.GPA) {
				return 0, fmt.Errorf("%w: [%#x, +%#x) crosses the end of RAM at %#x", ErrOutOfRange, gpa, n, r.GPA+r.Size)
			}
			return r.Offset + (gpa - r.GPA), nil
		}
	}
	return 0, fmt.Errorf("%w: %#x is not guest RAM", ErrOutOfRange, gpa)
}

// Slice returns the n bytes of guest RAM at gpa for reading. Writes through
// it are not recorded in the VMM dirty bitmap: use Write or MarkDirty.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	off, err := m.Offset(gpa, n)
	if err != nil {
		return nil, err
	}
	return m.mem[off : off+n : off+n], nil
}

// Read copies guest RAM at gpa into p.
func (m *Memory) Read(gpa uint64, p []byte) error {
	b, err := m.Slice(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(p, b)
	return nil
}

// Write copies p into guest RAM at gpa and marks the pages dirty.
func (m *Memory) Write(gpa uint64, p []byte) error {
	off, err := m.Offset(gpa, uint64(len(p)))
	if err != nil {
		return err
	}
	copy(m.mem[off:], p)
	m.markOffsets(off, uint64(len(p)))
	return nil
}

// Uint64 reads a little-endian u64 at gpa.
func (m *Memory) Uint64(gpa uint64) (uint64, error) {
	b, err := m.Slice(gpa, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b), nil
}

// PutUint64 writes a little-endian u64 at gpa and marks its page dirty.
func (m *Memory) PutUint64(gpa, v uint64) error {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	return m.Write(gpa, b[:])
}

// MarkDirty records that the VMM wrote [gpa, gpa+n) by other means.
func (m *Memory) MarkDirty(gpa, n uint64) error {
	off, err := m.Offset(gpa, n)
	if err != nil {
		return err
	}
	m.markOffsets(off, n)
	return nil
}

func (m *Memory) markOffsets(off, n uint64) {
	if n == 0 {
		return
	}
	for p := off / PageSize; p <= (off+n-1)/PageSize; p++ {
		m.dirty[p/64].Or(1 << (p % 64))
	}
}

// TakeVMMDirty moves the VMM dirty bitmap into dst (one bit per backing page,
// OR-ed in) and clears it. dst must have at least (Size/4096+63)/64 words. It
// returns the number of pages that were dirty.
func (m *Memory) TakeVMMDirty(dst []uint64) (int, error) {
	if len(dst) < len(m.dirty) {
		return 0, fmt.Errorf("dirty bitmap of %d words, want %d", len(dst), len(m.dirty))
	}
	n := 0
	for i := range m.dirty {
		w := m.dirty[i].Swap(0)
		dst[i] |= w
		n += bits.OnesCount64(w)
	}
	return n, nil
}

// ResidentBytes returns how much of the backing is resident in host memory
// (mincore), i.e. the guest memory the host has actually allocated.
func (m *Memory) ResidentBytes() (uint64, error) {
	vec := make([]byte, (uint64(len(m.mem))+PageSize-1)/PageSize)
	if err := mincore(m.mem, vec); err != nil {
		return 0, fmt.Errorf("mincore on guest memory: %w", err)
	}
	var n uint64
	for _, v := range vec {
		n += uint64(v & 1)
	}
	return n * PageSize, nil
}
