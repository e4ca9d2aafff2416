package largepage

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"golang.org/x/sys/unix"
)

// Pager runs large-page management for a machine.
type Pager struct {
	m       *vmm.Machine
	mem     *mmu.Memory
	cfg     Config
	sampler *mmu.Sampler
	damon   *mmu.DAMON // the sampler, if the source is DAMON
	prio    *mmu.Prioritizer
	cursor  int // next candidate to sample (round robin)
	stats   *arch.Stats
	shadow  bool
	spaces  *shadowView // with exit-detect: the shadow page tables
	audit   *exitAudit  // with exit-audit
	cancel  context.CancelFunc
	done    chan struct{}

	// mu guards status and heat.
	mu     sync.Mutex
	status Status
	heat   []byte // the encoded mmu.Heat of the latest window (Heat)
	// writes holds, per candidate region, a bitmap of the pages the
	// checkpoints reported written since the last window
	// (CheckpointHeat); nil: no checkpoint since.
	writes map[uint64]*[regionPages / 64]uint64
	cand   map[uint64]bool // the candidate regions
}

// Start starts large-page management on a machine that is running (or
// about to run). Stop ends it.
func Start(m *vmm.Machine, cfg Config) (*Pager, error) {
	if cfg.Policy == "" {
		cfg.Policy = PolicyPrioritized
	}
	if cfg.Period == 0 {
		cfg.Period = 200 * time.Millisecond
	}
	if cfg.Window == 0 {
		cfg.Window = 10 * time.Millisecond
	}
	if cfg.Window >= cfg.Period {
		return nil, fmt.Errorf("large pages: window %v must be shorter than the period %v", cfg.Window, cfg.Period)
	}
	if len(cfg.Regions) == 0 {
		cfg.Regions = m.DataRegions()
	}
	if m.IsLinux() {
		cfg.NoRevoke = true
	}
	if cfg.PerWindow == 0 {
		cfg.PerWindow = 32
	}
	if cfg.PerWindow < 0 {
		return nil, fmt.Errorf("large pages: %d regions per window: must be positive", cfg.PerWindow)
	}
	if cfg.Warmup == 0 {
		cfg.Warmup = max(5, (len(cfg.Regions)+cfg.PerWindow-1)/cfg.PerWindow)
	}
	if len(cfg.Regions) == 0 {
		return nil, fmt.Errorf("large pages: the guest has no data regions to manage (raise --mem)")
	}
	for _, r := range cfg.Regions {
		if _, err := m.Memory().Offset(r*mmu.RegionSize, mmu.RegionSize); err != nil {
			return nil, fmt.Errorf("large pages: region %d: %w", r, err)
		}
	}
	prio, err := mmu.NewPrioritizer(mmu.PrioritizerConfig{Budget: cfg.Budget, Warmup: cfg.Warmup, Alpha: cfg.Alpha, Hysteresis: cfg.Hysteresis})
	if err != nil {
		return nil, fmt.Errorf("large pages: %w", err)
	}
	cfg.Warmup = prio.Config().Warmup
	sampler, err := mmu.NewSampler(m.Memory(), mmu.SamplerConfig{PagesPerRegion: cfg.PagesPerRegion, Seed: cfg.Seed})
	if err != nil {
		return nil, fmt.Errorf("large pages: %w", err)
	}
	stats, err := m.VM().StatsFD()
	if err != nil {
		return nil, fmt.Errorf("large pages: KVM statistics: %w", err)
	}
	if !stats.Has("pages_2m") || !stats.Has("pages_4k") {
		stats.Close()
		return nil, fmt.Errorf("large pages: this KVM reports no pages_2m/pages_4k statistics")
	}
	ctx, cancel := context.WithCancel(context.Background())
	lp := &Pager{m: m, mem: m.Memory(), cfg: cfg, sampler: sampler, prio: prio, stats: stats, shadow: arch.ShadowPaging(), cancel: cancel, done: make(chan struct{})}
	lp.status.Policy = cfg.Policy
	lp.cand = map[uint64]bool{}
	for _, r := range cfg.Regions {
		lp.cand[r] = true
	}
	if cfg.Heat != nil && cfg.Policy == PolicyPrioritized {
		prio.Seed(*cfg.Heat, func(r uint64) bool { return lp.cand[r] })
		lp.status.Seeded = true
		lp.status.WarmedUp = true
	}
	if cfg.ExitDetect != nil {
		lp.spaces = newShadowView(*cfg.ExitDetect)
		lp.status.ExitDetect = cfg.ExitDetect.String()
		if cfg.ExitAudit != 0 {
			lp.audit = newExitAudit(cfg.ExitAudit)
		}
	}
	if cfg.Policy == PolicyPrioritized {
		if err := lp.pickSource(); err != nil {
			stats.Close()
			return nil, fmt.Errorf("large pages: %w", err)
		}
		if lp.status.Source == SourceRefault {
			m.SetFaultHandler(sampler.Fault)
		}
	}
	go lp.run(ctx)
	return lp, nil
}

