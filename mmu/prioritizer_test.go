package mmu

import (
	"math"
	"reflect"
	"sort"
	"strings"
	"testing"
)

func newPrio(t *testing.T, cfg PrioritizerConfig) *Prioritizer {
	t.Helper()
	p, err := NewPrioritizer(cfg)
	if err != nil {
		t.Fatalf("NewPrioritizer(%+v) = %v", cfg, err)
	}
	return p
}

func sorted(r []uint64) []uint64 {
	out := append([]uint64(nil), r...)
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

func apply(p *Prioritizer, d Decision) {
	for _, r := range d.Demote {
		p.SetPromoted(r, false)
	}
	for _, r := range d.Promote {
		p.SetPromoted(r, true)
	}
}

func TestPrioritizerConfig(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 4})
	c := p.Config()
	if c.Warmup != 5 || c.Alpha != 0.5 || c.Hysteresis != 1.5 || c.MinCount != 1 || c.MaxChanges != 4 {
		t.Errorf("defaults = %+v", c)
	}
	bad := []struct {
		cfg PrioritizerConfig
		sub string
	}{
		{PrioritizerConfig{Budget: -1}, "budget"},
		{PrioritizerConfig{Budget: 1, Warmup: -1}, "warm-up"},
		{PrioritizerConfig{Budget: 1, Alpha: 1.5}, "alpha"},
		{PrioritizerConfig{Budget: 1, Alpha: math.NaN()}, "alpha"},
		{PrioritizerConfig{Budget: 1, Hysteresis: 0.5}, "hysteresis"},
		{PrioritizerConfig{Budget: 1, Hysteresis: math.Inf(1)}, "hysteresis"},
		{PrioritizerConfig{Budget: 1, MinCount: -2}, "minimum"},
		{PrioritizerConfig{Budget: 1, MaxChanges: -1}, "max changes"},
	}
	for _, b := range bad {
		if _, err := NewPrioritizer(b.cfg); err == nil || !strings.Contains(err.Error(), b.sub) {
			t.Errorf("NewPrioritizer(%+v) = %v, want an error about %s", b.cfg, err, b.sub)
		}
	}
}

// TestPrioritizerWarmup: no promotion during the first phase, even for very
// hot regions; counting goes on and decisions start right after it.
func TestPrioritizerWarmup(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 2, Warmup: 3})
	for w := 0; w < 3; w++ {
		if d := p.Decide(nil); len(d.Promote)+len(d.Demote) != 0 {
			t.Fatalf("window %d: Decide = %+v during warm-up", w, d)
		}
		p.Observe(map[uint64]float64{1: 512, 2: 500, 3: 10}, nil)
	}
	if !p.WarmedUp() {
		t.Fatalf("WarmedUp() = false after 3 windows")
	}
	if d := p.Decide(nil); !reflect.DeepEqual(sorted(d.Promote), []uint64{1, 2}) || len(d.Demote) != 0 {
		t.Errorf("Decide after warm-up = %+v, want promote [1 2]", d)
	}
}

func TestPrioritizerCountValue(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 1, Alpha: 0.25})
	p.Observe(map[uint64]float64{7: 400}, nil)
	p.Observe(map[uint64]float64{7: 0}, nil)
	p.Observe(map[uint64]float64{}, nil) // not sampled: keeps its value
	want := (0.25 * 400) * 0.75
	if got := p.Count(7); math.Abs(got-want) > 1e-9 {
		t.Errorf("Count(7) = %v, want %v", got, want)
	}
	// A large (promoted) region holds its value while touched, decays when not.
	p.SetPromoted(7, true)
	before := p.Count(7)
	p.Observe(nil, map[uint64]bool{7: true})
	if p.Count(7) != before {
		t.Errorf("touched large region: Count = %v, want held at %v", p.Count(7), before)
	}
	p.Observe(nil, map[uint64]bool{7: false})
	if got := p.Count(7); math.Abs(got-before*0.75) > 1e-9 {
		t.Errorf("untouched large region: Count = %v, want %v", got, before*0.75)
	}
}

