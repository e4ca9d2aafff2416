package ft

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
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
}

// DefaultHoldBack is HoldBack with its defaults.
var DefaultHoldBack = HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: 5 * time.Second}

// Split stages the cold pages and holds the hot ones.
func (h HoldBack) Split(cp *Checkpoint, freq func(i int) float64) (bool, []int) {
	var stage []int
	for i := range cp.PFNs {
		if freq(i) < h.Threshold {
			stage = append(stage, i)
		}
	}
	return false, stage
}

// SyncNow syncs once any bound is passed.
func (h HoldBack) SyncNow(v BackupView) bool {
	return v.HeldBytes > h.MaxHeld || v.LagEpochs >= h.MaxLagEpochs || v.Lag >= h.MaxLag
}

func (h HoldBack) String() string {
	if h.Threshold == 0 {
		return fmt.Sprintf("pull-every=%v,max-held=%s,max-lag-epochs=%d", h.MaxLag, vmm.FormatSize(h.MaxHeld), h.MaxLagEpochs)
	}
	return fmt.Sprintf("threshold=%g,max-held=%s,max-lag-epochs=%d,max-lag=%v",
		h.Threshold, vmm.FormatSize(h.MaxHeld), h.MaxLagEpochs, h.MaxLag)
}

// ParseHoldBack parses the --hold-back option: "off", or a comma list of
// threshold=F, max-held=SIZE, max-lag-epochs=N and max-lag=DURATION, each
// defaulting as in DefaultHoldBack ("on" takes every default). It returns
// nil for "off".
func ParseHoldBack(s string) (*HoldBack, error) {
	if s == "off" || s == "" {
		return nil, nil
	}
	h := DefaultHoldBack
	if s == "on" {
		return &h, nil
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("hold-back %q: %q is not key=value", s, kv)
		}
		var err error
		switch k {
		case "threshold":
			h.Threshold, err = strconv.ParseFloat(v, 64)
			if err == nil && !(h.Threshold > 0 && h.Threshold < 1e6) {
				err = fmt.Errorf("want a positive frequency")
			}
		case "max-held":
			h.MaxHeld, err = vmm.ParseSize(v)
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
		default:
			return nil, fmt.Errorf("hold-back %q: unknown key %q (want threshold, max-held, max-lag-epochs, max-lag)", s, k)
		}
		if err != nil {
			return nil, fmt.Errorf("hold-back %s=%s: %w", k, v, err)
		}
	}
	return &h, nil
}

// ParseBackupPolicy parses the policy language a backup installs at its
// intermediary (wire.Policy): the hold-back keys of ParseHoldBack, and
// pull-every=DURATION, which stages nothing and brings the backup up at
// most every DURATION (the backup pulls everything on its own schedule),
// unless max-lag-epochs or max-held is passed first. For example
// "pull-every=2s,max-lag-epochs=400": pull everything at most every two
// seconds unless the lag exceeds 400 epochs. Bandwidth caps and address
// ranges are not part of the language yet and are refused by name.
func ParseBackupPolicy(spec string) (*HoldBack, error) {
	var rest []string
	var pull time.Duration
	for _, kv := range strings.Split(spec, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "pull-every":
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return nil, fmt.Errorf("policy %q: pull-every=%s: want a positive duration", spec, v)
			}
			pull = d
		case "bandwidth", "ranges":
			return nil, fmt.Errorf("policy %q: %s is not supported by this intermediary", spec, k)
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
	return &h, nil
}