// Stop ends management and waits for it; promoted regions stay large.
func (lp *Pager) Stop() Status {
	lp.cancel()
	<-lp.done
	lp.stats.Close()
	if lp.damon != nil {
		if err := lp.damon.Close(); err != nil {
			lp.fail(err)
		}
	}
	return lp.Status()
}

// Heat returns the encoded heat (mmu.Heat) as of the latest window: the
// regions' count values and the promoted set; nil before the first window
// and with the fixed policies. It is a snapshot taken under the pager's
// lock, cheap enough for a checkpoint's pause; the bytes are not changed
// afterwards.
func (lp *Pager) Heat() []byte {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	return lp.heat
}

// CheckpointHeat is for a checkpointer (fault tolerance), at its pause:
// dirty are the guest-physical page frames the guest wrote in the epoch (the
// checkpoint's pages, in ascending order). While dirty logging is on the
// refault sampler revokes nothing, so the pages the guest wrote stand in for
// the pages it accessed: each window folds the writes the checkpoints
// reported since the previous window into the count values (at most a
// region's distinct pages written count, as a window's refaults count the
// distinct pages accessed), and the heat a checkpoint carries is not empty.
// It returns Heat(). Its cost is a map lookup per written region and a bit
// per written page.
func (lp *Pager) CheckpointHeat(dirty []uint64) []byte {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if lp.writes == nil {
		lp.writes = map[uint64]*[regionPages / 64]uint64{}
	}
	for i := 0; i < len(dirty); {
		r, j := dirty[i]/regionPages, i+1
		for j < len(dirty) && dirty[j]/regionPages == r {
			j++
		}
		if lp.cand[r] {
			bm := lp.writes[r]
			if bm == nil {
				bm = new([regionPages / 64]uint64)
				lp.writes[r] = bm
			}
			for _, pfn := range dirty[i:j] {
				p := pfn % regionPages
				bm[p/64] |= 1 << (p % 64)
			}
		}
		i = j
	}
	return lp.heat
}

// regionPages is the number of 4 KiB pages in a 2 MiB region.
const regionPages = mmu.RegionSize / mmu.PageSize

// takeWrites returns the distinct pages written per candidate region since
// the last call (every candidate not promoted, 0 if not written), or nil if
// no checkpoint reported any since.
func (lp *Pager) takeWrites() map[uint64]float64 {
	lp.mu.Lock()
	w := lp.writes
	lp.writes = nil
	lp.mu.Unlock()
	if w == nil {
		return nil
	}
	n := make(map[uint64]float64, len(lp.cfg.Regions))
	for _, r := range lp.cfg.Regions {
		if lp.prio.Promoted(r) {
			continue
		}
		c := 0
		if bm := w[r]; bm != nil {
			for _, x := range bm {
				c += bits.OnesCount64(x)
			}
		}
		n[r] = float64(c)
	}
	return n
}

// dropWrites forgets the written pages reported since the last window.
func (lp *Pager) dropWrites() {
	lp.mu.Lock()
	lp.writes = nil
	lp.mu.Unlock()
}

func (lp *Pager) fail(err error) {
	lp.mu.Lock()
	lp.status.Err = err.Error()
	lp.mu.Unlock()
}

func (lp *Pager) run(ctx context.Context) {
	defer close(lp.done)
	if lp.cfg.Policy != PolicyPrioritized {
		lp.runFixed(ctx)
		return
	}
	defer lp.m.SetFaultHandler(nil)
	backoff := 1
	for {
		blocked, changed, err := lp.window(ctx)
		if err != nil {
			if ctx.Err() == nil {
				lp.fail(err)
			}
			return
		}
		// Once the promoted set holds steady, sample less often (up to
		// MaxBackoff times the period); any change returns to the period.
		if changed || !lp.prio.WarmedUp() {
			backoff = 1
		} else if backoff < MaxBackoff {
			backoff *= 2
		}
		lp.publish(blocked, time.Duration(backoff)*lp.cfg.Period)
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Duration(backoff)*lp.cfg.Period - lp.cfg.Window):
		}
	}
}

