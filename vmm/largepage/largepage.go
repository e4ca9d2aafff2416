package largepage

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/option"
	"golang.org/x/sys/unix"
)

// Large-page policies.
const (
	// PolicyPrioritized samples access counts and maps the hottest regions
	// large within the budget (seed idea 4).
	PolicyPrioritized = "prioritized"
	// PolicyRandom maps Budget random candidate regions large at start.
	PolicyRandom = "random"
	// PolicyAll maps every candidate region large at start.
	PolicyAll = "all"
	// PolicyNone maps nothing large.
	PolicyNone = "none"
)

// Config configures large-page management of a machine.
type Config struct {
	Policy string        // PolicyPrioritized (default), PolicyRandom, PolicyAll, PolicyNone
	Budget int           // regions mapped large at most (prioritized, random)
	Period time.Duration // time from one sampling window to the next (default 200ms)
	Window time.Duration // how long a window revokes access (default 10ms)
	// Warmup is how many windows only sample; the default is enough windows
	// to sample every candidate once, and at least 5.
	Warmup         int
	PagesPerRegion int // pages sampled per region and window (default 8)
	// PerWindow is how many not-promoted regions a window samples, taken
	// round robin (default 32); promoted regions are sampled every window.
	// Each sampled region costs two mprotect calls, which also flush the
	// guest's mappings of those pages, so fewer per window cost the guest less.
	PerWindow  int
	Alpha      float64 // count-value weight of the newest window (default 0.5)
	Hysteresis float64 // replacement factor (default 1.5)
	Seed       uint64  // random seed (sample offsets, random policy)
	// Regions are the candidate guest-physical 2 MiB regions; empty means
	// the payload's data regions.
	Regions []uint64
	// Source is the guest-physical sampler: SourceDAMON (the kernel's
	// DAMON, where it has virtual-address operations and is free),
	// SourceRefault (revoke and count refaults), or SourceAuto (default):
	// DAMON where it can be used, else refaults.
	Source string
}

// The sampler sources.
const (
	SourceAuto    = "auto"
	SourceDAMON   = "damon"
	SourceRefault = "refault"
)

// Status is a snapshot of large-page management.
type Status struct {
	Policy string
	// Source is the sampler in use (SourceDAMON or SourceRefault);
	// NoDAMON says why DAMON is not, where the source was auto.
	Source   string
	NoDAMON  string
	Windows  int  // sampling windows completed
	WarmedUp bool // the first (sampling-only) phase is over
	Sampled  int  // regions sampled per window
	// Period is the current time between windows (it grows while the
	// promoted set holds steady).
	Period   time.Duration
	Promoted []uint64
	Blocked  []uint64 // candidates the guest maps with 4 KiB pages
	Failed   int      // promotions the host refused (fixed policies: still pending)
	Retried  int      // collapses the kernel could not do yet (EAGAIN), tried again later
	// Stretched counts windows dropped because the host stretched them
	// past twice their length (their counts are not comparable).
	Stretched int
	// Unsampled counts refault windows skipped while dirty logging was on
	// (nothing is revoked while checkpoints copy guest memory).
	Unsampled int
	// Suspended is set while promotions wait for KVM dirty logging (fault
	// tolerance) to stop.
	Suspended bool
	// LastFailure is the host's reason for the latest refused promotion.
	LastFailure string
	// FirstPromotion is the window in which the first region was promoted
	// (0: none yet).
	FirstPromotion int
	Top            []mmu.RegionHeat
	Pages4K        uint64 // KVM stats
	Pages2M        uint64
	Sampler        mmu.SamplerStats
	DAMON          mmu.DAMONStats // with the DAMON source
	Err            string         // why management stopped, if it did
}

