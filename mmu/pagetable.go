package mmu

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/understudy-vmm/understudy/arch"
)

// This file walks whole guest address spaces: every present leaf mapping
// reachable from a CR3 through 4-level x86-64 page tables in guest memory. The
// tables belong to the guest, so every entry is untrusted: the walk never
// panics, never loops and never reads outside guest RAM, and each malformed
// case is counted in WalkStats instead of failing the walk.
//
// What the walk assumes about the guest CPU:
//   - 4-level paging (CR4.PAE, EFER.LME; not LA57), so virtual addresses are
//     48 bits wide and sign-extended above bit 47;
//   - EFER.NXE set, so bit 63 is NX and not a reserved bit;
//   - MAXPHYADDR 52: bits 51..M of an address are not checked as reserved,
//     but an address outside guest RAM is never dereferenced anyway.

// DefaultTableLimit is the number of page tables one walk reads at most when
// the caller passes no limit: 65536 tables (256 MiB of page tables, enough for
// 128 GiB mapped with 4 KiB pages). It bounds the time a hostile or corrupt
// guest can make the VMM spend, at about 33 million entries (about 0.1 s
// here when the tables are empty).
const DefaultTableLimit = 1 << 16

// Reserved bits of large-page entries: between the PAT bit (12) and the
// frame address. A set reserved bit makes the CPU fault, so such an entry maps
// nothing.
const (
	pdpteLargeReserved = 1<<30 - 1<<13 // bits 29..13 of a 1 GiB PDPTE
	pdeLargeReserved   = 1<<21 - 1<<13 // bits 20..13 of a 2 MiB PDE
	pml4eReserved      = arch.PTELarge // PS must be 0 in a PML4E
)

// leafFlags are the entry bits Mapping.Flags carries.
const leafFlags = arch.PTEPresent | arch.PTEWrite | arch.PTEUser | arch.PTEPWT | arch.PTEPCD |
	arch.PTEAccessed | arch.PTEDirty | arch.PTELarge | arch.PTEGlobal | arch.PTENX

// Mapping is one present leaf of a guest page-table walk.
type Mapping struct {
	VA   uint64 // virtual address, canonical (bits 63..48 copy bit 47)
	GPA  uint64 // guest-physical address of the frame, aligned to Size
	Size uint64 // arch.PageSize, arch.LargePageSize (PDE.PS) or arch.HugePageSize (PDPTE.PS)
	// Flags holds arch.PTE* bits. PTEWrite and PTEUser are the effective
	// permissions (set only if set at every level), PTENX is set if any level
	// sets it. PTEAccessed, PTEDirty, PTEGlobal, PTEPWT and PTEPCD are the
	// leaf entry's own bits. PTEPresent is always set, PTELarge iff Size is
	// above 4 KiB.
	Flags uint64
	// Entry is the guest-physical address of the leaf entry (PTE, PDE or
	// PDPTE) that maps the page.
	Entry uint64
	// InRAM reports that [GPA, GPA+Size) is wholly guest RAM. Mappings of
	// MMIO or of addresses beyond RAM are visited with InRAM false; the walk
	// never reads the frames it finds.
	InRAM bool
}

// WalkStats counts what a page-table walk met. BadTables, BadLeaves and Loops
// are malformed entries; Shared and NotRAM are legal but worth knowing.
type WalkStats struct {
	Tables int // page tables read, the root included
	Leaves int // leaf mappings visited (calls of the visit function)
	NotRAM int // visited leaves whose frame is not wholly guest RAM
	// BadTables counts table pointers (CR3 included) that were not followed:
	// the table lies outside guest RAM or in the MMIO hole, or the pointing
	// entry has reserved bits set (PS in a PML4E).
	BadTables int
	// BadLeaves counts present leaf entries with reserved bits set, which
	// the CPU faults on: they are not visited.
	BadLeaves int
	// Loops counts table pointers back to a table on the current path (an
	// entry pointing at its own table or an ancestor): not followed. The
	// walk does not interpret such recursive entries as a self-map.
	Loops int
	// Shared counts table pointers to a table already expanded at the same
	// level: it is not expanded again, so its mappings are visited once, at
	// the first virtual address that reached them.
	Shared int
	// Truncated reports that the walk stopped at the table limit; everything
	// found up to then was visited.
	Truncated bool
}

