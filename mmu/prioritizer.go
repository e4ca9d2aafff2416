package mmu

import (
	"fmt"
	"math"
	"sort"
)

// The large-page prioritizer (seed idea 4).
//
// Every window gives n_r, the estimated number of accessed 4 KiB pages of
// region r (0..512). The current count value of a region is an exponentially
// weighted moving average of them:
//
//	c_r(t) = Alpha*n_r(t) + (1-Alpha)*c_r(t-1)
//
// A region mapped large cannot be counted per 4 KiB page; for it a touched
// window holds c_r (n_r = c_r(t-1)) and an untouched one counts as n_r = 0.
//
// During the first Warmup windows the prioritizer only counts. After that,
// Decide ranks the regions that are neither blocked (the guest maps them with
// 4 KiB pages, so KVM could not map them large anyway) nor below MinCount by
// c_r, and keeps the hottest Budget regions promoted. Hysteresis keeps the set
// from flapping: a promoted region is replaced only by a candidate whose count
// exceeds its own by the factor Hysteresis, and by at most MaxChanges
// promotions plus demotions per window.

// PrioritizerConfig configures a Prioritizer.
type PrioritizerConfig struct {
	Budget     int     // regions mapped large at most
	Warmup     int     // windows that only count (default 5)
	Alpha      float64 // weight of the newest window (default 0.5)
	Hysteresis float64 // replacement factor (default 1.5)
	MinCount   float64 // smallest c_r worth promoting (default 1)
	MaxChanges int     // promotions+demotions per window (default: Budget)
}

// Decision is what a window's ranking asks for.
type Decision struct {
	Promote []uint64
	Demote  []uint64
}

// RegionHeat is a region and its current count value.
type RegionHeat struct {
	Region uint64
	Count  float64
}

// Prioritizer keeps per-region count values and the promoted set. It is not
// safe for concurrent use.
type Prioritizer struct {
	cfg      PrioritizerConfig
	windows  int
	counts   map[uint64]float64
	promoted map[uint64]bool
	// seeded: Seed gave the count values, so the warm-up is over;
	// preferred are the regions the seed's host mapped large, promoted
	// first (before hotter candidates) by the next Decide.
	seeded    bool
	preferred map[uint64]bool
}

// NewPrioritizer validates cfg and fills defaults.
func NewPrioritizer(cfg PrioritizerConfig) (*Prioritizer, error) {
	if cfg.Warmup == 0 {
		cfg.Warmup = 5
	}
	if cfg.Alpha == 0 {
		cfg.Alpha = 0.5
	}
	if cfg.Hysteresis == 0 {
		cfg.Hysteresis = 1.5
	}
	if cfg.MinCount == 0 {
		cfg.MinCount = 1
	}
	if cfg.MaxChanges == 0 {
		cfg.MaxChanges = cfg.Budget
	}
	switch {
	case cfg.Budget < 0:
		return nil, fmt.Errorf("large-page budget %d: must not be negative", cfg.Budget)
	case cfg.Warmup < 0:
		return nil, fmt.Errorf("warm-up of %d windows: must not be negative", cfg.Warmup)
	case cfg.Alpha <= 0 || cfg.Alpha > 1 || math.IsNaN(cfg.Alpha):
		return nil, fmt.Errorf("alpha %v: want 0 < alpha <= 1", cfg.Alpha)
	case cfg.Hysteresis < 1 || math.IsNaN(cfg.Hysteresis) || math.IsInf(cfg.Hysteresis, 0):
		return nil, fmt.Errorf("hysteresis %v: want >= 1", cfg.Hysteresis)
	case cfg.MinCount < 0 || math.IsNaN(cfg.MinCount):
		return nil, fmt.Errorf("minimum count %v: must not be negative", cfg.MinCount)
	case cfg.MaxChanges < 0:
		return nil, fmt.Errorf("max changes %d: must not be negative", cfg.MaxChanges)
	}
	return &Prioritizer{cfg: cfg, counts: map[uint64]float64{}, promoted: map[uint64]bool{}}, nil
}

// Config returns the configuration with defaults filled in.
func (p *Prioritizer) Config() PrioritizerConfig { return p.cfg }

// Windows returns how many windows were observed.
func (p *Prioritizer) Windows() int { return p.windows }

// WarmedUp reports whether the first phase is over.
func (p *Prioritizer) WarmedUp() bool { return p.seeded || p.windows >= p.cfg.Warmup }

// Seeded reports whether Seed gave the count values.
func (p *Prioritizer) Seeded() bool { return p.seeded }

// Heat returns the count values (those above zero) and the promoted set, to
// carry to another host. Of more than MaxHeatRegions regions it keeps the
// hottest (and every promoted one).
func (p *Prioritizer) Heat() Heat {
	var h Heat
	for r, c := range p.counts {
		if heatQuant(c) > 0 || p.promoted[r] {
			h.Counts = append(h.Counts, RegionHeat{r, c})
		}
	}
	if len(h.Counts) > MaxHeatRegions {
		sort.Slice(h.Counts, func(i, j int) bool {
			a, b := h.Counts[i], h.Counts[j]
			if p.promoted[a.Region] != p.promoted[b.Region] {
				return p.promoted[a.Region]
			}
			if a.Count != b.Count {
				return a.Count > b.Count
			}
			return a.Region < b.Region
		})
		h.Counts = h.Counts[:MaxHeatRegions]
	}
	sort.Slice(h.Counts, func(i, j int) bool { return h.Counts[i].Region < h.Counts[j].Region })
	h.Large = p.PromotedSet()
	return h
}

