package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
	"golang.org/x/sys/unix"
)

// The large-page benchmark: the touch payload over 256 regions (a 512 MiB
// working set in a 1 GiB guest), 16 hot regions taking 7/8 of the reads,
// vCPU 0 pinned to the last host CPU. Each policy runs lpRuns times,
// interleaved (see BenchmarkLargePage).
const (
	lpRegions  = 256
	lpHot      = 16
	lpAccesses = 500000
	lpMeasure  = 1500 * time.Millisecond
	// lpMinRounds is the fewest rounds a measurement takes (about 45 fit
	// in lpMeasure on an idle host).
	lpMinRounds = 20
)

// lpRuns is the number of runs per policy; UNDERSTUDY_BENCH_RUNS overrides
// it for quick trials.
var lpRuns = envInt("UNDERSTUDY_BENCH_RUNS", 7)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

type lpResult struct {
	nsPerAccess float64 // with the policy, once settled
	nsBefore    float64 // the same guest before the policy started
	ratio       float64 // nsPerAccess / nsBefore
	pages2M     uint64
	precision   float64
	status      largepage.Status
}

// runTouch runs one touch guest under cfg (nil: no large-page management)
// and returns the median time per read once the policy has settled.
// Time is the vCPU thread's CPU time (the guest's time is accounted to the
// thread that runs it), read as each round's record exits to the VMM on
// that thread: the time the host spends running other work while the vCPU
// waits for a CPU is not in it, so a loaded host does not inflate it.
func runTouch(b *testing.B, cfg *largepage.Config) lpResult {
	b.Helper()
	var mu sync.Mutex
	var stamps []time.Duration // the vCPU thread's CPU time at each record
	marked := make(chan struct{})
	pin := runtime.NumCPU() - 1
	m, err := vmm.New(vmm.Config{MemSize: 1 << 30, Affinity: []int{pin}, Payload: &vmm.PayloadConfig{Name: "touch",
		Options: map[string]string{"regions": fmt.Sprint(lpRegions), "hot": fmt.Sprint(lpHot), "hot_permille": "875",
			"accesses": fmt.Sprint(lpAccesses), "rounds": "0"},
		OnMark: func(int, uint32) { close(marked) },
		OnRecord: func(vmm.Record) {
			var ts unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
				panic(err)
			}
			mu.Lock()
			stamps = append(stamps, time.Duration(ts.Nano()))
			mu.Unlock()
		}},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			b.Fatal(err)
		}
	}()
	<-marked
	data := m.DataRegions()
	hot := map[uint64]bool{}
	for j := uint64(0); j < lpHot; j++ {
		hot[data[0]+j*(lpRegions/lpHot)] = true
	}
	measure := func() float64 {
		mu.Lock()
		from := len(stamps)
		mu.Unlock()
		// At least lpMeasure and lpMinRounds rounds: a loaded host gives
		// the guest less of each second.
		time.Sleep(lpMeasure)
		var rounds []time.Duration
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
			mu.Lock()
			rounds = append(rounds[:0], stamps[from:]...)
			mu.Unlock()
			if len(rounds) >= lpMinRounds {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("only %d rounds in %v", len(rounds), lpMeasure+time.Minute)
			}
		}
		var per []float64
		for i := 1; i < len(rounds); i++ {
			per = append(per, float64((rounds[i]-rounds[i-1]).Nanoseconds())/lpAccesses)
		}
		return medianF(per)
	}
	before := measure()
	var lp *largepage.Pager
	if cfg != nil {
		c := *cfg
		if c.Regions == nil {
			c.Regions = data[:lpRegions]
		} else if c.Regions[0] == 0 { // the oracle: exactly the hot regions
			c.Regions = nil
			for r := range hot {
				c.Regions = append(c.Regions, r)
			}
		}
		if lp, err = largepage.Start(m, c); err != nil {
			b.Fatal(err)
		}
		defer lp.Stop()
		want := c.Budget
		if c.Policy == largepage.PolicyAll {
			want = len(c.Regions)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			st := lp.Status()
			if st.Err != "" {
				b.Fatal(st.Err)
			}
			if len(st.Promoted) >= want && (c.Policy != largepage.PolicyPrioritized || st.Windows >= st.FirstPromotion+3) {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("policy %s did not settle: %s", c.Policy, st)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	after := measure()
	r := lpResult{nsPerAccess: after, nsBefore: before, ratio: after / before}
	if lp != nil {
		r.status = lp.Status()
		r.pages2M = r.status.Pages2M
		n := 0
		for _, p := range r.status.Promoted {
			if hot[p] {
				n++
			}
		}
		if len(r.status.Promoted) > 0 {
			r.precision = float64(n) / float64(len(r.status.Promoted))
		}
	}
	return r
}

func medianF(v []float64) float64 { return quantile(v, 0.5) }

// quantile returns the q-quantile of v (nearest rank on the sorted values;
// q = 0.5 is the median, the upper one for an even count).
func quantile(v []float64, q float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[int(q*float64(len(s)-1)+0.5)]
}

// BenchmarkLargePage compares none, random-16, prioritized-16, all-256 and
// the hot-16 oracle. The policies run round-robin, lpRuns rounds, each
// round starting one policy further on, so that a change of load on the
// host hits every policy alike and none always follows the same one. Each
// run measures the same guest before its policy starts and after it has
// settled; the lines use these same-guest ratios, which cancel the drift
// in memory latency between runs on a shared host: a run's ns value is
// normalised as before_median * its ratio. Each policy's line gives the
// median of its runs and their spread (p25, p75, iqr_ns = p75 - p25), so
// that one run tells two policies apart when their spreads do not overlap.
// The summary compares prioritized with random round by round (the two
// runs of a round are minutes apart at most): prioritized_wins counts the
// rounds in which prioritized's ratio was the lower, and separated says
// whether prioritized's p75 lies below random's p25.
// recovered_gain = (none-prioritized)/(none-all) on the medians.
func BenchmarkLargePage(b *testing.B) {
	requireKVM(b)
	policies := []struct {
		name string
		cfg  *largepage.Config
	}{
		{"none", nil},
		{"random-16", &largepage.Config{Policy: largepage.PolicyRandom, Budget: lpHot}},
		{"prioritized-16", &largepage.Config{Policy: largepage.PolicyPrioritized, Budget: lpHot}},
		{"all-256", &largepage.Config{Policy: largepage.PolicyAll}},
		// Told which regions are hot, without sampling: the ceiling for any
		// policy that promotes 16 regions.
		{"hot-16-oracle", &largepage.Config{Policy: largepage.PolicyAll, Regions: []uint64{0}}},
	}
	ns := map[string][]float64{}
	ratio := map[string][]float64{}
	p2m := map[string][]float64{}
	var before, precision []float64
	for run := 0; run < lpRuns; run++ {
		for k := range policies {
			i := (run + k) % len(policies)
			p := policies[i]
			cfg := p.cfg
			if cfg != nil {
				c := *cfg
				c.Seed = uint64(run*10 + i + 1)
				cfg = &c
			}
			r := runTouch(b, cfg)
			ns[p.name] = append(ns[p.name], r.nsPerAccess)
			ratio[p.name] = append(ratio[p.name], r.ratio)
			p2m[p.name] = append(p2m[p.name], float64(r.pages2M))
			before = append(before, r.nsBefore)
			if p.name == "prioritized-16" {
				precision = append(precision, r.precision)
			}
		}
	}
	base := medianF(before)
	norm := func(name string, q float64) float64 { return base * quantile(ratio[name], q) }
	for _, p := range policies {
		p25, p75 := norm(p.name, 0.25), norm(p.name, 0.75)
		fmt.Printf("bench largepage: policy=%s ns_per_access=%.1f p25_ns=%.1f p75_ns=%.1f iqr_ns=%.1f pages_2m=%.0f ratio_to_no_policy=%.3f raw_ns_median=%.1f runs=%d\n",
			p.name, norm(p.name, 0.5), p25, p75, p75-p25, medianF(p2m[p.name]), medianF(ratio[p.name]), medianF(ns[p.name]), lpRuns)
	}
	none, all := norm("none", 0.5), norm("all-256", 0.5)
	gain := func(x float64) float64 { return (none - x) / (none - all) }
	var prec float64
	for _, p := range precision {
		prec += p
	}
	wins := 0
	for run := range lpRuns {
		if ratio["prioritized-16"][run] < ratio["random-16"][run] {
			wins++
		}
	}
	separated := "no"
	if norm("prioritized-16", 0.75) < norm("random-16", 0.25) {
		separated = "yes"
	}
	fmt.Printf("bench largepage-summary: recovered_gain=%.2f random_gain=%.2f precision_at_16=%.2f oracle_gain=%.2f prioritized_wins=%d/%d separated=%s clock=vcpu_thread_cpu regions=%d hot=%d hot_share=7/8 lines=1 vcpu_pinned=yes\n",
		gain(norm("prioritized-16", 0.5)), gain(norm("random-16", 0.5)), prec/float64(len(precision)), gain(norm("hot-16-oracle", 0.5)), wins, lpRuns, separated, lpRegions, lpHot)
}

// BenchmarkSampler measures what sampling costs the guest: each run measures
// the same guest without management and then with sampling only (budget 0,
// so nothing is promoted); overhead_pct is the median slowdown. Runs without
// any policy give the noise floor of that ratio. per_gib_us is the sampler's
// own CPU time per window and GiB of candidate memory.
func BenchmarkSampler(b *testing.B) {
	requireKVM(b)
	var ratios, noise, cpuPerGiB, refaults []float64
	for run := 0; run < lpRuns; run++ {
		noise = append(noise, runTouch(b, nil).ratio)
		r := runTouch(b, &largepage.Config{Policy: largepage.PolicyPrioritized, Budget: 0, Warmup: 1})
		ratios = append(ratios, r.ratio)
		st := r.status.Sampler
		gib := float64(lpRegions) * 2 / 1024
		cpuPerGiB = append(cpuPerGiB, float64(st.CPU.Microseconds())/float64(st.Windows)/gib)
		refaults = append(refaults, float64(st.Refaults)/float64(st.Windows))
	}
	fmt.Printf("bench sampler: overhead_pct=%.1f per_gib_us=%.0f noise_pct=%.1f refaults_per_window=%.0f window=10ms period=200ms per_window=32 pages_per_region=8 runs=%d\n",
		100*(medianF(ratios)-1), medianF(cpuPerGiB), 100*(medianF(noise)-1), medianF(refaults), lpRuns)
}
