package largepage

// Status: what the controller reports, and how it refreshes it after each
// window.

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
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
	// Seeded is set when Config.Heat seeded the prioritizer (no warm-up).
	Seeded  bool
	Sampled int // regions sampled per window
	// Period is the current time between windows (it grows while the
	// promoted set holds steady).
	Period   time.Duration
	Promoted []uint64
	Blocked  []uint64 // candidates the guest maps with 4 KiB pages
	Failed   int      // promotions the host refused (fixed policies: still pending)
	Retried  int      // collapses the kernel could not do yet (EAGAIN), tried again later
	Demoted  int      // promoted regions split again (never with Config.NoRevoke)
	// Stretched counts windows dropped because the host stretched them
	// past twice their length (their counts are not comparable).
	Stretched int
	// Unsampled counts refault windows skipped while dirty logging was on
	// (nothing is revoked while checkpoints copy guest memory).
	Unsampled int
	// WriteWindows counts the unsampled windows that counted the pages the
	// checkpoints reported written instead (Pager.CheckpointHeat).
	WriteWindows int
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
	// ExitDetect is the exit-detection mode of the shadow page tables
	// ("": the guest's tables are walked in full); Shadow their counters.
	ExitDetect string
	Shadow     mmu.ShadowStats
	// Audit is each mode's result with the exit-detect audit
	// (Config.ExitAudit), in AuditModes order.
	Audit []AuditResult
	Err   string // why management stopped, if it did
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
	if s.FirstPromotion > 0 {
		line += fmt.Sprintf(" first_promotion=%d", s.FirstPromotion)
	}
	if s.Seeded {
		line += " (seeded with carried heat)"
	}
	if s.Suspended {
		line += " (promotion suspended: dirty logging is on)"
	}
	if s.ExitDetect != "" {
		line += fmt.Sprintf(" exit_detect=%s spaces=%d traced=%d transitions=%d exits=%d dropped=%d freed_KiB=%d",
			s.ExitDetect, s.Shadow.Spaces, s.Shadow.Pages, s.Shadow.Transitions(), s.Shadow.ExitsDetected, s.Shadow.Dropped, s.Shadow.FreedBytes>>10)
	}
	if s.Retried > 0 {
		line += fmt.Sprintf(" retried=%d", s.Retried)
	}
	if s.Demoted > 0 {
		line += fmt.Sprintf(" demoted=%d", s.Demoted)
	}
	if s.Stretched > 0 {
		line += fmt.Sprintf(" stretched=%d", s.Stretched)
	}
	if s.Unsampled > 0 {
		line += fmt.Sprintf(" unsampled=%d", s.Unsampled)
	}
	if s.WriteWindows > 0 {
		line += fmt.Sprintf(" write_windows=%d", s.WriteWindows)
	}
	if s.LastFailure != "" && s.Failed > 0 {
		line += " last_failure=" + s.LastFailure
	}
	if s.Err != "" {
		line += " error=" + s.Err
	}
	return line
}

// Status returns the latest status.
func (lp *Pager) Status() Status {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	s := lp.status
	s.Promoted = append([]uint64(nil), s.Promoted...)
	s.Blocked = append([]uint64(nil), s.Blocked...)
	s.Top = append([]mmu.RegionHeat(nil), s.Top...)
	s.Audit = append([]AuditResult(nil), s.Audit...)
	return s
}

// publish refreshes the status; period is the current sampling period.
func (lp *Pager) publish(blocked map[uint64]bool, period time.Duration) {
	p4k, _ := lp.stats.Value("pages_4k")
	p2m, _ := lp.stats.Value("pages_2m")
	var heat []byte
	if lp.cfg.Policy == PolicyPrioritized {
		var err error
		if heat, err = lp.prio.Heat().MarshalBinary(); err != nil {
			heat = nil // cannot happen: the regions are checked at Start
		}
	}
	lp.mu.Lock()
	defer lp.mu.Unlock()
	lp.heat = heat
	s := &lp.status
	s.Windows = lp.prio.Windows()
	s.WarmedUp = lp.prio.WarmedUp()
	s.Promoted = lp.prio.PromotedSet()
	if blocked != nil {
		s.Blocked = keys(blocked)
	}
	if lp.cfg.Policy == PolicyPrioritized {
		s.Sampled = min(len(lp.cfg.Regions), lp.cfg.PerWindow)
		if lp.damon != nil || s.Source == SourceGuest {
			s.Sampled = len(lp.cfg.Regions) // DAMON or the guest's bits: all of them
		}
		if lp.damon != nil {
			s.DAMON = lp.damon.Stats()
		}
	}
	s.Top = lp.prio.Top(8)
	s.Period = period
	s.Pages4K, s.Pages2M = p4k, p2m
	s.Sampler = lp.sampler.Stats()
	if lp.spaces != nil {
		s.Shadow = lp.spaces.set.Stats()
	}
	if lp.audit != nil {
		s.Audit = lp.audit.results()
	}
}

func keys(m map[uint64]bool) []uint64 {
	out := make([]uint64, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