// runFixed runs the random, all and none policies.
func (lp *Pager) runFixed(ctx context.Context) {
	tick := time.NewTicker(lp.cfg.Period)
	defer tick.Stop()
	// Fixed policies choose their regions once and promote them as soon
	// as the host can (a region the guest has not touched yet cannot be
	// collapsed), then only refresh the status.
	var targets []uint64
	if lp.cfg.Policy != PolicyNone {
		targets = lp.fixedTargets()
	}
	if lp.spaces != nil {
		// The guest's page tables are read only once here: keep no shadows.
		lp.spaces.reset()
	}
	for {
		failed := 0
		for _, r := range targets {
			if lp.prio.Promoted(r) {
				continue
			}
			if ok, _ := lp.promote(r); !ok {
				failed++ // still pending: tried again next period
			}
		}
		lp.mu.Lock()
		lp.status.Failed = failed
		lp.mu.Unlock()
		lp.publish(nil, 0)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// pauseWait bounds how long a window waits for another controller's pause
// to end (a checkpoint's stun lasts milliseconds).
const pauseWait = 100 * time.Millisecond

// MaxBackoff bounds how far a steady prioritizer stretches its sampling
// period.
const MaxBackoff = 8

// fixedTargets chooses the regions of the random and all policies.
func (lp *Pager) fixedTargets() []uint64 {
	blocked, _ := lp.guestView(false)
	var cand []uint64
	for _, r := range lp.cfg.Regions {
		if !blocked[r] {
			cand = append(cand, r)
		}
	}
	if lp.cfg.Policy == PolicyRandom {
		rng := rand.New(rand.NewPCG(lp.cfg.Seed, 0x7a11))
		rng.Shuffle(len(cand), func(i, j int) { cand[i], cand[j] = cand[j], cand[i] })
		if len(cand) > lp.cfg.Budget {
			cand = cand[:lp.cfg.Budget]
		}
	}
	lp.mu.Lock()
	lp.status.Blocked = keys(blocked)
	lp.mu.Unlock()
	return cand
}

// promote collapses region r and records it if the host backs it huge. It
// reports whether the region is now promoted.
// A collapse the kernel could not do for now (EAGAIN: a page was busy or
// memory short) is not a failure: the region stays a candidate and is tried
// again in a later window; transient reports that.
func (lp *Pager) promote(r uint64) (ok, transient bool) {
	err := lp.mem.Collapse(r)
	ok = err == nil
	if ok {
		ok, err = lp.mem.HugeBacked(r)
	}
	lp.prio.SetPromoted(r, ok)
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if err != nil {
		lp.status.LastFailure = err.Error()
	}
	if ok && lp.status.FirstPromotion == 0 {
		// A seeded controller can promote in a first window that did
		// not count (stretched, or unsampled): that is window 1.
		lp.status.FirstPromotion = max(lp.prio.Windows(), 1)
	}
	if errors.Is(err, unix.EAGAIN) {
		lp.status.Retried++
		return false, true
	}
	return ok, false
}

// act promotes and demotes what the prioritizer decides, unless dirty
// logging is on.
func (lp *Pager) act(blocked map[uint64]bool) (map[uint64]bool, bool, error) {
	if lp.mem.DirtyLogging() {
		// Fault tolerance is on: KVM maps everything with 4 KiB pages while
		// it logs dirty pages, so collapsing would cost CPU and change
		// nothing. Keep counting; promote again once logging stops.
		lp.mu.Lock()
		lp.status.Suspended = true
		lp.mu.Unlock()
		return blocked, false, nil
	}
	lp.mu.Lock()
	lp.status.Suspended = false
	lp.mu.Unlock()
	d := lp.prio.Decide(func(r uint64) bool { return blocked[r] })
	if lp.cfg.NoRevoke && len(d.Demote) > 0 {
		// Split write-protects a page of the region for a moment, and a
		// Linux guest's devices (and KVM, with no refault handler to take
		// the EFAULT) may write it then: a promoted region stays large,
		// and only free budget is filled.
		d.Demote = nil
		free := max(lp.cfg.Budget-len(lp.prio.PromotedSet()), 0)
		d.Promote = d.Promote[:min(free, len(d.Promote))]
	}
	for _, r := range d.Demote {
		if err := lp.mem.Split(r); err != nil {
			return nil, false, err
		}
		lp.prio.SetPromoted(r, false)
		lp.mu.Lock()
		lp.status.Demoted++
		lp.mu.Unlock()
	}
	for _, r := range d.Promote {
		if ok, transient := lp.promote(r); !ok && !transient {
			lp.mu.Lock()
			lp.status.Failed++
			lp.mu.Unlock()
		}
	}
	return blocked, len(d.Promote)+len(d.Demote) > 0, nil
}
