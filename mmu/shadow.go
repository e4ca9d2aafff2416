package mmu

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/understudy-vmm/understudy/arch"
)

// This file keeps shadow copies of guest page tables per address space and
// turns guest writes to them into PTE transitions (seed idea 2, DESIGN.md
// section 5). See doc.go for the design and its comparison with KVM.
//
// Every byte read from a guest page table is untrusted. The rules:
//   - a table is shadowed at one level per address space, keyed by its GPA;
//     a pointer to a GPA already in the address space at another level (a
//     self-map, a pointer back up, a table reused at two levels) is counted
//     in Loops and not followed. Levels strictly decrease along pointers, so
//     no traversal can loop and every recursion is at most 4 deep;
//   - a table reached twice at its level (shared) is shadowed once and
//     reference-counted; its VA is that of the first entry that reached it;
//   - entries with reserved bits set are classified as the walker does
//     (classify) and counted in BadTables / BadLeaves;
//   - the number of shadow pages is bounded per address space and in the
//     whole set; tables beyond the bound are counted in Truncated and not
//     traced.

// Default bounds of a ShadowSet: 16384 shadow pages (64 MiB of copies, the
// tables of 32 GiB mapped with 4 KiB pages) per address space and in all.
const (
	DefaultShadowTableLimit = 1 << 14
	DefaultShadowPageLimit  = 1 << 14
)

// TableReader reads one 4 KiB guest page table by its guest-physical address.
// *Memory implements it; so can a test's synthetic memory.
type TableReader interface {
	ReadTable(gpa uint64, t *[512]uint64) error
}

// ReadTable reads the 512 entries of the page table at gpa (4 KiB-aligned).
func (m *Memory) ReadTable(gpa uint64, t *[512]uint64) error {
	b, err := m.Slice(gpa, PageSize)
	if err != nil {
		return err
	}
	for i := range t {
		t[i] = binary.LittleEndian.Uint64(b[8*i:])
	}
	return nil
}

// DirtySet tells which guest pages may have been written since the previous
// Update: KVM's dirty log for guest writes, OR-ed with the VMM's own.
type DirtySet interface {
	Dirty(gpa uint64) bool
}

// DirtyBitmap is a dirty log bitmap in Memory's format (one bit per 4 KiB
// page of the backing, as TakeVMMDirty and DirtyLog.Harvest fill it) with the
// layout that maps GPAs to backing offsets.
type DirtyBitmap struct {
	Layout []Region
	Bits   []uint64
}

// Dirty reports whether the page holding gpa is marked. A GPA outside RAM is
// never dirty.
func (d DirtyBitmap) Dirty(gpa uint64) bool {
	off, err := LayoutOffset(d.Layout, gpa&^(PageSize-1), PageSize)
	if err != nil {
		return false
	}
	p := off / PageSize
	return p/64 < uint64(len(d.Bits)) && d.Bits[p/64]&(1<<(p%64)) != 0
}

// TransitionKind is what happened to one page-table entry between two looks.
type TransitionKind uint8

const (
	// Unmapped: present → not present.
	Unmapped TransitionKind = iota + 1
	// Mapped: not present → present.
	Mapped
	// Remapped: present before and after, with another frame (or a leaf
	// became a table pointer or back).
	Remapped
	// FlagsChanged: present before and after, same frame, other bits (A, D,
	// W, ...) changed.
	FlagsChanged
)

func (k TransitionKind) String() string {
	switch k {
	case Unmapped:
		return "unmapped"
	case Mapped:
		return "mapped"
	case Remapped:
		return "remapped"
	case FlagsChanged:
		return "flags"
	}
	return fmt.Sprintf("TransitionKind(%d)", uint8(k))
}

