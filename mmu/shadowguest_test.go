package mmu

import (
	"fmt"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
)

// sgGuest builds synthetic x86-64 page tables in real guest memory and models
// what Linux writes to them (one 8-byte store per entry). Every write can be
// followed by an Update of one ShadowSet per exit-detection mode, fed with
// the VMM dirty bitmap of the writes since the previous Update, so each mode
// sees the same write stream and its decisions can be checked one transition
// at a time.
type sgGuest struct {
	t      testing.TB
	m      *Memory
	next   uint64 // next free page-table page
	frame  uint64 // next leaf frame (need not be RAM)
	kernel uint64 // the kernel half's PDPT, shared by every address space
	bits   []uint64

	sets    []*ShadowSet // one per mode, in modes order; nil: no Update
	log     [][]Transition
	batch   int // writes per Update
	pending int
}

var allModes = []ExitDetect{ExitDetectNone, ExitDetectMinVA, ExitDetectConsecutive, ExitDetectBoth}

const (
	sgTablesBase = 1 << 20
	userTop      = 1 << 47
	pteA         = arch.PTEAccessed
)

func newSGGuest(t testing.TB, size uint64) *sgGuest {
	t.Helper()
	m, err := New(Config{Size: size})
	if err != nil {
		t.Fatalf("New = %v", err)
	}
	t.Cleanup(func() { m.Close() })
	g := &sgGuest{t: t, m: m, next: sgTablesBase, frame: 1 << 32, bits: make([]uint64, m.BitmapWords()), batch: 1}
	// The kernel half: one PDPT with a PD mapping 8 MiB with 2 MiB pages.
	g.kernel = g.alloc()
	pd := g.alloc()
	g.put(g.kernel, pd|present|write|pteA)
	for i := uint64(0); i < 4; i++ {
		g.put(pd+8*i, i<<21|present|write|large|pteA)
	}
	return g
}

// attach starts one ShadowSet per mode; later writes Update them.
func (g *sgGuest) attach() {
	g.sets = nil
	g.log = make([][]Transition, len(allModes))
	for _, d := range allModes {
		g.sets = append(g.sets, NewShadowSet(ShadowConfig{Detect: d}))
	}
	g.takeDirty()
}

func (g *sgGuest) alloc() uint64 {
	p := g.next
	g.next += PageSize
	if g.next > g.m.Size() {
		g.t.Fatalf("synthetic guest out of page-table pages")
	}
	return p
}

func (g *sgGuest) get(gpa uint64) uint64 {
	v, err := g.m.Uint64(gpa)
	if err != nil {
		g.t.Fatalf("Uint64(%#x) = %v", gpa, err)
	}
	return v
}

// put is one guest store of an entry.
func (g *sgGuest) put(gpa, v uint64) {
	if err := g.m.PutUint64(gpa, v); err != nil {
		g.t.Fatalf("PutUint64(%#x) = %v", gpa, err)
	}
	if g.sets == nil {
		return
	}
	if g.pending++; g.pending >= g.batch {
		g.update()
	}
}

func (g *sgGuest) takeDirty() DirtySet {
	clear(g.bits)
	if _, err := g.m.TakeVMMDirty(g.bits); err != nil {
		g.t.Fatalf("TakeVMMDirty = %v", err)
	}
	return DirtyBitmap{Layout: g.m.Regions(), Bits: g.bits}
}

// update feeds the writes since the previous one to every set.
func (g *sgGuest) update() {
	g.pending = 0
	d := g.takeDirty()
	for i, s := range g.sets {
		g.log[i] = append(g.log[i], s.Update(g.m, d)...)
	}
}

// newSpace returns the CR3 of a new address space sharing the kernel half,
// tracked by every set (as if sampled from a vCPU).
func (g *sgGuest) newSpace() uint64 {
	cr3 := g.alloc()
	g.put(cr3+8*256, g.kernel|present|write|pteA)
	for _, s := range g.sets {
		if err := s.Track(g.m, cr3); err != nil {
			g.t.Fatalf("Track(%#x) = %v", cr3, err)
		}
	}
	return cr3
}

// entry returns the GPA of the level-level entry mapping va (creating the
// tables above it, as a page fault does: allocate, populate the pointer).
func (g *sgGuest) entry(cr3, va uint64, level int) uint64 {
	tbl := cr3
	for l := 4; l > level; l-- {
		ea := tbl + 8*((va>>entryShift(l))&511)
		e := g.get(ea)
		if e&present == 0 {
			e = g.alloc() | present | write | arch.PTEUser | pteA
			g.put(ea, e)
		}
		tbl = e & arch.PTEAddrMask
	}
	return tbl + 8*((va>>entryShift(level))&511)
}

// table returns the GPA of the level-level table on va's path (0 if none).
func (g *sgGuest) table(cr3, va uint64, level int) uint64 {
	tbl := cr3
	for l := 4; l > level; l-- {
		e := g.get(tbl + 8*((va>>entryShift(l))&511))
		if e&present == 0 {
			return 0
		}
		tbl = e & arch.PTEAddrMask
	}
	return tbl
}

// mapPages faults in n 4 KiB pages from va; accessed sets their A bit.
func (g *sgGuest) mapPages(cr3, va uint64, n int, accessed bool) {
	for i := 0; i < n; i++ {
		f := g.frame | present | write | arch.PTEUser
		if accessed {
			f |= pteA
		}
		g.frame += PageSize
		g.put(g.entry(cr3, va+uint64(i)*PageSize, 1), f)
	}
}

