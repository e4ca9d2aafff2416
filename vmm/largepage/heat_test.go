package largepage

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// heatWarmup is the warm-up of the heat tests' controllers, in windows.
const heatWarmup = 6

// heatConfig is the controller of the heat tests: the hot regions fit the
// budget.
func heatConfig(heat *mmu.Heat) Config {
	return Config{Budget: 4, Period: 60 * time.Millisecond, Window: 8 * time.Millisecond, Warmup: heatWarmup, Seed: 1, Heat: heat}
}

// writtenTouch starts a touch guest (guest4K as in touchMachine) and waits
// until it has written its working set (as TestLargePagesPrioritized does).
func writtenTouch(t testing.TB, guest4K ...uint64) (*vmm.Machine, []uint64, func()) {
	written := make(chan struct{})
	m, hot, cancel, done := touchMachine(t, guest4K, func(c *vmm.Config) {
		mark := c.Payload.OnMark
		c.Payload.OnMark = func(cpu int, phase uint32) { mark(cpu, phase); close(written) }
	})
	testutil.WaitFor(t, "the guest to write its working set", func() bool {
		select {
		case <-written:
			return true
		default:
			return false
		}
	})
	return m, hot, func() { stopMachine(t, cancel, done) }
}

// windowsToLarge starts a controller with cfg on m and returns the number of
// windows it had completed when KVM first mapped a page of the guest with 2
// MiB (pages_2m > 0), and its status then.
func windowsToLarge(t testing.TB, m *vmm.Machine, cfg Config) (int, Status, *Pager) {
	stats, err := m.VM().StatsFD()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	if p2m, _ := stats.Value("pages_2m"); p2m != 0 {
		t.Fatalf("pages_2m = %d before the controller started", p2m)
	}
	lp, err := Start(m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var st Status
	testutil.WaitFor(t, "KVM to map a page with 2 MiB", func() bool {
		// The status first: a window published after the read of
		// pages_2m below cannot have promoted later than it says.
		st = lp.Status()
		if st.Err != "" {
			t.Fatalf("large pages stopped: %s", st.Err)
		}
		p2m, _ := stats.Value("pages_2m")
		return p2m > 0
	}, func() string { return lp.Status().String() })
	return st.Windows + 1, st, lp
}

// allIn reports whether s has n regions, all of them in set.
func allIn(s, set []uint64, n int) bool {
	if len(s) != n {
		return false
	}
	for _, r := range s {
		if !contains(set, r) {
			return false
		}
	}
	return true
}

// learnHeat runs a controller on a touch guest until it has promoted the hot
// regions and returns its heat, decoded, as a checkpoint would carry it.
func learnHeat(t testing.TB) (mmu.Heat, []uint64) {
	m, hot, stop := writtenTouch(t)
	lp, err := Start(m, heatConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, "the hot regions to be promoted", func() bool {
		return allIn(lp.Status().Promoted, hot, len(hot))
	}, func() string { return lp.Status().String() })
	b := lp.Heat()
	lp.Stop()
	stop()
	h, err := mmu.DecodeHeat(b)
	if err != nil {
		t.Fatalf("the pager's heat does not decode: %v", err)
	}
	return h, hot
}

// TestLargePagesHeat: a controller seeded with another's heat (the same
// guest's, on another machine, as a failover carries it) is past its
// warm-up at once, and KVM maps the guest's hot regions with 2 MiB within
// the first window; without the heat the same guest waits out the warm-up.
func TestLargePagesHeat(t *testing.T) {
	requireKVM(t)
	h, hot := learnHeat(t)
	if len(h.Large) != len(hot) {
		t.Fatalf("heat %+v: want the %d hot regions %v large", h, len(hot), hot)
	}
	for _, r := range h.Large {
		if !contains(hot, r) {
			t.Fatalf("heat %+v: large region %d is not hot (%v)", h, r, hot)
		}
	}
	// With the heat: a new guest (the backup's, activated) gets the hot
	// regions at its first window.
	m, _, stop := writtenTouch(t)
	w, st, lp := windowsToLarge(t, m, heatConfig(&h))
	if !st.Seeded || !st.WarmedUp {
		t.Errorf("seeded controller: %s; want seeded and warmed up", st)
	}
	// KVM maps the page large once the guest touches it after the window's
	// collapse: by the end of the next window at the latest, in the host's
	// time; the status read before it may still show that window.
	testutil.WaitFor(t, "the first promotion in the status", func() bool { return lp.Status().FirstPromotion != 0 })
	if st := lp.Status(); w > 2 || st.FirstPromotion != 1 {
		t.Errorf("with heat: pages_2m > 0 in window %d, first promotion in window %d; want the first window (%s)", w, st.FirstPromotion, st)
	}
	testutil.WaitFor(t, "the hot regions promoted", func() bool {
		return allIn(lp.Status().Promoted, hot, len(hot))
	}, func() string { return lp.Status().String() })
	lp.Stop()
	stop()
	// Without it: the warm-up first.
	m2, _, stop2 := writtenTouch(t)
	w2, st2, lp2 := windowsToLarge(t, m2, heatConfig(nil))
	lp2.Stop()
	stop2()
	if w2 < heatWarmup || st2.Seeded {
		t.Errorf("without heat: pages_2m > 0 after %d windows, want no earlier than the last window of the %d-window warm-up (%s)", w2, heatWarmup, st2)
	}
	t.Logf("windows to pages_2m > 0: with heat %d, without %d", w, w2)
}

// BenchmarkHeatSeed measures, on the same guest in the same run, how
// many sampling windows a controller needs before KVM maps the guest's hot
// regions with 2 MiB: seeded with the heat a failover carries, and warming
// up from nothing.
func BenchmarkHeatSeed(b *testing.B) {
	requireKVM(b)
	h, _ := learnHeat(b)
	var with, without int
	for range b.N {
		m, _, stop := writtenTouch(b)
		w, _, lp := windowsToLarge(b, m, heatConfig(&h))
		lp.Stop()
		stop()
		m2, _, stop2 := writtenTouch(b)
		w2, _, lp2 := windowsToLarge(b, m2, heatConfig(nil))
		lp2.Stop()
		stop2()
		with, without = with+w, without+w2
	}
	fmt.Printf("bench heat-seed: windows_to_promote_with_heat=%.1f without=%.1f warmup=%d budget=4 regions=64 hot=4\n",
		float64(with)/float64(b.N), float64(without)/float64(b.N), heatWarmup)
}

// TestCheckpointHeat: while dirty logging is on (a protected guest), the
// windows the refault sampler cannot sample count the pages the
// checkpoints report written, per candidate region, and promote nothing;
// CheckpointHeat returns the heat of the latest window.
func TestCheckpointHeat(t *testing.T) {
	requireKVM(t)
	m, hot, cancel, done := touchMachine(t, nil)
	dl, err := m.Memory().EnableDirtyLog(m.VM())
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Disable()
	lp, err := Start(m, Config{Budget: 2, Period: 30 * time.Millisecond, Window: 5 * time.Millisecond, Warmup: 3, Source: SourceRefault})
	if err != nil {
		t.Fatal(err)
	}
	const perRegion = mmu.RegionSize / mmu.PageSize
	// A checkpoint's pages: all of hot[0], a quarter of hot[1], and pages
	// of a region that is no candidate (below the data regions).
	var dirty []uint64
	for p := uint64(0); p < 4; p++ {
		dirty = append(dirty, p) // region 0: the payload's code and tables
	}
	for p := uint64(0); p < perRegion; p++ {
		dirty = append(dirty, hot[0]*perRegion+p)
	}
	for p := uint64(0); p < perRegion/4; p++ {
		dirty = append(dirty, hot[1]*perRegion+p)
	}
	testutil.WaitFor(t, "four windows of written pages", func() bool {
		lp.CheckpointHeat(dirty)
		time.Sleep(2 * time.Millisecond)
		// Windows is published after the window's counts; every window
		// that counts is one of written pages here.
		return lp.Status().Windows >= 4
	}, func() string { return lp.Status().String() })
	st := lp.Status()
	// Each window counts the distinct pages written since the previous
	// one: 512 in hot[0], 128 in hot[1], however many checkpoints reported
	// them; the count values approach those (c = 1/2 n + 1/2 c).
	c0, c1 := perRegion*(1-1.0/16), perRegion/4*(1-1.0/16)
	if len(st.Top) < 2 || st.Top[0].Region != hot[0] || st.Top[1].Region != hot[1] || st.Top[0].Count < c0 || st.Top[1].Count < c1 ||
		st.Top[1].Count > perRegion/4 || len(st.Promoted) != 0 || !st.Suspended || !st.WarmedUp {
		t.Errorf("after windows of written pages: %s; want %d (toward 512 pages) then %d (toward 128) hottest, nothing promoted", st, hot[0], hot[1])
	}
	if st.WriteWindows < st.Windows || !strings.Contains(st.String(), "write_windows=") {
		t.Errorf("status line %q lacks write_windows", st)
	}
	h, err := mmu.DecodeHeat(lp.CheckpointHeat(nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range h.Counts {
		if c.Region != hot[0] && c.Region != hot[1] {
			t.Errorf("heat %+v: region %d was not written", h, c.Region)
		}
	}
	if len(h.Counts) != 2 || len(h.Large) != 0 {
		t.Errorf("heat %+v: want the two written regions, none large", h)
	}
	lp.Stop()
	stopMachine(t, cancel, done)
}