// Transition is one changed page-table entry seen by Update.
type Transition struct {
	Space uint64 // the address space: its CR3 without flag bits
	Table uint64 // GPA of the page table holding the entry
	Level int    // level of that table: 4 = PML4 ... 1 = PT
	Index int    // entry index, 0..511
	VA    uint64 // first virtual address the entry maps (canonical)
	Size  uint64 // bytes the entry maps
	Old   uint64 // the entry in the shadow copy
	New   uint64 // the entry in guest memory now
	Kind  TransitionKind
	// Exit reports that this transition made the exit detector decide the
	// address space is exiting (once per address space).
	Exit bool
	// Dropped reports that the exit detector dropped the trace and shadow
	// page of Table at this transition (and of the subtables below it).
	Dropped bool
}

// ShadowConfig configures a ShadowSet.
type ShadowConfig struct {
	Detect ExitDetect
	// TableLimit bounds the shadow pages of one address space
	// (DefaultShadowTableLimit if <= 0).
	TableLimit int
	// PageLimit bounds the shadow pages of the whole set
	// (DefaultShadowPageLimit if <= 0). A table not shadowed because of a
	// limit is shadowed when a pointer to it is written again.
	PageLimit int
	// SkipKernelHalf leaves the tables under PML4 entries 256..511 (the
	// kernel half, which Linux shares among all processes and never tears
	// down at exit) unshadowed; the root's own entries are still diffed.
	// Without it each address space keeps its own copy of those tables.
	SkipKernelHalf bool
	// LeavesFirst diffs the dirty tables of an address space by ascending
	// level, then the first VA they map, then GPA, then index, instead of
	// by GPA then index: the order Linux writes a teardown in (leaf
	// entries in ascending VA order before the table pointers above them;
	// a real guest's page-table pages lie in any GPA order), which matters when a whole teardown falls in one Update
	// (see BenchmarkExitDetect).
	LeavesFirst bool
}

// ShadowStats counts what a ShadowSet did. Spaces and Pages are current
// values; the rest are totals since NewShadowSet.
type ShadowStats struct {
	Spaces int // address spaces tracked
	Pages  int // shadow pages (= traced guest pages) held

	Mapped, Unmapped, Remapped, FlagsChanged uint64 // transitions by kind

	Diffs uint64 // traced pages read and compared with their shadow
	// DiffsAvoided counts pages the dirty set marked that were not diffed
	// because their trace had been dropped (still referenced by their
	// parent table).
	DiffsAvoided uint64
	// Suppressed counts changed entries not turned into transitions because
	// their table was dropped earlier in the same diff.
	Suppressed uint64

	ExitsDetected uint64 // address spaces found exiting
	Dropped       uint64 // traces dropped by exit detection
	// FreedBytes counts shadow bytes freed by exit detection: dropped
	// tables, their subtables, and the address spaces whose root was dropped.
	FreedBytes uint64
	// Unlinked counts shadow pages freed because the guest no longer
	// references them (or Forget).
	Unlinked uint64

	// Malformed or notable entries met, as in WalkStats.
	BadTables, BadLeaves, Loops, Shared uint64
	// Truncated counts tables not shadowed because of the page limits.
	Truncated uint64
}

// Transitions returns the number of transitions of every kind.
func (s ShadowStats) Transitions() uint64 {
	return s.Mapped + s.Unmapped + s.Remapped + s.FlagsChanged
}

// Malformed returns the number of malformed entries met.
func (s ShadowStats) Malformed() uint64 { return s.BadTables + s.BadLeaves + s.Loops }

// ShadowTable describes one shadow page.
type ShadowTable struct {
	GPA   uint64
	Level int
	VA    uint64 // first VA the table maps
	Span  uint64 // bytes of VA the table maps; 0 for a PML4 (all of it)
}

// SpaceInfo describes one tracked address space.
type SpaceInfo struct {
	Pages int // shadow pages
	// MinVA is the accessed minimum virtual address: see ShadowSet.
	MinVA      uint64
	MinVAValid bool
	Exiting    bool // an exit detector decided the space is exiting
	Dropped    int  // tables dropped while still referenced by their parent
}

