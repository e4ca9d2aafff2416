package largepage

import (
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
)

// TestExitAudit scores every mode's decisions on two address spaces: A, an
// exiting process (its lowest accessed page goes first), and B, a live one
// whose tag page says LiveTag and which unmaps two runs of ten pages (a
// big munmap). min-va decides on A only; consecutive takes B's munmap for
// an exit (a false positive); both does both; none decides nothing.
func TestExitAudit(t *testing.T) {
	g := newIDGuest(t, []uint64{1, 3}, tablesA, tablesB)
	const tagVA = 3*2*mib + 40*mmu.PageSize // identity mapped: VA = GPA
	if err := g.m.Write(tagVA, []byte(LiveTag)); err != nil {
		t.Fatal(err)
	}
	g.set(0, tagVA, 0)                                   // A does not map the tag page
	g.set(0, 1*2*mib+7*mmu.PageSize, arch.PTEAccessed)   // A's lowest accessed VA
	g.set(1, 1*2*mib+100*mmu.PageSize, arch.PTEAccessed) // B's
	a := newExitAudit(tagVA)
	cr3s := []uint64{tablesA, tablesB}
	a.observe(g.m, cr3s)
	g.set(0, 1*2*mib+7*mmu.PageSize, 0) // A exits: its lowest page first, then ten more
	for i := uint64(0); i < 10; i++ {
		g.set(0, 3*2*mib+(i+100)*mmu.PageSize, 0)
	}
	for i := uint64(0); i < 10; i++ { // B unmaps 20 pages below and above its lowest
		g.set(1, 1*2*mib+i*mmu.PageSize, 0)
		g.set(1, 3*2*mib+(i+100)*mmu.PageSize, 0)
	}
	a.observe(g.m, []uint64{tablesB})
	want := map[mmu.ExitDetect][2]int{ // detected, false positives
		mmu.ExitDetectNone: {0, 0}, mmu.ExitDetectMinVA: {1, 0}, mmu.ExitDetectConsecutive: {0, 1}, mmu.ExitDetectBoth: {1, 1},
	}
	res := a.results()
	if len(res) != len(AuditModes) {
		t.Fatalf("%d results, want %d", len(res), len(AuditModes))
	}
	for _, r := range res {
		if got := [2]int{r.Detected, r.FalsePositives}; got != want[r.Mode] {
			t.Errorf("%s: detected, false positives = %v, want %v", r, got, want[r.Mode])
		}
		if r.Tracked != 2 || r.Live != 1 {
			t.Errorf("%s: tracked %d live %d, want 2 and 1", r, r.Tracked, r.Live)
		}
		if r.Detected > 0 && r.LatencyP50 != 1 {
			t.Errorf("%s: latency %d, want 1 (the deciding transition is the first unmap)", r, r.LatencyP50)
		}
		if r.TraceEvents > res[0].TraceEvents || r.TraceEvents == 0 {
			t.Errorf("%s: %d trace events, want 1..%d (none's)", r, r.TraceEvents, res[0].TraceEvents)
		}
		if !strings.HasPrefix(r.String(), "mode="+r.Mode.String()+" ") {
			t.Errorf("String() = %q", r.String())
		}
	}
	if res[0].ShortEvents == 0 || res[0].ShortEvents >= res[0].TraceEvents || res[1].ShortEvents >= res[0].ShortEvents {
		t.Errorf("short-lived trace events: none %d of %d, min-va %d; want some, not all, and fewer with min-va", res[0].ShortEvents, res[0].TraceEvents, res[1].ShortEvents)
	}
	if res[3].TraceEvents >= res[0].TraceEvents || res[3].Shadow.FreedBytes == 0 {
		t.Errorf("both: %d trace events (none: %d), %d bytes freed; want fewer events and bytes freed", res[3].TraceEvents, res[0].TraceEvents, res[3].Shadow.FreedBytes)
	}
}

func TestParseExitAudit(t *testing.T) {
	c, err := Parse("budget=2,exit-detect=both,exit-audit=0x7e0000000000")
	if err != nil || c.ExitAudit != 0x7e0000000000 {
		t.Fatalf("Parse = %+v, %v", c, err)
	}
	for _, bad := range []string{
		"budget=2,exit-audit=0x7e0000000000",
		"budget=2,exit-detect=both,exit-audit=0x7e0000000001",
		"budget=2,exit-detect=both,exit-audit=0xffff800000000000",
		"budget=2,exit-detect=both,exit-audit=0",
		"budget=2,exit-detect=both,exit-audit=7e0000000000",
		"budget=2,exit-detect=both,exit-audit=0x7e0000000000x",
	} {
		if _, err := Parse(bad); err == nil || strings.Contains(err.Error(), "\n") {
			t.Errorf("Parse(%q) = %v, want one error line", bad, err)
		}
	}
}
