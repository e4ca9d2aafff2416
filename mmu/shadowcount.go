package mmu

import (
	"fmt"

	"github.com/understudy-vmm/understudy/arch"
)

// This file counts accessed pages per 2 MiB region from the shadows of a
// ShadowSet instead of walking the guest's page tables (pagetable.go's
// CountAccessed), for the large-page controller.

// CountAccessed is Memory.CountAccessed computed from the shadow copies:
// the same RegionAccess and, with clear, the same writes to guest memory,
// without reading any page table. Call Update (and Track for each CR3)
// first, with the vCPUs paused since: the shadows are then equal to guest
// memory and the result is what m.CountAccessed(cr3s, clear) would return,
// with three exceptions, each documented in doc.go:
//   - address spaces not tracked, and those an exit detector found exiting
//     (SpaceInfo.Exiting), are not counted;
//   - tables not shadowed (dropped by exit detection, beyond the page
//     limits, under the kernel half with SkipKernelHalf, or a table pointer
//     the set counted as a loop) are not counted;
//   - a table the guest uses at two levels in one address space (never a
//     well-formed tree) is counted at the first level only.
//
// Like the walk, a table reached by several address spaces or paths is
// counted once. With clear, each A bit counted is cleared in guest memory
// (Memory.PutUint64, so the VMM dirty bitmap records it) and in every shadow
// copy of its table holding the same entry, so the VMM's own clearing is
// not seen as a transition by the next Update (the accessed minimum VA does
// not move either: shadowPage.acc is sticky).
//
// WalkStats counts the shadow pages visited as Tables; BadTables counts
// table pointers to non-RAM, Loops the pointers the set did not follow
// because of a loop, and Truncated reports tables not shadowed because of
// the page limits.
func (s *ShadowSet) CountAccessed(m *Memory, cr3s []uint64, clear bool) (RegionAccess, WalkStats, error) {
	c := newRegionCounter(m, clear)
	sc := &shadowCounter{s: s, c: c, visited: map[uint64]struct{}{}}
	if clear {
		sc.cleared = map[uint64][]clearedEntry{}
	}
	var err error
	for _, cr3 := range cr3s {
		sp, ok := s.spaces[cr3&arch.PTEAddrMask]
		if !ok || sp.exiting || sp.flooded {
			continue
		}
		root, ok := sp.pages[sp.root]
		if !ok {
			continue
		}
		if _, ok := sc.visited[tableKey(sp.root, 4)]; ok {
			sc.stats.Shared++
			continue
		}
		sc.sp = sp
		err = sc.table(root)
		c.flush()
		if err != nil {
			err = fmt.Errorf("count accessed pages of the address space at CR3 %#x: %w", cr3, err)
			break
		}
	}
	sc.sync()
	return c.ra, sc.stats, err
}

// clearedEntry is an entry whose A bit CountAccessed cleared.
type clearedEntry struct {
	i   int
	old uint64
}

type shadowCounter struct {
	s       *ShadowSet
	sp      *addrSpace
	c       *regionCounter
	visited map[uint64]struct{}
	stats   WalkStats
	cleared map[uint64][]clearedEntry // by table GPA
}

// table counts the leaves under shadow page p.
func (sc *shadowCounter) table(p *shadowPage) error {
	sc.stats.Tables++
	sc.visited[tableKey(p.gpa, p.level)] = struct{}{}
	for i, e := range p.ent {
		switch classify(e, p.level) {
		case entryNone:
		case entryBadTable:
			sc.stats.BadTables++
		case entryBadLeaf:
			sc.stats.BadLeaves++
		case entryTable:
			if err := sc.pointer(p, i); err != nil {
				return err
			}
		case entryLeaf:
			if err := sc.leaf(p, i); err != nil {
				return err
			}
		}
	}
	return nil
}

// pointer follows the table pointer entry i of p.
func (sc *shadowCounter) pointer(p *shadowPage, i int) error {
	if !bitSet(&p.linked, i) {
		if !(sc.s.cfg.SkipKernelHalf && p.level == 4 && i >= 256) {
			sc.stats.Loops++
		}
		return nil
	}
	target := p.ent[i] & arch.PTEAddrMask
	child, ok := sc.sp.pages[target]
	if !ok {
		if _, dropped := sc.sp.dropped[target]; dropped {
			return nil
		}
		if _, err := sc.c.m.Offset(target, PageSize); err != nil {
			sc.stats.BadTables++
		} else {
			sc.stats.Truncated = true
		}
		return nil
	}
	if _, ok := sc.visited[tableKey(target, child.level)]; ok {
		sc.stats.Shared++
		return nil
	}
	return sc.table(child)
}

// leaf counts the leaf entry i of p, clearing its A bit with clear.
func (sc *shadowCounter) leaf(p *shadowPage, i int) error {
	e := p.ent[i]
	size := uint64(1) << entryShift(p.level)
	mp := Mapping{VA: entryVA(p, i), GPA: frame(e, entryLeaf, p.level), Size: size, Entry: p.gpa + 8*uint64(i)}
	_, err := sc.c.m.Offset(mp.GPA, size)
	mp.InRAM = err == nil
	if !mp.InRAM {
		sc.stats.NotRAM++
	}
	sc.stats.Leaves++
	cleared, err := sc.c.count(mp, e)
	if cleared {
		p.ent[i] = e &^ arch.PTEAccessed
		sc.cleared[p.gpa] = append(sc.cleared[p.gpa], clearedEntry{i: i, old: e})
	}
	return err
}

// sync applies the cleared A bits to the other shadow copies of their
// tables (the kernel half is copied once per address space).
func (sc *shadowCounter) sync() {
	if len(sc.cleared) == 0 {
		return
	}
	for _, sp := range sc.s.spaces {
		for gpa, es := range sc.cleared {
			p, ok := sp.pages[gpa]
			if !ok {
				continue
			}
			for _, ce := range es {
				if p.ent[ce.i] == ce.old {
					p.ent[ce.i] = ce.old &^ arch.PTEAccessed
				}
			}
		}
	}
}