// shadowPage is the shadow copy of one guest page table.
type shadowPage struct {
	gpa   uint64
	level int
	va    uint64
	ent   [512]uint64
	// linked marks the table-pointer entries that hold a reference in
	// addrSpace.refs; acc marks the leaf entries seen with the Accessed bit
	// since they became present (sticky: a cleared A bit does not reset it).
	linked, acc [8]uint64
}

type tableRef struct {
	level int
	n     int
}

// addrSpace is the shadow state of one address space.
type addrSpace struct {
	root  uint64
	pages map[uint64]*shadowPage
	// refs counts, per table GPA, the linked entries pointing at it (the
	// root holds one pinned reference), and the level it is used at.
	refs map[uint64]tableRef
	// dropped holds tables whose trace exit detection dropped while their
	// parent still points at them; they are not shadowed again until every
	// reference is gone.
	dropped map[uint64]struct{}

	minVA           uint64
	minOK, minStale bool

	exiting bool // embodiment 1 decided
	flooded bool // embodiment 2 dropped a table
	// consec counts consecutive present→not-present transitions per table;
	// atRun is the number of tables with at least consecutiveRun.
	consec map[uint64]int
	atRun  int
	gone   bool
}

// ShadowSet holds, per guest address space (keyed by CR3), a shadow copy of
// every page table reachable from its CR3, and turns the guest's writes to
// those tables into Transitions. It is not safe for concurrent use.
//
// Accessed minimum virtual address. Per address space it is the lowest VA
// of a present leaf entry (4 KiB, 2 MiB or 1 GiB) that has been seen with the
// Accessed bit set since it became present. It is maintained as follows:
// copying a new table and every Mapped / Remapped / FlagsChanged leaf
// transition whose new entry has A set lowers it if its VA is lower; a leaf
// that had been seen accessed and goes Unmapped or Remapped (a new frame
// starts unaccessed), or a freed table covering it, makes it stale, and a
// stale value is recomputed from the shadows (no guest reads) at the end of
// the Update in which it went stale. Until then the old value stands, so the
// exit check of embodiment 1 compares each present→not-present leaf with the
// value as of the start of the address space's batch. The bit is sticky so
// that the VMM's own A-bit clearing (CountAccessed) does not move it.
type ShadowSet struct {
	cfg    ShadowConfig
	spaces map[uint64]*addrSpace
	pages  int
	stats  ShadowStats
	buf    [512]uint64
}

// NewShadowSet returns an empty set.
func NewShadowSet(cfg ShadowConfig) *ShadowSet {
	if cfg.TableLimit <= 0 {
		cfg.TableLimit = DefaultShadowTableLimit
	}
	if cfg.PageLimit <= 0 {
		cfg.PageLimit = DefaultShadowPageLimit
	}
	return &ShadowSet{cfg: cfg, spaces: map[uint64]*addrSpace{}}
}

// Detect returns the exit-detection mode.
func (s *ShadowSet) Detect() ExitDetect { return s.cfg.Detect }

// Stats returns the counters.
func (s *ShadowSet) Stats() ShadowStats {
	st := s.stats
	st.Spaces = len(s.spaces)
	st.Pages = s.pages
	return st
}