func TestPrioritizerRankingAndBlocked(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 3, Warmup: 1})
	p.Observe(map[uint64]float64{10: 100, 11: 300, 12: 200, 13: 250, 14: 0.5, 15: 400}, nil)
	blocked := func(r uint64) bool { return r == 15 }
	d := p.Decide(blocked)
	if got := sorted(d.Promote); !reflect.DeepEqual(got, []uint64{11, 12, 13}) {
		t.Errorf("Decide promote = %v, want [11 12 13] (15 blocked, 14 below MinCount)", got)
	}
	apply(p, d)
	// A promoted region that becomes blocked is demoted and its slot refilled.
	blocked = func(r uint64) bool { return r == 15 || r == 12 }
	d = p.Decide(blocked)
	if !reflect.DeepEqual(d.Demote, []uint64{12}) || !reflect.DeepEqual(d.Promote, []uint64{10}) {
		t.Errorf("Decide after 12 blocked = %+v, want demote [12] promote [10]", d)
	}
}

// TestPrioritizerHysteresis: a slightly hotter candidate does not displace a
// promoted region; a much hotter one does.
func TestPrioritizerHysteresis(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 2, Warmup: 1, Alpha: 1, Hysteresis: 1.5})
	p.Observe(map[uint64]float64{1: 300, 2: 200, 3: 100}, nil)
	apply(p, p.Decide(nil))
	if got := p.PromotedSet(); !reflect.DeepEqual(got, []uint64{1, 2}) {
		t.Fatalf("promoted %v, want [1 2]", got)
	}
	p.Observe(map[uint64]float64{1: 300, 2: 200, 3: 250}, nil) // 250 < 1.5*200
	if d := p.Decide(nil); len(d.Promote)+len(d.Demote) != 0 {
		t.Errorf("Decide with a slightly hotter candidate = %+v, want no change", d)
	}
	p.Observe(map[uint64]float64{1: 300, 2: 200, 3: 301}, nil) // 301 > 300
	d := p.Decide(nil)
	if !reflect.DeepEqual(d.Demote, []uint64{2}) || !reflect.DeepEqual(d.Promote, []uint64{3}) {
		t.Errorf("Decide with a much hotter candidate = %+v, want demote [2] promote [3]", d)
	}
	// Alternating loads around the threshold must not flap.
	apply(p, d)
	flips := 0
	for i := 0; i < 20; i++ {
		a, b := 280.0, 250.0
		if i%2 == 1 {
			a, b = 250, 280
		}
		p.Observe(map[uint64]float64{1: 300, 2: a, 3: b}, nil)
		d := p.Decide(nil)
		flips += len(d.Promote) + len(d.Demote)
		apply(p, d)
	}
	if flips != 0 {
		t.Errorf("%d promotions/demotions under alternating load, want 0", flips)
	}
}

func TestPrioritizerMaxChangesAndBudgetZero(t *testing.T) {
	p := newPrio(t, PrioritizerConfig{Budget: 8, Warmup: 1, MaxChanges: 3})
	n := map[uint64]float64{}
	for r := uint64(0); r < 20; r++ {
		n[r] = float64(100 + r)
	}
	p.Observe(n, nil)
	d := p.Decide(nil)
	if len(d.Promote) != 3 || !reflect.DeepEqual(sorted(d.Promote), []uint64{17, 18, 19}) {
		t.Errorf("Decide = %+v, want the 3 hottest (MaxChanges 3)", d)
	}
	z := newPrio(t, PrioritizerConfig{Budget: 0, Warmup: 1})
	z.Observe(n, nil)
	if d := z.Decide(nil); len(d.Promote) != 0 {
		t.Errorf("budget 0: Decide = %+v, want nothing", d)
	}
	if top := z.Top(2); len(top) != 2 || top[0].Region != 19 || top[1].Region != 18 {
		t.Errorf("Top(2) = %v, want regions 19, 18", top)
	}
}