// String formats the status as one line.
func (s Status) String() string {
	var top []string
	for _, h := range s.Top {
		top = append(top, fmt.Sprintf("r%d:%.0f", h.Region, h.Count))
	}
	line := fmt.Sprintf("large-pages: policy=%s source=%s windows=%d period=%v sampled=%d promoted=%d blocked=%d failed=%d pages_2m=%d pages_4k=%d top=%s",
		s.Policy, s.Source, s.Windows, s.Period, s.Sampled, len(s.Promoted), len(s.Blocked), s.Failed, s.Pages2M, s.Pages4K, strings.Join(top, ","))
	if !s.WarmedUp && s.Policy == PolicyPrioritized {
		line += " (warming up)"
	}
	if s.Suspended {
		line += " (promotion suspended: dirty logging is on)"
	}
	if s.Stretched > 0 {
		line += fmt.Sprintf(" stretched=%d", s.Stretched)
	}
	if s.Unsampled > 0 {
		line += fmt.Sprintf(" unsampled=%d", s.Unsampled)
	}
	if s.LastFailure != "" && s.Failed > 0 {
		line += " last_failure=" + s.LastFailure
	}
	if s.Err != "" {
		line += " error=" + s.Err
	}
	return line
}

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
	cancel  context.CancelFunc
	done    chan struct{}

	// mu guards status.
	mu     sync.Mutex
	status Status
}

// optionList is the --large-pages option list.
var optionList = option.List{Name: "--large-pages", Keys: []string{
	"budget", "policy", "period", "window", "warmup", "samples", "per_window", "alpha", "hysteresis", "seed", "source"}}

// Parse parses the --large-pages option string
// "budget=N[,policy=P,period=D,window=D,warmup=N,samples=N,per_window=N,alpha=F,hysteresis=F,seed=N,source=S]".
func Parse(s string) (Config, error) {
	var c Config
	pairs, err := optionList.Parse(s)
	if err != nil {
		return c, err
	}
	budget := false
	for _, p := range pairs {
		var err error
		switch v := p.Value; p.Key {
		case "budget":
			c.Budget, err = option.Int(v, 0, 1<<20)
			budget = true
		case "policy":
			switch v {
			case PolicyPrioritized, PolicyRandom, PolicyAll, PolicyNone:
				c.Policy = v
			default:
				err = fmt.Errorf("want prioritized, random, all or none")
			}
		case "period":
			c.Period, err = option.Duration(v, time.Millisecond, time.Hour)
		case "window":
			c.Window, err = option.Duration(v, 100*time.Microsecond, time.Minute)
		case "warmup":
			c.Warmup, err = option.Int(v, 0, 1<<20)
		case "samples":
			c.PagesPerRegion, err = option.Int(v, 1, 64)
		case "per_window":
			c.PerWindow, err = option.Int(v, 1, 1<<20)
		case "alpha":
			c.Alpha, err = option.Float(v, 0.001, 1)
		case "hysteresis":
			c.Hysteresis, err = option.Float(v, 1, 1000)
		case "seed":
			var n int
			n, err = option.Int(v, 0, 1<<62)
			c.Seed = uint64(n)
		case "source":
			switch v {
			case SourceAuto, SourceDAMON, SourceRefault:
				c.Source = v
			default:
				err = fmt.Errorf("want auto, damon or refault")
			}
		}
		if err != nil {
			return c, optionList.Bad(p, err)
		}
	}
	if !budget && c.Policy != PolicyAll && c.Policy != PolicyNone {
		return c, fmt.Errorf("--large-pages: budget=N is required")
	}
	return c, nil
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
	if cfg.Policy == PolicyPrioritized {
		if err := lp.pickSource(); err != nil {
			stats.Close()
			return nil, fmt.Errorf("large pages: %w", err)
		}
		if lp.damon == nil {
			m.SetFaultHandler(sampler.Fault)
		}
	}
	go lp.run(ctx)
	return lp, nil
}