// Malformed returns the number of malformed entries the walk met.
func (s WalkStats) Malformed() int { return s.BadTables + s.BadLeaves + s.Loops }

func (s *WalkStats) add(o WalkStats) {
	s.Tables += o.Tables
	s.Leaves += o.Leaves
	s.NotRAM += o.NotRAM
	s.BadTables += o.BadTables
	s.BadLeaves += o.BadLeaves
	s.Loops += o.Loops
	s.Shared += o.Shared
	s.Truncated = s.Truncated || o.Truncated
}

// errTruncated unwinds the walk at the table limit; it never leaves the walker.
var errTruncated = errors.New("page-table walk truncated")

// tableKey identifies a table expanded at a level: its 4 KiB-aligned GPA with
// the level in the low bits.
func tableKey(gpa uint64, level int) uint64 { return gpa | uint64(level) }

// entryClass is what a present page-table entry is, by the rules the CPU
// applies; the walker and the shadow set (shadow.go) share them.
type entryClass int

const (
	entryNone     entryClass = iota // not present
	entryTable                      // points to a next-level table
	entryLeaf                       // maps a page (4 KiB, 2 MiB or 1 GiB)
	entryBadTable                   // table pointer with reserved bits set (PS in a PML4E)
	entryBadLeaf                    // large leaf with reserved bits set
)

// classify classifies entry e of a level-level table (4 = PML4, 1 = PT).
func classify(e uint64, level int) entryClass {
	switch {
	case e&arch.PTEPresent == 0:
		return entryNone
	case level == 1:
		return entryLeaf
	case level == 4:
		if e&pml4eReserved != 0 {
			return entryBadTable
		}
		return entryTable
	case e&arch.PTELarge == 0:
		return entryTable
	case level == 3 && e&pdpteLargeReserved != 0, level == 2 && e&pdeLargeReserved != 0:
		return entryBadLeaf
	}
	return entryLeaf
}

// walker is one walk of one address space. visited may be shared by walks of
// several address spaces, so that a table they share is expanded once.
type walker struct {
	m       *Memory
	limit   int
	visited map[uint64]struct{}
	path    [5]uint64 // path[l]: the level-l table being expanded
	stats   WalkStats
	leaf    func(mp Mapping, entry uint64) error
}

// walk expands the address space rooted at cr3. It returns the leaf
// function's error; truncation and malformed entries go to w.stats.
func (w *walker) walk(cr3 uint64) error {
	root := cr3 & arch.PTEAddrMask
	if _, ok := w.visited[tableKey(root, 4)]; ok {
		w.stats.Shared++
		return nil
	}
	err := w.enter(root, 4, 0, arch.PTEWrite|arch.PTEUser)
	if errors.Is(err, errTruncated) {
		return nil
	}
	return err
}

// enter checks the limit, reads the level-level table at gpa and expands it.
// va is the virtual address its entry 0 maps; perm the W/U/NX bits so far.
func (w *walker) enter(gpa uint64, level int, va, perm uint64) error {
	tb, err := w.m.Slice(gpa, PageSize)
	if err != nil {
		w.stats.BadTables++
		return nil
	}
	if w.stats.Tables >= w.limit {
		w.stats.Truncated = true
		return errTruncated
	}
	w.stats.Tables++
	w.visited[tableKey(gpa, level)] = struct{}{}
	w.path[level] = gpa
	return w.expand(tb, gpa, level, va, perm)
}