// Track starts tracking the address space rooted at cr3 (flag bits ignored)
// by copying every table reachable from it. It does nothing if the space is
// tracked. It fails if the root table cannot be read or shadowed.
func (s *ShadowSet) Track(mem TableReader, cr3 uint64) error {
	root := cr3 & arch.PTEAddrMask
	if _, ok := s.spaces[root]; ok {
		return nil
	}
	sp := &addrSpace{
		root:    root,
		pages:   map[uint64]*shadowPage{},
		refs:    map[uint64]tableRef{root: {level: 4, n: 1}},
		dropped: map[uint64]struct{}{},
		consec:  map[uint64]int{},
	}
	bad, trunc := s.stats.BadTables, s.stats.Truncated
	s.shadow(mem, sp, root, 4, 0)
	if _, ok := sp.pages[root]; !ok {
		switch {
		case s.stats.Truncated != trunc:
			return fmt.Errorf("track the address space at CR3 %#x: shadow page limit reached", cr3)
		case s.stats.BadTables != bad:
			return fmt.Errorf("track the address space at CR3 %#x: root table is not guest RAM", cr3)
		}
		return fmt.Errorf("track the address space at CR3 %#x: root table not shadowed", cr3)
	}
	s.spaces[root] = sp
	if sp.minStale {
		sp.recomputeMin()
	}
	return nil
}

// Forget stops tracking the address space at cr3 and frees its shadows
// (counted in Unlinked). It reports whether the space was tracked.
func (s *ShadowSet) Forget(cr3 uint64) bool {
	sp, ok := s.spaces[cr3&arch.PTEAddrMask]
	if ok {
		s.removeSpace(sp, false)
	}
	return ok
}

// Spaces returns the tracked address spaces' roots in ascending order.
func (s *ShadowSet) Spaces() []uint64 {
	r := make([]uint64, 0, len(s.spaces))
	for k := range s.spaces {
		r = append(r, k)
	}
	slices.Sort(r)
	return r
}

// Space describes the address space at cr3.
func (s *ShadowSet) Space(cr3 uint64) (SpaceInfo, bool) {
	sp, ok := s.spaces[cr3&arch.PTEAddrMask]
	if !ok {
		return SpaceInfo{}, false
	}
	return SpaceInfo{Pages: len(sp.pages), MinVA: sp.minVA, MinVAValid: sp.minOK,
		Exiting: sp.exiting || sp.flooded, Dropped: len(sp.dropped)}, true
}

