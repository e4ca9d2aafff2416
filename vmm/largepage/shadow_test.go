package largepage

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
)

// idGuest is real guest memory holding identity page tables (16 MiB: 2 MiB
// pages, 4 KiB pages in the small regions) at each of tables, one address
// space per entry.
type idGuest struct {
	t      *testing.T
	m      *mmu.Memory
	small  []uint64
	tables []uint64
}

func newIDGuest(t *testing.T, small []uint64, tables ...uint64) *idGuest {
	t.Helper()
	m, err := mmu.New(mmu.Config{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	for _, at := range tables {
		tb, _, err := arch.IdentityPageTables(arch.IdentityMapSpec{TablesGPA: at, MemSize: 16 << 20, User: true, Small: small})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Write(at, tb); err != nil {
			t.Fatal(err)
		}
	}
	return &idGuest{t: t, m: m, small: small, tables: tables}
}

// pte returns the GPA of the leaf entry mapping gpa in space s.
func (g *idGuest) pte(s int, gpa uint64) uint64 {
	r := gpa / mmu.RegionSize
	for k, sr := range g.small {
		if sr == r {
			return g.tables[s] + uint64(3+k)*mmu.PageSize + 8*(gpa%mmu.RegionSize/mmu.PageSize)
		}
	}
	return g.tables[s] + 2*mmu.PageSize + 8*r
}

// set ORs bits into the leaf entry mapping gpa in space s (as the guest's
// MMU sets A), or clears the entry if bits is 0.
func (g *idGuest) set(s int, gpa, bits uint64) {
	ea := g.pte(s, gpa)
	v, err := g.m.Uint64(ea)
	if err != nil {
		g.t.Fatal(err)
	}
	if bits == 0 {
		v = 0
	}
	if err := g.m.PutUint64(ea, v|bits); err != nil {
		g.t.Fatal(err)
	}
}

const (
	tablesA = 10 << 20
	tablesB = 11 << 20
	mib     = 1 << 20
)

// TestShadowViewCounts: view after view, with the guest setting A bits in
// between and the view clearing them, the shadow view gives the counts the
// full walk gives on an identical guest, writes the same bytes, and its
// shadows follow (no transitions for its own clears).
func TestShadowViewCounts(t *testing.T) {
	small := []uint64{1, 3, 6}
	gw, gs := newIDGuest(t, small, tablesA, tablesB), newIDGuest(t, small, tablesA, tablesB)
	cr3s := []uint64{tablesA, tablesB, tablesA | 0x8}
	v := newShadowView(mmu.ExitDetectBoth)
	touches := [][]uint64{
		{1*mib*2 + 5*mmu.PageSize, 3*2*mib + 511*mmu.PageSize, 0, 5 * 2 * mib},
		{},
		{6 * 2 * mib, 6*2*mib + mmu.PageSize, 2 * 2 * mib},
		{1 * 2 * mib, 1 * 2 * mib},
	}
	for i, touch := range touches {
		for _, g := range []*idGuest{gw, gs} {
			for j, gpa := range touch {
				g.set(j%2, gpa, arch.PTEAccessed)
			}
		}
		clearA := i%2 == 0
		want, _, err := gw.m.CountAccessed(cr3s, clearA)
		if err != nil {
			t.Fatal(err)
		}
		got, err := v.count(gs.m, cr3s, clearA)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("view %d: shadow counts %+v, want (full walk) %+v", i, got, want)
		}
		if len(touch) > 0 && len(got.Accessed4K)+len(got.LargeAccessed) == 0 {
			t.Errorf("view %d: nothing counted", i)
		}
		if !bytes.Equal(gw.m.Backing(), gs.m.Backing()) {
			t.Errorf("view %d: guest memory differs between the full walk and the shadow view", i)
		}
		if ts := v.set.Update(gs.m, nil); len(ts) != 0 {
			t.Errorf("view %d: Update after the view = %+v, want no transitions", i, ts)
		}
	}
	if st := v.set.Stats(); st.Spaces != 2 || st.Pages != 2*(3+len(small)) {
		t.Errorf("shadow stats %+v, want 2 spaces of %d pages", st, 3+len(small))
	}
}

// TestShadowViewExited: once the exit of an address space is detected
// (min-va: its lowest accessed page is unmapped), its regions are no longer
// counted and it is forgotten; without detection they are counted. Sampled
// again, it is tracked afresh.
func TestShadowViewExited(t *testing.T) {
	for _, d := range []mmu.ExitDetect{mmu.ExitDetectNone, mmu.ExitDetectMinVA} {
		g := newIDGuest(t, []uint64{1, 3}, tablesA, tablesB)
		g.set(0, 1*2*mib+7*mmu.PageSize, arch.PTEAccessed) // space A's lowest accessed VA
		g.set(0, 1*2*mib+8*mmu.PageSize, arch.PTEAccessed)
		g.set(0, 3*2*mib, arch.PTEAccessed)
		g.set(1, 1*2*mib, arch.PTEAccessed)
		v := newShadowView(d)
		cr3s := []uint64{tablesA, tablesB}
		ra, err := v.count(g.m, cr3s, false)
		if err != nil || ra.Accessed4K[1] != 3 || ra.Accessed4K[3] != 1 {
			t.Fatalf("%s: counts %v, %v; want regions 1:3 3:1", d, ra.Accessed4K, err)
		}
		g.set(0, 1*2*mib+7*mmu.PageSize, 0) // space A starts exiting
		ra, err = v.count(g.m, cr3s, false)
		want := map[uint64]int{1: 2, 3: 1}
		if d != mmu.ExitDetectNone {
			want = map[uint64]int{1: 1} // space B's only
		}
		if err != nil || !reflect.DeepEqual(ra.Accessed4K, want) {
			t.Errorf("exit-detect=%s: counts after space A's exit began %v, %v; want %v", d, ra.Accessed4K, err, want)
		}
		if st := v.set.Stats(); st.ExitsDetected != uint64(min(1, int(d))) {
			t.Errorf("exit-detect=%s: %d exits detected", d, st.ExitsDetected)
		}
		// Found exiting, space A is forgotten; sampled again (its CR3
		// reused, or a mistaken exit), it is tracked afresh and counted.
		wantSpaces := cr3s
		if d != mmu.ExitDetectNone {
			wantSpaces = []uint64{tablesB}
		}
		if got := v.set.Spaces(); !reflect.DeepEqual(got, wantSpaces) {
			t.Errorf("exit-detect=%s: spaces after the exit %#x, want %#x", d, got, wantSpaces)
		}
		ra, err = v.count(g.m, cr3s, false)
		if want := map[uint64]int{1: 2, 3: 1}; err != nil || !reflect.DeepEqual(ra.Accessed4K, want) {
			t.Errorf("exit-detect=%s: counts with space A sampled again %v, %v; want %v", d, ra.Accessed4K, err, want)
		}
		if got := v.set.Spaces(); !reflect.DeepEqual(got, cr3s) {
			t.Errorf("exit-detect=%s: spaces with A sampled again %#x, want %#x", d, got, cr3s)
		}
	}
}

// TestShadowViewRootDropped: when the detector drops the root of an address
// space in a view's Update (its teardown reached the top table), the space
// is not tracked again in that view even though a vCPU has its CR3 loaded,
// so what is left of its tables is not counted; it is at the next view.
func TestShadowViewRootDropped(t *testing.T) {
	g := newIDGuest(t, []uint64{1, 3}, tablesA, tablesB)
	// Space A maps the same PDPT at PML4[0] and PML4[1], so a tree is left
	// after PML4[0] is cleared.
	if err := g.m.PutUint64(tablesA+8, (tablesA+mmu.PageSize)|arch.PTEPresent|arch.PTEWrite|arch.PTEUser); err != nil {
		t.Fatal(err)
	}
	g.set(0, 1*2*mib+7*mmu.PageSize, arch.PTEAccessed) // space A's lowest accessed VA
	g.set(0, 3*2*mib, arch.PTEAccessed)
	g.set(1, 1*2*mib, arch.PTEAccessed)
	v := newShadowView(mmu.ExitDetectMinVA)
	cr3s := []uint64{tablesA, tablesB}
	if ra, err := v.count(g.m, cr3s, false); err != nil || !reflect.DeepEqual(ra.Accessed4K, map[uint64]int{1: 2, 3: 1}) {
		t.Fatalf("counts %v, %v; want 1:2 3:1", ra.Accessed4K, err)
	}
	// In one window: the lowest accessed leaf, then PML4[0], are cleared.
	g.set(0, 1*2*mib+7*mmu.PageSize, 0)
	if err := g.m.PutUint64(tablesA, 0); err != nil {
		t.Fatal(err)
	}
	ra, err := v.count(g.m, cr3s, false)
	if want := map[uint64]int{1: 1}; err != nil || !reflect.DeepEqual(ra.Accessed4K, want) {
		t.Errorf("counts in the window the root was dropped %v, %v; want space B's %v", ra.Accessed4K, err, want)
	}
	if st := v.set.Stats(); st.ExitsDetected != 1 || !reflect.DeepEqual(v.set.Spaces(), []uint64{tablesB}) {
		t.Errorf("stats %+v, spaces %#x; want 1 exit, only B", st, v.set.Spaces())
	}
	// Sampled again later, A is tracked afresh (through PML4[1]).
	ra, err = v.count(g.m, cr3s, false)
	if want := map[uint64]int{1: 1, 3: 1}; err != nil || !reflect.DeepEqual(ra.Accessed4K, want) {
		t.Errorf("counts at the next view %v, %v; want %v", ra.Accessed4K, err, want)
	}
}

// TestShadowViewForget: an address space not sampled for ForgetAfter views
// is forgotten; one sampled again in time is kept.
func TestShadowViewForget(t *testing.T) {
	g := newIDGuest(t, []uint64{1}, tablesA, tablesB)
	v := newShadowView(mmu.ExitDetectNone)
	if _, err := v.count(g.m, []uint64{tablesA, tablesB}, false); err != nil {
		t.Fatal(err)
	}
	both, onlyA := []uint64{tablesA, tablesB}, []uint64{tablesA}
	for i := 1; i < ForgetAfter; i++ {
		if _, err := v.count(g.m, onlyA, false); err != nil {
			t.Fatal(err)
		}
		if got := v.set.Spaces(); !reflect.DeepEqual(got, both) {
			t.Fatalf("after %d views without B: spaces %#x, want %#x", i, got, both)
		}
	}
	if _, err := v.count(g.m, onlyA, false); err != nil {
		t.Fatal(err)
	}
	if got := v.set.Spaces(); !reflect.DeepEqual(got, onlyA) {
		t.Fatalf("after %d views without B: spaces %#x, want %#x", ForgetAfter, got, onlyA)
	}
	if st := v.set.Stats(); st.Pages != 4 || st.Unlinked != 4 || len(v.lastSeen) != 1 {
		t.Errorf("after forgetting B: %+v, lastSeen %v; want 4 pages, 4 unlinked", st, v.lastSeen)
	}
	// Sampled again, B is tracked again.
	if _, err := v.count(g.m, both, false); err != nil {
		t.Fatal(err)
	}
	if got := v.set.Spaces(); !reflect.DeepEqual(got, both) {
		t.Errorf("B sampled again: spaces %#x, want %#x", got, both)
	}
	v.reset()
	if st := v.set.Stats(); st.Spaces != 0 || st.Pages != 0 || len(v.lastSeen) != 0 {
		t.Errorf("after reset: %+v, lastSeen %v; want nothing tracked", st, v.lastSeen)
	}
}

func TestStatusExitDetect(t *testing.T) {
	s := Status{Policy: PolicyPrioritized, Source: SourceRefault, WarmedUp: true}
	if line := s.String(); strings.Contains(line, "spaces=") || strings.Contains(line, "exit_detect") {
		t.Errorf("status without exit-detect: %q", line)
	}
	s.ExitDetect = "both"
	s.Shadow = mmu.ShadowStats{Spaces: 3, Pages: 41, Unmapped: 30, Mapped: 9, ExitsDetected: 2, Dropped: 17, FreedBytes: 25 * 4096}
	want := " exit_detect=both spaces=3 traced=41 transitions=39 exits=2 dropped=17 freed_KiB=100"
	if line := s.String(); !strings.Contains(line, want) {
		t.Errorf("status = %q, want it to contain %q", line, want)
	}
}

// TestShadowViewGuest: on a real KVM guest (the touch payload, with 4 KiB
// regions), paused, the shadow view counts what the full walk counts, and
// after it cleared the A bits the walk finds none and the shadows follow.
func TestShadowViewGuest(t *testing.T) {
	requireKVM(t)
	base := touchBase(t)
	m, _, cancel, done := touchMachine(t, []uint64{base + 1, base + 2, base + 40})
	defer stopMachine(t, cancel, done)
	time.Sleep(100 * time.Millisecond)
	v := newShadowView(mmu.ExitDetectBoth)
	for round := 0; round < 3; round++ {
		if _, err := m.PauseWait(time.Second); err != nil {
			t.Fatal(err)
		}
		var cr3s []uint64
		for i := range m.NumCPUs() {
			if err := m.OnVCPU(i, func(c *arch.VCPU) error {
				s, err := c.Sregs()
				if err == nil && s.CR0&arch.CR0PG != 0 {
					cr3s = append(cr3s, s.CR3)
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
		}
		want, _, err := m.Memory().CountAccessed(cr3s, false)
		if err != nil {
			t.Fatal(err)
		}
		got, err := v.count(m.Memory(), cr3s, true)
		if err != nil {
			t.Fatal(err)
		}
		after, _, _ := m.Memory().CountAccessed(cr3s, false)
		ts := v.set.Update(m.Memory(), nil)
		m.Resume()
		if len(cr3s) == 0 {
			t.Fatal("no vCPU has paging on")
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("round %d: shadow counts %+v, want (full walk) %+v", round, got, want)
		}
		if round == 0 && len(want.Accessed4K) == 0 {
			t.Errorf("round 0: no accessed 4 KiB page counted: %+v", want)
		}
		t.Logf("round %d: accessed 4 KiB per region %v", round, want.Accessed4K)
		for _, r := range []uint64{base + 1, base + 2, base + 40} {
			if want.Mapped4K[r] != 512 {
				t.Errorf("round %d: region %d has %d 4 KiB mappings, want 512", round, r, want.Mapped4K[r])
			}
		}
		if len(after.Accessed4K)+len(after.LargeAccessed) != 0 {
			t.Errorf("round %d: accessed after the shadow view cleared: %v %v", round, after.Accessed4K, after.LargeAccessed)
		}
		if len(ts) != 0 {
			t.Errorf("round %d: %d transitions after the view's own clears, want none", round, len(ts))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if st := v.set.Stats(); st.Spaces == 0 || st.Pages == 0 {
		t.Errorf("shadow stats %+v: nothing tracked", st)
	}
}