// pickSource starts DAMON if the source asks for it and it can be used.
// DAMON samples every candidate every window: one page per region per
// sampling interval (a tenth of the window), aggregated over half the
// period.
func (lp *Pager) pickSource() error {
	src := lp.cfg.Source
	if src == "" {
		src = SourceAuto
	}
	if src == SourceRefault {
		lp.status.Source = SourceRefault
		return nil
	}
	d, err := mmu.NewDAMON(lp.mem, mmu.DAMONConfig{Sample: max(lp.cfg.Window/10, 100*time.Microsecond), Aggregate: lp.cfg.Period / 2})
	switch {
	case err == nil:
		lp.damon = d
		lp.status.Source = SourceDAMON
		return nil
	case src == SourceDAMON:
		return err
	}
	lp.status.Source, lp.status.NoDAMON = SourceRefault, err.Error()
	return nil
}

// Status returns the latest status.
func (lp *Pager) Status() Status {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	s := lp.status
	s.Promoted = append([]uint64(nil), s.Promoted...)
	s.Blocked = append([]uint64(nil), s.Blocked...)
	s.Top = append([]mmu.RegionHeat(nil), s.Top...)
	return s
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
		lp.status.FirstPromotion = lp.prio.Windows()
	}
	if errors.Is(err, unix.EAGAIN) {
		lp.status.Retried++
		return false, true
	}
	return ok, false
}

// window runs one sampling window and acts on it. It returns the regions
// the guest maps with 4 KiB pages.
func (lp *Pager) window(ctx context.Context) (blocked map[uint64]bool, changed bool, err error) {
	sample := lp.refaultWindow
	if lp.damon != nil {
		sample = lp.damonWindow
	}
	n, large, ok, err := sample(ctx)
	if err != nil || ctx.Err() != nil {
		return nil, false, err
	}
	blocked, accessed := lp.guestView(true)
	// The guest's own accessed bits are exact where it maps 4 KiB pages.
	for r, a := range accessed {
		if _, sampled := n[r]; sampled && float64(a) > n[r] {
			n[r] = float64(a)
		}
	}
	if ok {
		lp.prio.Observe(n, large)
	}
	return lp.act(blocked)
}

// damonWindow takes DAMON's next aggregation: an estimate for every
// candidate not promoted, and whether each promoted one was touched.
func (lp *Pager) damonWindow(context.Context) (n map[uint64]float64, large map[uint64]bool, ok bool, err error) {
	c, err := lp.damon.Counts()
	if err != nil {
		return nil, nil, false, err
	}
	n, large = map[uint64]float64{}, map[uint64]bool{}
	for _, r := range lp.cfg.Regions {
		if lp.prio.Promoted(r) {
			large[r] = c[r] > 0
		} else {
			n[r] = c[r]
		}
	}
	return n, large, true, nil
}