// Tables lists the shadow pages of the address space at cr3 by ascending GPA.
func (s *ShadowSet) Tables(cr3 uint64) []ShadowTable {
	sp, ok := s.spaces[cr3&arch.PTEAddrMask]
	if !ok {
		return nil
	}
	r := make([]ShadowTable, 0, len(sp.pages))
	for _, p := range sp.pages {
		r = append(r, ShadowTable{GPA: p.gpa, Level: p.level, VA: p.va, Span: tableSpan(p.level)})
	}
	slices.SortFunc(r, func(a, b ShadowTable) int { return cmpU64(a.GPA, b.GPA) })
	return r
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// entryShift is log2 of the bytes an entry of a level-level table maps.
func entryShift(level int) uint { return uint(12 + 9*(level-1)) }

// tableSpan is the bytes of VA a level-level table maps (0 for the PML4: all).
func tableSpan(level int) uint64 {
	if level >= 4 {
		return 0
	}
	return 512 << entryShift(level)
}

// entryVA is the first VA entry i of p maps.
func entryVA(p *shadowPage, i int) uint64 {
	va := p.va | uint64(i)<<entryShift(p.level)
	if p.level == 4 && i >= 256 {
		va |= 0xffff << 48
	}
	return va
}

// covers reports whether [base, base+size) holds va; size 0 means all.
func covers(base, size, va uint64) bool { return size == 0 || va-base < size }

func frame(e uint64, c entryClass, level int) uint64 {
	if c == entryLeaf {
		return e & arch.PTEAddrMask &^ (1<<entryShift(level) - 1)
	}
	return e & arch.PTEAddrMask
}

func bitSet(b *[8]uint64, i int) bool { return b[i/64]&(1<<(i%64)) != 0 }
func setBit(b *[8]uint64, i int)      { b[i/64] |= 1 << (i % 64) }
func clearBit(b *[8]uint64, i int)    { b[i/64] &^= 1 << (i % 64) }

// shadow copies the level-level table at gpa into a new shadow page of sp
// and adopts its entries (following its table pointers).
func (s *ShadowSet) shadow(mem TableReader, sp *addrSpace, gpa uint64, level int, va uint64) {
	if len(sp.pages) >= s.cfg.TableLimit || s.pages >= s.cfg.PageLimit {
		s.stats.Truncated++
		return
	}
	p := &shadowPage{gpa: gpa, level: level, va: va}
	if err := mem.ReadTable(gpa, &p.ent); err != nil {
		s.stats.BadTables++
		return
	}
	sp.pages[gpa] = p
	s.pages++
	for i := range p.ent {
		s.adopt(mem, sp, p, i)
	}
}

// adopt takes in entry i of p as it is now in p.ent: follows a table
// pointer, notes an accessed leaf, counts a malformed entry.
func (s *ShadowSet) adopt(mem TableReader, sp *addrSpace, p *shadowPage, i int) {
	e := p.ent[i]
	switch classify(e, p.level) {
	case entryTable:
		s.link(mem, sp, p, i)
	case entryLeaf:
		if e&arch.PTEAccessed != 0 {
			setBit(&p.acc, i)
			if va := entryVA(p, i); !sp.minOK || va < sp.minVA {
				sp.minVA, sp.minOK = va, true
			}
		}
	case entryBadTable:
		s.stats.BadTables++
	case entryBadLeaf:
		s.stats.BadLeaves++
	}
}

// link references the table entry i of p points to, shadowing it if new.
func (s *ShadowSet) link(mem TableReader, sp *addrSpace, p *shadowPage, i int) {
	if s.cfg.SkipKernelHalf && p.level == 4 && i >= 256 {
		return
	}
	target := p.ent[i] & arch.PTEAddrMask
	level := p.level - 1
	r, ok := sp.refs[target]
	if ok && r.level != level {
		s.stats.Loops++
		return
	}
	r.level = level
	r.n++
	sp.refs[target] = r
	setBit(&p.linked, i)
	if _, ok := sp.pages[target]; ok {
		s.stats.Shared++
		return
	}
	if _, ok := sp.dropped[target]; ok {
		return
	}
	s.shadow(mem, sp, target, level, entryVA(p, i))
}

// unlink releases the reference entry i of p holds, freeing the table it
// points to when that was the last one. Call it before changing p.ent[i].
func (s *ShadowSet) unlink(sp *addrSpace, p *shadowPage, i int, byDrop bool) {
	if !bitSet(&p.linked, i) {
		return
	}
	clearBit(&p.linked, i)
	target := p.ent[i] & arch.PTEAddrMask
	r, ok := sp.refs[target]
	if !ok {
		return
	}
	if r.n--; r.n > 0 {
		sp.refs[target] = r
		return
	}
	delete(sp.refs, target)
	delete(sp.dropped, target)
	sp.resetRun(target)
	if c, ok := sp.pages[target]; ok {
		s.free(sp, c, byDrop)
	}
}

// free removes the shadow page p and, recursively, the subtables only it
// referenced.
func (s *ShadowSet) free(sp *addrSpace, p *shadowPage, byDrop bool) {
	for i := range p.ent {
		s.unlink(sp, p, i, byDrop)
	}
	delete(sp.pages, p.gpa)
	s.pages--
	if byDrop {
		s.stats.FreedBytes += PageSize
	} else {
		s.stats.Unlinked++
	}
	if sp.minOK && covers(p.va, tableSpan(p.level), sp.minVA) {
		sp.minStale = true
	}
}

// drop removes the trace and shadow page of p because the address space is
// exiting. Dropping the root removes the whole address space.
func (s *ShadowSet) drop(sp *addrSpace, p *shadowPage) {
	s.stats.Dropped++
	if p.gpa == sp.root && p.level == 4 {
		s.removeSpace(sp, true)
		return
	}
	s.free(sp, p, true)
	if _, ok := sp.refs[p.gpa]; ok {
		sp.dropped[p.gpa] = struct{}{}
	}
}

func (s *ShadowSet) removeSpace(sp *addrSpace, byDrop bool) {
	n := uint64(len(sp.pages))
	s.pages -= len(sp.pages)
	if byDrop {
		s.stats.FreedBytes += n * PageSize
	} else {
		s.stats.Unlinked += n
	}
	sp.pages = map[uint64]*shadowPage{}
	sp.gone = true
	delete(s.spaces, sp.root)
}

// resetRun forgets the consecutive present→not-present count of a table.
func (sp *addrSpace) resetRun(gpa uint64) {
	if n := sp.consec[gpa]; n > 0 {
		if n >= consecutiveRun {
			sp.atRun--
		}
		delete(sp.consec, gpa)
	}
}

// recomputeMin finds the accessed minimum VA from the shadows.
func (sp *addrSpace) recomputeMin() {
	sp.minStale = false
	sp.minVA, sp.minOK = 0, false
	if root, ok := sp.pages[sp.root]; ok {
		sp.minVA, sp.minOK = sp.lowestAccessed(root)
	}
}

// lowestAccessed returns the lowest accessed leaf VA under p. Entry order is
// VA order (the kernel half of the PML4 is sign-extended above the user half).
func (sp *addrSpace) lowestAccessed(p *shadowPage) (uint64, bool) {
	for i := range p.ent {
		if bitSet(&p.acc, i) {
			return entryVA(p, i), true
		}
		if bitSet(&p.linked, i) {
			if c, ok := sp.pages[p.ent[i]&arch.PTEAddrMask]; ok && c.level == p.level-1 {
				if va, ok := sp.lowestAccessed(c); ok {
					return va, true
				}
			}
		}
	}
	return 0, false
}

// Update compares the traced pages with guest memory and returns the PTE
// transitions, ordered by address space (ascending CR3), then table GPA
// (with LeavesFirst: table level, then the VA it maps, then GPA), then
// entry index. dirty names the pages that may have changed since the
// previous Update (the dirty log); nil diffs every traced page.
//
// The shadows follow: a newly present table pointer gets its subtable copied
// (its entries become the baseline, without transitions of their own); a
// table no longer referenced is freed with its subtables. Each
// present→not-present transition is shown to the exit detector, which may
// drop the table's trace (Transition.Dropped). The vCPUs should be paused,
// for a consistent view.
func (s *ShadowSet) Update(mem TableReader, dirty DirtySet) []Transition {
	var out []Transition
	var todo []uint64
	for _, root := range s.Spaces() {
		sp := s.spaces[root]
		todo = todo[:0]
		for gpa := range sp.pages {
			if dirty == nil || dirty.Dirty(gpa) {
				todo = append(todo, gpa)
			}
		}
		if dirty != nil {
			for gpa := range sp.dropped {
				if dirty.Dirty(gpa) {
					s.stats.DiffsAvoided++
				}
			}
		}
		if s.cfg.LeavesFirst {
			slices.SortFunc(todo, func(a, b uint64) int {
				pa, pb := sp.pages[a], sp.pages[b]
				if pa.level != pb.level {
					return pa.level - pb.level
				}
				if pa.va != pb.va {
					return cmpU64(pa.va, pb.va)
				}
				return cmpU64(a, b)
			})
		} else {
			slices.Sort(todo)
		}
		for _, gpa := range todo {
			if sp.gone {
				break
			}
			p, ok := sp.pages[gpa]
			if !ok {
				continue // freed earlier in this batch
			}
			if err := mem.ReadTable(gpa, &s.buf); err != nil {
				s.stats.BadTables++
				continue
			}
			s.stats.Diffs++
			out = s.diff(mem, sp, p, out)
		}
		if !sp.gone && sp.minStale {
			sp.recomputeMin()
		}
	}
	return out
}

// diff applies the entries of s.buf that differ from shadow page p.
func (s *ShadowSet) diff(mem TableReader, sp *addrSpace, p *shadowPage, out []Transition) []Transition {
	cur := s.buf // p's table now; s.buf may be reused below
	for i := range p.ent {
		old, e := p.ent[i], cur[i]
		if old == e {
			continue
		}
		// Embodiment 2 is armed by the runs before this transition: its
		// own effects (a freed subtable takes its run along) come after.
		armed := sp.atRun >= consecutiveTables
		t, ok := s.apply(mem, sp, p, i, e)
		if !ok {
			continue
		}
		if t.Kind == Unmapped {
			s.decide(sp, p, &t, armed)
		} else {
			sp.resetRun(p.gpa)
		}
		out = append(out, t)
		if t.Dropped {
			for j := i + 1; j < len(p.ent); j++ {
				if p.ent[j] != cur[j] {
					s.stats.Suppressed++
				}
			}
			break
		}
	}
	return out
}

// apply sets entry i of p to e, keeping the shadows, references and accessed
// minimum VA right, and returns the transition (false if none: an entry
// that stays not present, e.g. a swap entry).
func (s *ShadowSet) apply(mem TableReader, sp *addrSpace, p *shadowPage, i int, e uint64) (Transition, bool) {
	old := p.ent[i]
	oc, nc := classify(old, p.level), classify(e, p.level)
	t := Transition{Space: sp.root, Table: p.gpa, Level: p.level, Index: i, VA: entryVA(p, i),
		Size: 1 << entryShift(p.level), Old: old, New: e}
	switch {
	case old&arch.PTEPresent == 0 && e&arch.PTEPresent == 0:
		p.ent[i] = e
		return t, false
	case e&arch.PTEPresent == 0:
		t.Kind = Unmapped
		s.stats.Unmapped++
	case old&arch.PTEPresent == 0:
		t.Kind = Mapped
		s.stats.Mapped++
	case oc != nc || frame(old, oc, p.level) != frame(e, nc, p.level):
		t.Kind = Remapped
		s.stats.Remapped++
	default:
		t.Kind = FlagsChanged
		s.stats.FlagsChanged++
	}
	if t.Kind == FlagsChanged {
		// Same frame, same class: a table pointer keeps its reference (or
		// stays a counted loop), a leaf seen accessed stays so.
		p.ent[i] = e
		if nc == entryLeaf {
			s.adopt(mem, sp, p, i)
		}
		return t, true
	}
	s.unlink(sp, p, i, false)
	if bitSet(&p.acc, i) {
		clearBit(&p.acc, i)
		if sp.minOK && covers(t.VA, t.Size, sp.minVA) {
			sp.minStale = true
		}
	}
	p.ent[i] = e
	s.adopt(mem, sp, p, i)
	return t, true
}

// decide shows a present→not-present transition to the exit detector and
// drops the table's trace if it says so.
func (s *ShadowSet) decide(sp *addrSpace, p *shadowPage, t *Transition, armed bool) {
	d := s.cfg.Detect
	drop := false
	if d.minVA() {
		switch {
		case sp.exiting:
			drop = true
		case classify(t.Old, t.Level) == entryLeaf && sp.minOK && covers(t.VA, t.Size, sp.minVA):
			sp.exiting = true
			drop = true
			if !sp.flooded {
				t.Exit = true
			}
		}
	}
	if d.consecutive() {
		if armed {
			drop = true
			if !sp.flooded && !sp.exiting {
				t.Exit = true
			}
			sp.flooded = true
		} else {
			n := sp.consec[p.gpa] + 1
			sp.consec[p.gpa] = n
			if n == consecutiveRun {
				sp.atRun++
			}
		}
	}
	if t.Exit {
		s.stats.ExitsDetected++
	}
	if drop {
		t.Dropped = true
		s.drop(sp, p)
	}
}
