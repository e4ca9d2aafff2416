package ft

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// RequestPolicy is how a backup in manifest mode (backup-driven retrieval)
// picks the pages it asks its intermediary for ahead of the next sync. A
// page is worth fetching early once it has settled: it has not changed for
// Settle epochs and its change frequency is below MaxFreq, so it will
// probably not change again before the sync, which then carries less. Pages
// that keep changing are left for the sync, which brings only their last
// version.
type RequestPolicy struct {
	Settle    uint64  // epochs without a change before a page is requested (default 4)
	MaxFreq   float64 // request only pages changing less often than this (default 1.5)
	Bandwidth uint64  // bytes per second of requested pages at most (0: no cap)
}

// DefaultRequestPolicy is RequestPolicy with its defaults.
var DefaultRequestPolicy = RequestPolicy{Settle: 4, MaxFreq: 1.5}

func (r RequestPolicy) String() string {
	s := fmt.Sprintf("settle=%d,max-freq=%g", r.Settle, r.MaxFreq)
	if r.Bandwidth > 0 {
		s += fmt.Sprintf(",bandwidth=%s/s", option.FormatSize(r.Bandwidth))
	}
	return s
}

// ParseRequestPolicy parses the backup's --request option: "on" (the
// defaults), or a comma list of settle=N, max-freq=F and bandwidth=RATE
// (100Mbit, 12MiB/s).
func ParseRequestPolicy(s string) (*RequestPolicy, error) {
	r := DefaultRequestPolicy
	if s == "on" || s == "" {
		return &r, nil
	}
	err := eachKV("request", s, "settle, max-freq, bandwidth", func(k, v string) (err error) {
		switch k {
		case "settle":
			r.Settle, err = strconv.ParseUint(v, 10, 64)
			if err == nil && r.Settle > 1<<20 {
				err = fmt.Errorf("want at most %d epochs", 1<<20)
			}
		case "max-freq":
			r.MaxFreq, err = strconv.ParseFloat(v, 64)
			if err == nil && !(r.MaxFreq > 0 && r.MaxFreq < 1e6) {
				err = fmt.Errorf("want a positive frequency")
			}
		case "bandwidth":
			r.Bandwidth, err = option.ParseRate(v)
		default:
			return errUnknownKey
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return &r, nil
}

// retriever is a backup's side of backup-driven retrieval: what the
// manifests said changed since the last commit and the backup does not hold
// yet, and the requests it made. Only the backup's Serve goroutine uses it.
type retriever struct {
	policy  RequestPolicy
	pending map[uint64]pendingPage
	asked   map[uint64][]uint64 // request ID -> its pages, until Served
	nextID  uint64
	limiter pageLimiter

	manifests, requested, served, refused atomic.Uint64
}

// pendingPage is a page a manifest reported changed.
type pendingPage struct {
	version uint64 // the epoch it last changed in
	freq    float64
	asked   bool // a request for it is outstanding
}

func newRetriever(p RequestPolicy) *retriever {
	return &retriever{policy: p, pending: map[uint64]pendingPage{}, asked: map[uint64][]uint64{}}
}

// manifest records what m says changed (every PFN below maxPFN, or it is
// refused) and returns the requests to make now.
func (r *retriever) manifest(m *wire.Manifest, maxPFN uint64) ([]*wire.PageRequest, error) {
	for _, p := range m.Pages {
		if p.PFN >= maxPFN {
			return nil, badf("manifest of epoch %d: page %#x beyond guest memory", m.Epoch, p.PFN)
		}
	}
	r.manifests.Add(1)
	for _, p := range m.Pages {
		old := r.pending[p.PFN]
		if m.Epoch >= old.version {
			// A newer version: an outstanding request may yet bring an
			// older one; this one is asked for again once it settles.
			r.pending[p.PFN] = pendingPage{version: m.Epoch, freq: p.Frequency()}
		}
	}
	return r.pick(m.Epoch), nil
}

// pick returns requests for the pages settled by epoch now and not asked
// for yet, within the bandwidth cap.
func (r *retriever) pick(now uint64) []*wire.PageRequest {
	var pick []uint64
	for pfn, p := range r.pending {
		if !p.asked && p.version+r.policy.Settle <= now && p.freq < r.policy.MaxFreq {
			pick = append(pick, pfn)
		}
	}
	if len(pick) == 0 {
		return nil
	}
	slices.Sort(pick)
	pick = pick[:r.limiter.take(r.policy.Bandwidth, len(pick))]
	var out []*wire.PageRequest
	for len(pick) > 0 {
		n := min(len(pick), wire.MaxRequestPages)
		r.nextID++
		req := &wire.PageRequest{ID: r.nextID, PFNs: pick[:n:n]}
		for _, pfn := range req.PFNs {
			p := r.pending[pfn]
			p.asked = true
			r.pending[pfn] = p
		}
		r.asked[req.ID] = req.PFNs
		r.requested.Add(uint64(n))
		out = append(out, req)
		pick = pick[n:]
	}
	return out
}

// staged notes pages that arrived staged at version epoch.
func (r *retriever) staged(m *wire.PageBatch) {
	for _, pg := range m.Pages {
		if p, ok := r.pending[pg.PFN]; ok && p.version <= m.Epoch {
			delete(r.pending, pg.PFN)
		}
	}
}

// done ends request id: its pages not brought (they had not changed since
// the sync as far as the intermediary knew, or the cap left them out) may be
// asked for again.
func (r *retriever) done(id uint64, served uint32) {
	r.served.Add(uint64(served))
	for _, pfn := range r.asked[id] {
		if p, ok := r.pending[pfn]; ok {
			p.asked = false
			r.pending[pfn] = p
		}
	}
	delete(r.asked, id)
}

// committed drops what a commit of epoch e covers.
func (r *retriever) committed(e uint64) {
	for pfn, p := range r.pending {
		if p.version <= e {
			delete(r.pending, pfn)
		}
	}
}

// refusedRequest notes a refusal (the request's pages stay pending).
func (r *retriever) refusedRequest(reason string) {
	r.refused.Add(1)
	if id, ok := requestID(reason); ok {
		r.done(id, 0)
	}
}

// requestID reads the request number a refusal quotes ("page request N ...").
func requestID(reason string) (uint64, bool) {
	rest, ok := strings.CutPrefix(reason, "page request ")
	if !ok {
		return 0, false
	}
	num, _, _ := strings.Cut(rest, " ")
	id, err := strconv.ParseUint(num, 10, 64)
	return id, err == nil
}