// expand visits the entries of the level-level table tb at gpa.
func (w *walker) expand(tb []byte, gpa uint64, level int, va, perm uint64) error {
	shift := uint(12 + 9*(level-1))
	size := uint64(1) << shift
	for i := uint64(0); i < 512; i++ {
		e := binary.LittleEndian.Uint64(tb[8*i:])
		if e&arch.PTEPresent == 0 {
			continue
		}
		eva := va | i<<shift
		if level == 4 && i >= 256 {
			eva |= 0xffff << 48 // sign-extend bit 47
		}
		p := perm&e&(arch.PTEWrite|arch.PTEUser) | (perm|e)&arch.PTENX
		switch classify(e, level) {
		case entryBadTable:
			w.stats.BadTables++
			continue
		case entryBadLeaf:
			w.stats.BadLeaves++
			continue
		case entryTable:
			next := e & arch.PTEAddrMask
			if w.onPath(next, level) {
				w.stats.Loops++
				continue
			}
			if _, ok := w.visited[tableKey(next, level-1)]; ok {
				w.stats.Shared++
				continue
			}
			if err := w.enter(next, level-1, eva, p); err != nil {
				return err
			}
			continue
		}
		mp := Mapping{
			VA:    eva,
			GPA:   e & arch.PTEAddrMask &^ (size - 1), // drops the PAT bit of a large page
			Size:  size,
			Flags: e&leafFlags&^(arch.PTEWrite|arch.PTEUser|arch.PTENX|arch.PTELarge) | p | arch.PTEPresent,
			Entry: gpa + 8*i,
		}
		if level > 1 {
			mp.Flags |= arch.PTELarge
		}
		_, err := w.m.Offset(mp.GPA, size)
		mp.InRAM = err == nil
		if !mp.InRAM {
			w.stats.NotRAM++
		}
		w.stats.Leaves++
		if err := w.leaf(mp, e); err != nil {
			return err
		}
	}
	return nil
}

// onPath reports whether gpa is one of the tables being expanded at level
// and above.
func (w *walker) onPath(gpa uint64, level int) bool {
	for l := level; l <= 4; l++ {
		if w.path[l] == gpa {
			return true
		}
	}
	return false
}

// WalkPageTables walks the 4-level page tables rooted at cr3 (flag bits of
// cr3 are ignored) and calls visit for every present leaf mapping, in
// ascending virtual-address order. It reads at most limit page tables
// (DefaultTableLimit if limit <= 0) and expands each (table, level) once.
//
// The tables are guest data, so malformed entries are skipped and counted in
// the returned WalkStats rather than reported as errors; Truncated says the
// limit cut the walk short. The error is visit's, returned unchanged: a
// non-nil error from visit stops the walk. visit may be nil to only count.
//
// The walk reads live guest memory: pause the vCPUs for a consistent view.
func (m *Memory) WalkPageTables(cr3 uint64, limit int, visit func(Mapping) error) (WalkStats, error) {
	if limit <= 0 {
		limit = DefaultTableLimit
	}
	w := &walker{m: m, limit: limit, visited: map[uint64]struct{}{}}
	w.leaf = func(mp Mapping, _ uint64) error {
		if visit == nil {
			return nil
		}
		return visit(mp)
	}
	err := w.walk(cr3)
	return w.stats, err
}

// RegionAccess is the guest page-table view of one access-sampling period,
// per 2 MiB guest-physical region (region index = GPA >> 21). Only guest RAM
// is counted: mappings of MMIO or beyond RAM are left out. Maps hold no zero
// or false values.
type RegionAccess struct {
	// Accessed4K counts, per region, the 4 KiB guest PTEs with the A bit set
	// that map a page of the region: the "number of set access bits in the
	// L1 page table" of seed idea 4. It counts translations, not distinct
	// pages, so a page mapped and accessed in two places counts twice (it
	// also costs two TLB entries).
	Accessed4K map[uint64]int
	// LargeAccessed marks regions inside an accessed 2 MiB or 1 GiB guest
	// page (A bit of the PDE or PDPTE). Such an access cannot be counted per
	// 4 KiB page.
	LargeAccessed map[uint64]bool
	// Mapped4K counts the present 4 KiB guest PTEs mapping into a region,
	// accessed or not. With shadow paging KVM maps a translation large only
	// if the guest does, so these regions are blocked by the guest.
	Mapped4K map[uint64]int
	// MappedLarge marks regions inside a present 2 MiB or 1 GiB guest page.
	// A region may be in both MappedLarge and Mapped4K (e.g. a kernel direct
	// map with large pages and a process mapping it with 4 KiB pages).
	MappedLarge map[uint64]bool
}

// regionCounter accumulates a RegionAccess. Walks visit the 4 KiB pages of a
// region mostly together, so it keeps the current region's counts aside and
// touches the maps once per run.
type regionCounter struct {
	ra               RegionAccess
	cur              uint64
	mapped, accessed int
	m                *Memory
	clear            bool
}

