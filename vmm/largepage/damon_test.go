package largepage

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// TestDAMONSampler runs the touch guest (4 hot regions of 64) under the
// DAMON sampler where the kernel offers DAMON (the appliance built with
// Debian's 6.12 kernel; UNDERSTUDY_DAMON_REQUIRED=1 makes its absence a
// failure): summed over windows, every hot region counts more accesses than
// any cold one, and the guest's data is intact. Elsewhere it checks that
// DAMON's absence or another owner is reported, and skips.
func TestDAMONSampler(t *testing.T) {
	requireKVM(t)
	// Shared memfd memory: the host backs it with 4 KiB pages even where
	// transparent huge pages are "always" (Debian's kernels), so DAMON
	// samples 4 KiB pages, as it does in regions not promoted yet; a
	// region the host maps large is one page to it, accessed or not.
	m, hot, cancel, done := touchMachine(t, nil, func(c *vmm.Config) { c.Backing = mmu.Memfd })
	d, err := mmu.NewDAMON(m.Memory(), mmu.DAMONConfig{Sample: 5 * time.Millisecond, Aggregate: 100 * time.Millisecond})
	if errors.Is(err, mmu.ErrNoDAMON) || errors.Is(err, mmu.ErrDAMONBusy) {
		stopMachine(t, cancel, done)
		if os.Getenv("UNDERSTUDY_DAMON_REQUIRED") == "1" {
			t.Fatalf("NewDAMON = %v, and DAMON is required here", err)
		}
		t.Skipf("DAMON is not usable here: %v", err)
	}
	if err != nil {
		t.Fatalf("NewDAMON = %v", err)
	}
	sum := map[uint64]float64{}
	hotRegion := map[uint64]bool{}
	for _, r := range hot {
		hotRegion[r] = true
	}
	// Sum windows until every hot region has been seen a few times (an
	// emulated host runs the guest slowly), for at most a minute.
	deadline := time.Now().Add(time.Minute)
	windows := 0
	for {
		c, err := d.Counts()
		if err != nil {
			t.Fatalf("Counts = %v", err)
		}
		windows++
		for r, v := range c {
			sum[r] += v
		}
		least := -1.0
		for _, r := range hot {
			if least < 0 || sum[r] < least {
				least = sum[r]
			}
		}
		if windows >= 10 && least >= 15*512/20 || time.Now().After(deadline) {
			break
		}
	}
	stats := d.Stats()
	if err := d.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	// Large-page management with the DAMON source (auto picks it here):
	// after the warm-up the hot regions are the top four, and nothing
	// else is promoted.
	lp, err := Start(m, Config{Budget: 4, Period: 200 * time.Millisecond, Window: 20 * time.Millisecond, Warmup: 3})
	if err != nil {
		t.Fatalf("Start = %v", err)
	}
	// DAMON aggregates on its own schedule: on a loaded host a window may
	// end before kdamond has reported, with every count 0. Wait (within
	// the patience of every wait) until the counts have put the hot regions
	// on top, after at least eight windows.
	hotOnTop := func(st Status) bool {
		if st.Windows < 8 || len(st.Top) < 4 {
			return false
		}
		for _, h := range st.Top[:4] {
			if !hotRegion[h.Region] || h.Count == 0 {
				return false
			}
		}
		return true
	}
	testutil.WaitFor(t, "eight windows with the hot regions on top", func() bool { return hotOnTop(lp.Status()) }, func() string { return lp.Status().String() })
	st := lp.Stop()
	t.Logf("large pages with DAMON: %s", st)
	if st.Source != SourceDAMON || st.DAMON.Windows < 8 {
		t.Errorf("source %q with %d DAMON windows, want damon and at least 8", st.Source, st.DAMON.Windows)
	}
	if len(st.Top) < 4 {
		t.Fatalf("top regions %v, want at least 4", st.Top)
	}
	for _, h := range st.Top[:4] {
		if !hotRegion[h.Region] {
			t.Errorf("top regions %v: %d is not hot %v", st.Top, h.Region, hot)
		}
	}
	for _, r := range st.Promoted {
		if !hotRegion[r] {
			t.Errorf("promoted %d, not a hot region %v", r, hot)
		}
	}
	stopMachine(t, cancel, done)
	checkTouchData(t, m)
	coldMax, coldAt := 0.0, uint64(0)
	for r, v := range sum {
		if !hotRegion[r] && v > coldMax {
			coldMax, coldAt = v, r
		}
	}
	var line string
	for _, r := range hot {
		line += fmt.Sprintf(" %d:%.0f", r, sum[r])
		if sum[r] <= coldMax {
			t.Errorf("hot region %d summed %.0f, not above the hottest cold region %d (%.0f)", r, sum[r], coldAt, coldMax)
		}
	}
	t.Logf("%d windows (%d regions, %v reading): hot%s; hottest cold %d:%.0f", windows, stats.Regions, stats.CPU, line, coldAt, coldMax)
	if len(sum) == 0 {
		t.Errorf("DAMON reported no region")
	}
}