// Seed starts the prioritizer from another's heat (see Heat), keeping only
// the regions keep accepts (nil: all): it takes the count values as its own,
// the warm-up is over at once, and the next Decide promotes the regions h
// had large first (within the budget, unless blocked), then the hottest
// others. It is for a prioritizer that has not observed a window yet.
func (p *Prioritizer) Seed(h Heat, keep func(uint64) bool) {
	for _, c := range h.Counts {
		if keep == nil || keep(c.Region) {
			p.counts[c.Region] = min(max(c.Count, 0), MaxHeatCount)
		}
	}
	p.preferred = map[uint64]bool{}
	for _, r := range h.Large {
		if keep == nil || keep(r) {
			p.preferred[r] = true
			if _, ok := p.counts[r]; !ok {
				p.counts[r] = 0
			}
		}
	}
	p.seeded = true
}

// Observe folds one window's counts into the count values. n maps regions to
// their estimated accessed 4 KiB pages; touchedLarge lists promoted regions
// sampled whole, with whether the guest touched them. Regions in neither were
// not sampled in this window and keep their values.
func (p *Prioritizer) Observe(n map[uint64]float64, touchedLarge map[uint64]bool) {
	a := p.cfg.Alpha
	for r, v := range n {
		p.counts[r] = a*v + (1-a)*p.counts[r]
	}
	for r, touched := range touchedLarge {
		if !touched {
			p.counts[r] *= 1 - a
		}
	}
	p.windows++
}

// Count returns region r's current count value.
func (p *Prioritizer) Count(r uint64) float64 { return p.counts[r] }

// Promoted reports whether r is in the promoted set.
func (p *Prioritizer) Promoted(r uint64) bool { return p.promoted[r] }

// PromotedSet returns the promoted regions in ascending order.
func (p *Prioritizer) PromotedSet() []uint64 {
	out := make([]uint64, 0, len(p.promoted))
	for r := range p.promoted {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// SetPromoted records that r was (or failed to be) mapped large.
func (p *Prioritizer) SetPromoted(r uint64, on bool) {
	if on {
		p.promoted[r] = true
	} else {
		delete(p.promoted, r)
	}
}

// Top returns the k regions with the highest count values.
func (p *Prioritizer) Top(k int) []RegionHeat {
	all := make([]RegionHeat, 0, len(p.counts))
	for r, c := range p.counts {
		all = append(all, RegionHeat{r, c})
	}
	sortHeat(all)
	if len(all) > k {
		all = all[:k]
	}
	return all
}

// sortHeat orders by count, hottest first, then by region for determinism.
func sortHeat(h []RegionHeat) {
	sort.Slice(h, func(i, j int) bool {
		if h[i].Count != h[j].Count {
			return h[i].Count > h[j].Count
		}
		return h[i].Region < h[j].Region
	})
}

// Decide returns the promotions and demotions this window calls for. blocked
// reports regions the guest maps with 4 KiB pages: they are never promoted,
// and promoted ones that became blocked are demoted. It does not change the
// promoted set; the caller reports each outcome with SetPromoted.
func (p *Prioritizer) Decide(blocked func(uint64) bool) Decision {
	var d Decision
	if !p.WarmedUp() {
		return d
	}
	changes := 0
	var kept []RegionHeat // promoted and staying, coldest first
	for r := range p.promoted {
		if blocked != nil && blocked(r) {
			d.Demote = append(d.Demote, r)
			changes++
			continue
		}
		kept = append(kept, RegionHeat{r, p.counts[r]})
	}
	sortHeat(kept)
	for i, j := 0, len(kept)-1; i < j; i, j = i+1, j-1 {
		kept[i], kept[j] = kept[j], kept[i]
	}
	var cand []RegionHeat // not promoted, eligible, hottest first
	for r, c := range p.counts {
		if p.promoted[r] || c < p.cfg.MinCount && !p.preferred[r] || (blocked != nil && blocked(r)) {
			continue
		}
		cand = append(cand, RegionHeat{r, c})
	}
	sortHeat(cand)
	if len(p.preferred) > 0 {
		// Seeded: what the seed's host had large goes first, once.
		sort.SliceStable(cand, func(i, j int) bool { return p.preferred[cand[i].Region] && !p.preferred[cand[j].Region] })
		p.preferred = nil
	}
	for len(kept) > p.cfg.Budget && changes < p.cfg.MaxChanges {
		d.Demote = append(d.Demote, kept[0].Region)
		kept = kept[1:]
		changes++
	}
	free := p.cfg.Budget - len(kept)
	for len(cand) > 0 && changes < p.cfg.MaxChanges {
		c := cand[0]
		switch {
		case free > 0:
			free--
		case len(kept) > 0 && c.Count > p.cfg.Hysteresis*kept[0].Count && changes+1 < p.cfg.MaxChanges:
			d.Demote = append(d.Demote, kept[0].Region)
			kept = kept[1:]
			changes++
		default:
			return d
		}
		d.Promote = append(d.Promote, c.Region)
		cand = cand[1:]
		changes++
	}
	return d
}