func (c *regionCounter) flush() {
	if c.mapped > 0 {
		c.ra.Mapped4K[c.cur] += c.mapped
	}
	if c.accessed > 0 {
		c.ra.Accessed4K[c.cur] += c.accessed
	}
	c.mapped, c.accessed = 0, 0
}

// leaf counts one mapping; with clear it writes its entry back without A.
func (c *regionCounter) leaf(mp Mapping, e uint64) error {
	_, err := c.count(mp, e)
	return err
}

// count is leaf, also reporting whether it cleared the entry's A bit.
func (c *regionCounter) count(mp Mapping, e uint64) (cleared bool, err error) {
	acc := e&arch.PTEAccessed != 0
	counted := false
	if mp.Size == PageSize {
		if !mp.InRAM {
			return false, nil
		}
		if r := mp.GPA / RegionSize; r != c.cur {
			c.flush()
			c.cur = r
		}
		c.mapped++
		if acc {
			c.accessed++
		}
		counted = true
	} else {
		for g := mp.GPA; g < mp.GPA+mp.Size; g += RegionSize {
			if _, err := c.m.Offset(g, RegionSize); err != nil {
				continue
			}
			c.ra.MappedLarge[g/RegionSize] = true
			if acc {
				c.ra.LargeAccessed[g/RegionSize] = true
			}
			counted = true
		}
	}
	if acc && counted && c.clear {
		if err := c.m.PutUint64(mp.Entry, e&^arch.PTEAccessed); err != nil {
			return false, fmt.Errorf("clear the accessed bit of the entry at %#x (VA %#x): %w", mp.Entry, mp.VA, err)
		}
		return true, nil
	}
	return false, nil
}

// newRegionCounter returns an empty counter over m; clear makes it clear
// the A bits it counts.
func newRegionCounter(m *Memory, clear bool) *regionCounter {
	return &regionCounter{
		ra: RegionAccess{
			Accessed4K:    map[uint64]int{},
			LargeAccessed: map[uint64]bool{},
			Mapped4K:      map[uint64]int{},
			MappedLarge:   map[uint64]bool{},
		},
		m:     m,
		clear: clear,
	}
}

// CountAccessed counts accessed and mapped guest pages per 2 MiB region over
// the address spaces rooted at cr3s (CR3 values sampled while the vCPUs were
// paused). Each address space is walked with DefaultTableLimit.
//
// A page-table entry is counted once however many address spaces or paths
// reach it: the walks share one set of expanded tables, so a table shared
// between address spaces (the kernel half of every Linux process) is
// expanded once, and a repeated CR3 adds nothing. The counts are thus the
// number of distinct A bits set, which is also what clearing resets; counting
// per address space would multiply the kernel's regions by the number of
// processes sampled.
//
// With clear, every A bit counted (4 KiB PTEs and the leaf PDEs/PDPTEs of
// large pages; not the A bits of table pointers) is cleared by writing the
// entry back through Memory.Write, so the VMM dirty bitmap records the write
// and the next checkpoint carries it: the backup's page tables stay equal to
// the primary's. The next period then starts fresh.
//
// Clearing A bits is visible to the guest, which uses them itself (Linux ages
// pages for reclaim with them; clearing makes its pages look colder). It is
// safe only while every vCPU is paused: a running vCPU may set the A or D bit
// of an entry between the read and the write-back, and the write-back would
// lose it, and a lost D bit loses guest data. Also, a cached translation (the
// vCPU's TLB, or KVM's shadow page tables) does not set A again until it is
// rebuilt, so the next period can undercount unless the guest's translations
// are flushed.
//
// The returned WalkStats sums the walks. The error reports a failed
// write-back; the counts are then partial.
func (m *Memory) CountAccessed(cr3s []uint64, clear bool) (RegionAccess, WalkStats, error) {
	c := newRegionCounter(m, clear)
	var total WalkStats
	visited := map[uint64]struct{}{}
	for _, cr3 := range cr3s {
		w := &walker{m: m, limit: DefaultTableLimit, visited: visited, leaf: c.leaf}
		err := w.walk(cr3)
		c.flush()
		total.add(w.stats)
		if err != nil {
			return c.ra, total, fmt.Errorf("count accessed pages of the address space at CR3 %#x: %w", cr3, err)
		}
	}
	return c.ra, total, nil
}