// zap models zap_pte_range over [lo, hi) (unmap_vmas, MADV_DONTNEED): every
// present leaf in the range is cleared, in ascending VA order, one store
// each; tables stay.
func (g *sgGuest) zap(cr3, lo, hi uint64) {
	g.walkRange(cr3, 4, 0, lo, hi, func(tbl uint64, i uint64, e uint64, level int, va uint64) {
		if classify(e, level) == entryLeaf {
			g.put(tbl+8*i, 0)
		}
	}, nil)
}

// walkRange visits, in ascending VA order, the present entries of the
// user half of the table tree at tbl (a level-level table mapping from
// base) that map some of [lo, hi): pre before descending into a subtable
// (leaves only reach pre), post after it.
func (g *sgGuest) walkRange(tbl uint64, level int, base, lo, hi uint64, pre, post func(tbl, i, e uint64, level int, va uint64)) {
	size := uint64(1) << entryShift(level)
	for i := uint64(0); i < 512; i++ {
		va := base + i*size
		if va >= hi || va+size <= lo || level == 4 && i >= 256 {
			continue
		}
		e := g.get(tbl + 8*i)
		c := classify(e, level)
		if c == entryNone {
			continue
		}
		if pre != nil {
			pre(tbl, i, e, level, va)
		}
		if c == entryTable {
			g.walkRange(e&arch.PTEAddrMask, level-1, va, lo, hi, pre, post)
			if post != nil {
				post(tbl, i, e, level, va)
			}
		}
	}
}

// freeTables models free_pgtables / free_pgd_range over [lo, hi): each table
// whose whole span lies in the range has its pointer cleared after the
// tables below it (pmd_clear, then pud_clear, then p4d/pgd_clear going up).
func (g *sgGuest) freeTables(cr3, lo, hi uint64) {
	g.walkRange(cr3, 4, 0, lo, hi, nil, func(tbl, i, _ uint64, level int, va uint64) {
		if va >= lo && va+entrySize(level) <= hi {
			g.put(tbl+8*i, 0)
		}
	})
}

func entrySize(level int) uint64 { return 1 << entryShift(level) }

// exit models exit_mmap: unmap_vmas over the whole user half, then
// free_pgtables from FIRST_USER_ADDRESS to the top.
func (g *sgGuest) exit(cr3 uint64) {
	g.zap(cr3, 0, userTop)
	g.freeTables(cr3, 0, userTop)
}

// fork models copy_page_range for a private writable mapping of every
// present user leaf: the child gets new tables with read-only, old (A clear)
// copies, and
// the parent's writable PTEs are write-protected (COW), in VA order.
func (g *sgGuest) fork(parent uint64) uint64 {
	child := g.newSpace()
	g.forkTable(parent, child, 4, 0)
	return child
}

func (g *sgGuest) forkTable(ptbl, child uint64, level int, base uint64) {
	size := uint64(1) << entryShift(level)
	for i := uint64(0); i < 512; i++ {
		if level == 4 && i >= 256 {
			break
		}
		va := base + i*size
		e := g.get(ptbl + 8*i)
		switch classify(e, level) {
		case entryTable:
			g.forkTable(e&arch.PTEAddrMask, child, level-1, va)
		case entryLeaf:
			if e&write != 0 {
				g.put(ptbl+8*i, e&^write)
			}
			g.put(g.entry(child, va, 1), e&^(write|pteA)) // pte_mkold
		}
	}
}

// names gives the tables of the address spaces short names for rendering.
type sgNames map[uint64]string

func (n sgNames) add(gpa uint64, name string) {
	if gpa != 0 {
		n[gpa] = name
	}
}

// render writes transitions as "PT1[3] U exit drop" lines.
func (n sgNames) render(ts []Transition) string {
	var b strings.Builder
	for _, t := range ts {
		name, ok := n[t.Table]
		if !ok {
			name = fmt.Sprintf("%#x", t.Table)
		}
		fmt.Fprintf(&b, "%s[%d] %s", name, t.Index, t.Kind.String()[:1])
		if t.Exit {
			b.WriteString(" exit")
		}
		if t.Dropped {
			b.WriteString(" drop")
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// sgExpect builds an expected rendering.
type sgExpect struct{ strings.Builder }

// run adds lines name[from..to] kind with the given suffix.
func (e *sgExpect) run(name string, from, to int, kind, suffix string) *sgExpect {
	for i := from; i <= to; i++ {
		fmt.Fprintf(e, "%s[%d] %s%s\n", name, i, kind, suffix)
	}
	return e
}

func (e *sgExpect) one(name string, i int, kind, suffix string) *sgExpect {
	return e.run(name, i, i, kind, suffix)
}

// only returns the transitions of one address space.
func only(ts []Transition, cr3 uint64) []Transition {
	var r []Transition
	for _, t := range ts {
		if t.Space == cr3 {
			r = append(r, t)
		}
	}
	return r
}

// checkShadows asserts that every shadow page of s equals guest memory and
// that the page counts agree.
func checkShadows(t testing.TB, s *ShadowSet, mem TableReader) {
	t.Helper()
	total := 0
	var cur [512]uint64
	for _, root := range s.Spaces() {
		sp := s.spaces[root]
		total += len(sp.pages)
		if _, ok := sp.pages[root]; !ok {
			t.Errorf("space %#x has no root shadow", root)
		}
		for gpa, p := range sp.pages {
			if err := mem.ReadTable(gpa, &cur); err != nil {
				t.Errorf("ReadTable(%#x) = %v for a shadowed table", gpa, err)
				continue
			}
			if cur != p.ent {
				t.Errorf("space %#x: shadow of the table at %#x differs from guest memory after Update", root, gpa)
			}
		}
	}
	if total != s.pages || s.pages > s.cfg.PageLimit {
		t.Errorf("shadow pages: spaces hold %d, set counts %d, limit %d", total, s.pages, s.cfg.PageLimit)
	}
}
