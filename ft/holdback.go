package ft

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// HoldBack is the intermediary's hold-back forwarding policy (seed idea 1):
// pages the primary modifies often are held back, because they will likely
// change again before the backup needs them; the others are staged at the
// backup right away. A sync brings the backup to the latest epoch (every
// held page from the intermediary's image, and the state, committed
// together with what was staged) whenever a bound is passed: held bytes,
// lag in epochs or lag in time. The backup commits only at syncs, so only
// whole epochs; Failover syncs first, so RPO stays 0.
//
// A page is hot when its change frequency (Image: a count of its changes
// that halves every FreqHalfLife epochs, this epoch's change included) is
// at least Threshold. With the default 2, a page changed once is staged;
// one changed again within about a half-life is held. Threshold 0 holds
// every page (a backup's pull policy).
type HoldBack struct {
	Threshold    float64       // hot at or above this change frequency (default 2)
	MaxHeld      uint64        // sync when more page bytes are held (default 64 MiB)
	MaxLagEpochs uint64        // sync when the backup is this many epochs behind (default 200)
	MaxLag       time.Duration // sync when the backup's epoch is this old (default 5 s)
	// Bandwidth caps the page bytes per second staged ahead of a sync
	// (0: no cap); pages over the cap are held for the sync.
	Bandwidth uint64
	// Ranges, if any, limit what goes ahead of a sync (staged pages and
	// manifest entries) to these guest-physical ranges; the sync still
	// brings every page.
	Ranges []Range
	// Manifest selects backup-driven retrieval: nothing is staged on the
	// intermediary's initiative; the backup is sent a manifest of every
	// epoch (wire.Manifest) and requests the pages it wants
	// (wire.PageRequest). Only a backup installs it (ParseBackupPolicy).
	Manifest bool
}

// Range is the guest-physical address range [Start, End), page aligned.
type Range struct{ Start, End uint64 }

func (r Range) String() string { return fmt.Sprintf("%#x-%#x", r.Start, r.End) }

// inRanges reports whether page pfn lies in one of rs (true when rs is empty).
func inRanges(rs []Range, pfn uint64) bool {
	if len(rs) == 0 {
		return true
	}
	a := pfn * mmu.PageSize
	for _, r := range rs {
		if a >= r.Start && a < r.End {
			return true
		}
	}
	return false
}

// DefaultHoldBack is HoldBack with its defaults.
var DefaultHoldBack = HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: 5 * time.Second}

// Decide stages the cold pages (in Ranges, if any) and holds the hot ones,
// within Bandwidth; with Manifest it stages nothing and describes the pages
// in Ranges (the backup asks for what it wants).
func (h HoldBack) Decide(cp *Checkpoint, freq func(i int) float64) Decision {
	d := Decision{Rate: h.Bandwidth}
	for i, pfn := range cp.PFNs {
		switch {
		case !inRanges(h.Ranges, pfn):
		case h.Manifest:
			d.Describe = append(d.Describe, i)
		case freq(i) < h.Threshold:
			d.Stage = append(d.Stage, i)
		}
	}
	return d
}

// SyncNow syncs once any bound is passed.
func (h HoldBack) SyncNow(v BackupView) bool {
	return v.HeldBytes > h.MaxHeld || v.LagEpochs >= h.MaxLagEpochs || v.Lag >= h.MaxLag
}

func (h HoldBack) String() string {
	var s string
	switch {
	case h.Manifest:
		s = fmt.Sprintf("manifest,max-held=%s,max-lag-epochs=%d,max-lag=%v", option.FormatSize(h.MaxHeld), h.MaxLagEpochs, h.MaxLag)
	case h.Threshold == 0:
		s = fmt.Sprintf("pull-every=%v,max-held=%s,max-lag-epochs=%d", h.MaxLag, option.FormatSize(h.MaxHeld), h.MaxLagEpochs)
	default:
		s = fmt.Sprintf("threshold=%g,max-held=%s,max-lag-epochs=%d,max-lag=%v",
			h.Threshold, option.FormatSize(h.MaxHeld), h.MaxLagEpochs, h.MaxLag)
	}
	if h.Bandwidth > 0 {
		s += fmt.Sprintf(",bandwidth=%s/s", option.FormatSize(h.Bandwidth))
	}
	for _, r := range h.Ranges {
		s += ",range=" + r.String()
	}
	return s
}

// CheckMemory fails if a range of h does not start and end inside guest
// memory of memSize bytes (the intermediary refuses such a policy).
func (h HoldBack) CheckMemory(memSize uint64) error {
	return h.checkRegions(mmu.Layout(memSize))
}

func (h HoldBack) checkRegions(regions []mmu.Region) error {
	for _, r := range h.Ranges {
		for _, a := range []uint64{r.Start, r.End - mmu.PageSize} {
			if _, err := mmu.LayoutOffset(regions, a, mmu.PageSize); err != nil {
				return fmt.Errorf("range %v: address %#x is not guest memory", r, a)
			}
		}
	}
	return nil
}