// refaultWindow samples the promoted regions and the next PerWindow
// candidates with the refault sampler for one window; ok is false for a
// window that does not count.
func (lp *Pager) refaultWindow(ctx context.Context) (n map[uint64]float64, large map[uint64]bool, ok bool, err error) {
	var specs []mmu.SampleSpec
	regions := lp.cfg.Regions
	for _, r := range regions {
		if lp.prio.Promoted(r) {
			specs = append(specs, mmu.SampleSpec{Region: r, Large: true})
		}
	}
	for steps, picked := 0, 0; steps < len(regions) && picked < lp.cfg.PerWindow; steps++ {
		r := regions[lp.cursor%len(regions)]
		lp.cursor++
		if !lp.prio.Promoted(r) {
			specs = append(specs, mmu.SampleSpec{Region: r})
			picked++
		}
	}
	if err := lp.sampler.Arm(specs); errors.Is(err, mmu.ErrLogging) {
		// Protected (fault tolerance): checkpoints copy guest memory, so
		// nothing is revoked, and nothing could be promoted anyway. Wait
		// out the window.
		lp.mu.Lock()
		lp.status.Unsampled++
		lp.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(lp.cfg.Window):
		}
		return nil, nil, false, nil
	} else if err != nil {
		return nil, nil, false, err
	}
	armed := time.Now()
	select {
	case <-ctx.Done():
	case <-time.After(lp.cfg.Window):
	}
	counts, err := lp.sampler.Disarm()
	if err != nil || ctx.Err() != nil {
		return nil, nil, false, err
	}
	if time.Since(armed) > 2*lp.cfg.Window {
		// A loaded host stretched the window: a cold region looks hot
		// after a long one, and a promoted region looks cold if the
		// vCPU did not run in it. Drop it.
		lp.mu.Lock()
		lp.status.Stretched++
		lp.mu.Unlock()
		counts = nil
	}
	n, large = map[uint64]float64{}, map[uint64]bool{}
	for _, c := range counts {
		if c.Large {
			large[c.Region] = c.Accessed > 0
		} else {
			n[c.Region] = c.Estimate()
		}
	}
	return n, large, counts != nil, nil
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
	for _, r := range d.Demote {
		if err := lp.mem.Split(r); err != nil {
			return nil, false, err
		}
		lp.prio.SetPromoted(r, false)
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

// guestView reads the guest's page tables (through the CR3 of every vCPU,
// sampled while they are paused) and returns the candidate regions the guest
// maps with 4 KiB pages (blocked, on shadow-paging hosts) and the number of
// accessed 4 KiB guest PTEs per region. With clear, the accessed bits it
// counted are cleared, which it does only while the vCPUs are paused. It
// shares the machine's pause with other controllers (a checkpointer): while
// one has the machine paused it waits for that pause to end, up to
// pauseWait, and reads nothing if it does not.
func (lp *Pager) guestView(clear bool) (map[uint64]bool, map[uint64]int) {
	m := lp.m
	if _, err := m.PauseWait(pauseWait); err != nil {
		return nil, nil
	}
	var cr3s []uint64
	for i := range m.NumCPUs() {
		_ = m.OnVCPU(i, func(c *arch.VCPU) error {
			s, err := c.Sregs()
			if err == nil && s.CR0&arch.CR0PG != 0 {
				cr3s = append(cr3s, s.CR3)
			}
			return err
		})
	}
	acc, _, err := lp.mem.CountAccessed(cr3s, clear)
	m.Resume()
	if err != nil {
		return nil, nil
	}
	blocked := map[uint64]bool{}
	if lp.shadow {
		cand := map[uint64]bool{}
		for _, r := range lp.cfg.Regions {
			cand[r] = true
		}
		for r := range acc.Mapped4K {
			if cand[r] {
				blocked[r] = true
			}
		}
	}
	return blocked, acc.Accessed4K
}

// publish refreshes the status; period is the current sampling period.
func (lp *Pager) publish(blocked map[uint64]bool, period time.Duration) {
	p4k, _ := lp.stats.Value("pages_4k")
	p2m, _ := lp.stats.Value("pages_2m")
	lp.mu.Lock()
	defer lp.mu.Unlock()
	s := &lp.status
	s.Windows = lp.prio.Windows()
	s.WarmedUp = lp.prio.WarmedUp()
	s.Promoted = lp.prio.PromotedSet()
	if blocked != nil {
		s.Blocked = keys(blocked)
	}
	if lp.cfg.Policy == PolicyPrioritized {
		s.Sampled = min(len(lp.cfg.Regions), lp.cfg.PerWindow)
		if lp.damon != nil {
			s.Sampled = len(lp.cfg.Regions) // DAMON samples them all
			s.DAMON = lp.damon.Stats()
		}
	}
	s.Top = lp.prio.Top(8)
	s.Period = period
	s.Pages4K, s.Pages2M = p4k, p2m
	s.Sampler = lp.sampler.Stats()
}

func keys(m map[uint64]bool) []uint64 {
	out := make([]uint64, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
