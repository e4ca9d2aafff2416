package mmu

import (
	"bytes"
	"reflect"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
)

// countGuest builds two processes and a forked child (sharing the kernel
// half, whose 2 MiB pages are RAM) whose 4 KiB frames are guest RAM, so that
// they are counted, plus an identity map with 2 MiB and 4 KiB pages.
func countGuest(t *testing.T) (*sgGuest, []uint64) {
	g := newSGGuest(t, 16<<20)
	g.frame = 8 << 20 // regions 4.. hold the 4 KiB frames
	a := g.process()
	b := g.process()
	g.mapPages(b, bigVA, 700, true) // spans PTb1, PTb2
	child := g.fork(a)
	g.mapPages(child, libVA, 3, true)
	g.put(g.entry(child, stackVA, 1), g.get(g.entry(child, stackVA, 1))|pteA)
	spec := arch.IdentityMapSpec{TablesGPA: 6 << 20, MemSize: 16 << 20, User: true, Small: []uint64{1, 5}}
	tb, id, err := arch.IdentityPageTables(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := g.m.Write(spec.TablesGPA, tb); err != nil {
		t.Fatal(err)
	}
	orEntry(t, g.m, identityEntry(t, g.m, spec.TablesGPA, 1*RegionSize+3*PageSize), accessed)
	orEntry(t, g.m, identityEntry(t, g.m, spec.TablesGPA, 2*RegionSize), accessed)
	takeDirty(t, g.m)
	return g, []uint64{a, b, child, id, a | 0x18} // a repeated CR3 (flag bits) adds nothing
}

// trackAll tracks every CR3 in a new set and updates it.
func trackAll(t *testing.T, g *sgGuest, d ExitDetect, cr3s []uint64) *ShadowSet {
	t.Helper()
	s := NewShadowSet(ShadowConfig{Detect: d})
	for _, cr3 := range cr3s {
		if err := s.Track(g.m, cr3); err != nil {
			t.Fatalf("Track(%#x) = %v", cr3, err)
		}
	}
	if ts := s.Update(g.m, nil); len(ts) != 0 {
		t.Fatalf("Update right after Track = %d transitions, want none", len(ts))
	}
	return s
}

// TestShadowCountAccessed: on the same guest memory the shadow-based count
// equals the walk's, clearing writes the same bytes and dirties the same
// pages, the shadows stay equal to guest memory (no transitions for the
// VMM's own clears), and after the guest sets A bits again both agree again.
func TestShadowCountAccessed(t *testing.T) {
	gw, cr3s := countGuest(t) // counted by walking
	gs, _ := countGuest(t)    // counted from the shadows
	if !bytes.Equal(gw.m.Backing(), gs.m.Backing()) {
		t.Fatal("the two guests differ")
	}
	s := trackAll(t, gs, ExitDetectBoth, cr3s)

	check := func(step string, clear, some bool) {
		t.Helper()
		want, _, err := gw.m.CountAccessed(cr3s, clear)
		if err != nil {
			t.Fatal(err)
		}
		got, st, err := s.CountAccessed(gs.m, cr3s, clear)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: ShadowSet.CountAccessed = %+v, want (Memory.CountAccessed) %+v", step, got, want)
		}
		if (len(want.Accessed4K) > 0) != some || len(want.LargeAccessed) > 0 != some {
			t.Errorf("%s: accessed 4 KiB %v, 2 MiB %v; want some: %v", step, want.Accessed4K, want.LargeAccessed, some)
		}
		if st.Malformed() != 0 || st.Truncated || st.Tables == 0 {
			t.Errorf("%s: stats %+v", step, st)
		}
		if !bytes.Equal(gw.m.Backing(), gs.m.Backing()) {
			t.Errorf("%s: guest memory differs after the counts", step)
		}
		if dw, ds := takeDirty(t, gw.m), takeDirty(t, gs.m); !reflect.DeepEqual(dw, ds) {
			t.Errorf("%s: dirtied pages %v, want %v", step, ds, dw)
		}
		checkShadows(t, s, gs.m)
		if ts := s.Update(gs.m, nil); len(ts) != 0 {
			t.Errorf("%s: Update after counting = %d transitions (first %+v), want none", step, len(ts), ts[0])
		}
	}
	check("count", false, true)
	check("count and clear", true, true)
	check("count after clear", false, false)
	before := s.Stats()

	// The guest accesses some pages again (its MMU sets A): the next Update
	// sees exactly those as flag changes, and the counts agree again.
	for _, g := range []*sgGuest{gw, gs} {
		for _, va := range []uint64{textVA + PageSize, heapVA + 5*PageSize, mmapVA} {
			ea := g.entry(cr3s[0], va, 1)
			g.put(ea, g.get(ea)|pteA)
		}
		ea := g.entry(cr3s[1], bigVA+600*PageSize, 1)
		g.put(ea, g.get(ea)|pteA)
		// A 2 MiB page of the kernel half, copied in each of the 3 spaces.
		ea = g.get(g.kernel)&arch.PTEAddrMask + 8
		g.put(ea, g.get(ea)|pteA)
	}
	if ts := s.Update(gs.m, nil); len(ts) != 7 || countKind(ts, FlagsChanged) != 7 {
		t.Errorf("Update after the guest set 5 A bits = %+v, want 7 flag changes", ts)
	}
	if s.Stats().Transitions() != before.Transitions()+7 {
		t.Errorf("transitions %d, want %d", s.Stats().Transitions(), before.Transitions()+7)
	}
	check("count again", false, true)
	check("count and clear again", true, true)
}

// TestShadowCountExiting: an address space found exiting is no longer
// counted; without exit detection it still is, as by the walk.
func TestShadowCountExiting(t *testing.T) {
	for _, d := range allModes {
		t.Run(d.String(), func(t *testing.T) {
			g := newSGGuest(t, 16<<20)
			g.frame = 8 << 20
			a := g.process()
			g.frame = 12 << 20
			b := g.process()
			s := trackAll(t, g, d, []uint64{a, b})
			// Process a starts exiting: its text pages (the second holds its
			// accessed minimum VA) and heap pages are cleared.
			g.zap(a, textVA, heapVA+40*PageSize)
			s.Update(g.m, nil)
			info, _ := s.Space(a)
			want := []uint64{a, b}
			if d != ExitDetectNone {
				if !info.Exiting {
					t.Fatalf("space %#x not found exiting: %+v", a, info)
				}
				want = []uint64{b}
			}
			wra, _, _ := g.m.CountAccessed(want, false)
			ra, _, err := s.CountAccessed(g.m, []uint64{a, b}, false)
			if err != nil || !reflect.DeepEqual(ra, wra) {
				t.Errorf("CountAccessed([a b]) = %+v, %v; want that of %#x: %+v", ra, err, want, wra)
			}
			if _, ok := ra.Accessed4K[(8<<20)/RegionSize]; ok != (d == ExitDetectNone) {
				t.Errorf("region of the exiting space counted: %v (exit-detect=%s)", ok, d)
			}
		})
	}
}