// parseRange parses START-END (sizes or 0x hex addresses, END exclusive,
// both page aligned).
func parseRange(v string) (Range, error) {
	addr := func(s string) (uint64, error) {
		if h, ok := strings.CutPrefix(strings.ToLower(s), "0x"); ok {
			return strconv.ParseUint(h, 16, 64)
		}
		return option.ParseSize(s)
	}
	a, b, ok := strings.Cut(v, "-")
	if !ok {
		return Range{}, fmt.Errorf("%q: want START-END, e.g. 0-64M or 0x100000-0x200000", v)
	}
	start, err1 := addr(a)
	end, err2 := addr(b)
	switch {
	case err1 != nil || err2 != nil:
		return Range{}, fmt.Errorf("%q: want START-END, e.g. 0-64M or 0x100000-0x200000", v)
	case start >= end:
		return Range{}, fmt.Errorf("%q: empty range", v)
	case start%mmu.PageSize != 0 || end%mmu.PageSize != 0:
		return Range{}, fmt.Errorf("%q: not aligned to 4 KiB pages", v)
	}
	return Range{start, end}, nil
}

// ParseHoldBack parses the --hold-back option: "off", or a comma list of
// threshold=F, max-held=SIZE, max-lag-epochs=N and max-lag=DURATION, each
// defaulting as in DefaultHoldBack ("on" takes every default), and
// optionally bandwidth=RATE (a cap on staging: 100Mbit, 12MiB/s) and
// range=START-END (repeatable: stage only pages in these ranges). It
// returns nil for "off".
func ParseHoldBack(s string) (*HoldBack, error) {
	if s == "off" || s == "" {
		return nil, nil
	}
	h := DefaultHoldBack
	if s == "on" {
		return &h, nil
	}
	err := eachKV("hold-back", s, "threshold, max-held, max-lag-epochs, max-lag, bandwidth, range", func(k, v string) (err error) {
		switch k {
		case "threshold":
			h.Threshold, err = strconv.ParseFloat(v, 64)
			if err == nil && !(h.Threshold > 0 && h.Threshold < 1e6) {
				err = fmt.Errorf("want a positive frequency")
			}
		case "max-held":
			h.MaxHeld, err = option.ParseSize(v)
		case "max-lag-epochs":
			h.MaxLagEpochs, err = strconv.ParseUint(v, 10, 64)
			if err == nil && h.MaxLagEpochs == 0 {
				err = fmt.Errorf("want at least 1")
			}
		case "max-lag":
			h.MaxLag, err = time.ParseDuration(v)
			if err == nil && h.MaxLag <= 0 {
				err = fmt.Errorf("want a positive duration")
			}
		case "bandwidth":
			h.Bandwidth, err = option.ParseRate(v)
		case "range":
			var r Range
			if r, err = parseRange(v); err == nil {
				h.Ranges = append(h.Ranges, r)
			}
		default:
			return errUnknownKey
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return &h, nil
}

// errUnknownKey is what an eachKV setter returns for a key it does not know.
var errUnknownKey = errors.New("unknown key")

// eachKV calls set for every key=value of the comma list s (option.List);
// errors name the option (what) and, for an unknown key, the keys there
// are (keys, comma-separated). A key may be given more than once.
func eachKV(what, s, keys string, set func(k, v string) error) error {
	known := strings.Split(keys, ", ")
	l := option.List{Name: what, Keys: known, Repeatable: known}
	pairs, err := l.Parse(s)
	if err != nil {
		return err
	}
	for _, p := range pairs {
		if err := set(p.Key, p.Value); err != nil {
			return l.Bad(p, err)
		}
	}
	return nil
}

// ParseBackupPolicy parses the policy language a backup installs at its
// intermediary (wire.Policy): the keys of ParseHoldBack (a threshold, the
// sync bounds, a bandwidth cap, address ranges), and two more:
//
//   - pull-every=DURATION, a sync schedule: stage nothing and bring the
//     backup up at most every DURATION (the backup pulls everything on its
//     own schedule), unless max-lag-epochs or max-held is passed first. For
//     example "pull-every=2s,max-lag-epochs=400": pull everything at most
//     every two seconds unless the lag exceeds 400 epochs.
//   - manifest: backup-driven retrieval. The intermediary stages nothing
//     itself and sends a manifest of every epoch (the pages that changed,
//     their version and change frequency); the backup requests the pages it
//     selects. Syncs follow the bounds (or pull-every) as before.
//
// Whether ranges lie in guest memory is the intermediary's check
// (HoldBack.CheckMemory).
func ParseBackupPolicy(spec string) (*HoldBack, error) {
	var rest []string
	var pull time.Duration
	manifest := false
	for _, kv := range strings.Split(spec, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "pull-every":
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return nil, fmt.Errorf("policy %q: pull-every=%s: want a positive duration", spec, v)
			}
			pull = d
		case "manifest":
			if kv != "manifest" {
				return nil, fmt.Errorf("policy %q: manifest takes no value", spec)
			}
			manifest = true
		case "ranges":
			return nil, fmt.Errorf("policy %q: ranges: give each as range=START-END", spec)
		default:
			rest = append(rest, kv)
		}
	}
	h := DefaultHoldBack
	if len(rest) > 0 {
		p, err := ParseHoldBack(strings.Join(rest, ","))
		if err != nil {
			return nil, fmt.Errorf("policy %q: %w", spec, err)
		}
		if p == nil {
			return nil, fmt.Errorf("policy %q: off is not a policy", spec)
		}
		h = *p
	}
	if pull > 0 {
		h.Threshold = 0 // every page is hot: everything waits for the pull
		h.MaxLag = pull
	}
	h.Manifest = manifest
	return &h, nil
}
