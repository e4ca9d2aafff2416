package largepage

// Configuration: the policies, the sampler sources, and the --large-pages
// option (Parse).

import (
	"fmt"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
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
	// Source is the guest-physical sampler: SourceGuest (the guest's own
	// page-table accessed bits only, read at each window's pause),
	// SourceDAMON (the kernel's
	// DAMON, where it has virtual-address operations and is free),
	// SourceRefault (revoke and count refaults), or SourceAuto (default):
	// DAMON where it can be used, else refaults.
	Source string
	// NoRevoke says the VMM itself reads and writes guest memory while the
	// guest runs (a Linux guest's virtio devices), so the refault sampler,
	// which revokes access to guest pages, must not run: SourceRefault is
	// refused, and SourceAuto falls back to SourceGuest instead; and a
	// promoted region is never demoted (Split write-protects a page for a
	// moment). Start sets it for a Linux machine (a backup's activated
	// guest too).
	NoRevoke bool
	// ExitDetect, when set, reads the guest's accessed bits through shadow
	// copies of its page tables (mmu.ShadowSet) with this exit-detection
	// mode, instead of walking every table every window; address spaces
	// found exiting are no longer counted. Nil: the full walk.
	ExitDetect *mmu.ExitDetect
	// ExitAudit, when not 0 (it needs ExitDetect), runs the exit-detect
	// audit (audit.go): every mode's shadow set side by side at each
	// pause, their decisions scored by the LiveTag at this guest virtual
	// address (Status.Audit). A measuring aid: it multiplies the shadow
	// work by five.
	ExitAudit uint64
	// Heat, if set, seeds the prioritized policy with another controller's
	// heat (Pager.Heat: a failed-over primary's, carried in the
	// checkpoints): the count values of the candidate regions are taken as
	// they were, the warm-up is skipped, and the first window promotes the
	// regions the heat had large, then the hottest others, within Budget.
	Heat *mmu.Heat
}

// The sampler sources.
const (
	SourceAuto    = "auto"
	SourceDAMON   = "damon"
	SourceRefault = "refault"
	SourceGuest   = "guest"
)

// optionList is the --large-pages option list.
var optionList = option.List{Name: "--large-pages", Keys: []string{
	"budget", "policy", "period", "window", "warmup", "samples", "per_window", "alpha", "hysteresis", "seed", "source", "exit-detect", "exit-audit"}}

// Parse parses the --large-pages option string
// "budget=N[,policy=P,period=D,window=D,warmup=N,samples=N,per_window=N,alpha=F,hysteresis=F,seed=N,source=S,exit-detect=M,exit-audit=VA]".
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
			case SourceAuto, SourceDAMON, SourceRefault, SourceGuest:
				c.Source = v
			default:
				err = fmt.Errorf("want auto, damon, refault or guest")
			}
		case "exit-detect":
			d, perr := mmu.ParseExitDetect(v)
			if perr != nil {
				err = fmt.Errorf("want none, min-va, consecutive or both")
			}
			c.ExitDetect = &d
		case "exit-audit":
			var va uint64
			if _, serr := fmt.Sscanf(v, "0x%x", &va); serr != nil || fmt.Sprintf("0x%x", va) != strings.ToLower(v) {
				err = fmt.Errorf("want a hexadecimal address such as 0x7e0000000000")
			} else {
				err = CheckTagVA(va)
			}
			c.ExitAudit = va
		}
		if err != nil {
			return c, optionList.Bad(p, err)
		}
	}
	if c.ExitAudit != 0 && c.ExitDetect == nil {
		return c, fmt.Errorf("--large-pages: exit-audit needs exit-detect=MODE")
	}
	if !budget && c.Policy != PolicyAll && c.Policy != PolicyNone {
		return c, fmt.Errorf("--large-pages: budget=N is required")
	}
	return c, nil
}
