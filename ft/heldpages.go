package ft

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	xrate "golang.org/x/time/rate"
)

// heldPages is the hold-back ledger of an attached backup: which pages of
// the intermediary's image the backup lacks since its last sync (they
// changed and were not staged since), and the epoch of that sync. Its own
// lock, mu, guards it; a re-seed's snapshot is taken under mu, so that no
// checkpoint is accounted for between the snapshot and the ledger's reset.
// Lock order: heldPages.mu, then backupLink.mu and the image's lock.
type heldPages struct {
	mu       sync.Mutex
	lacks    []bool // by image page (offset / page size); nil: nothing lacking
	lacking  uint64 // how many lacks are set
	synced   uint64 // epoch of the last sync or re-seed queued (0: none yet)
	holdMode bool   // the policy has not sent everything since the last re-seed
	// limiter enforces the policy's cap (rate, bytes/s) on what goes
	// ahead of a sync.
	limiter pageLimiter
	rate    uint64

	// bytes is the intermediary's held-bytes figure (lacking in bytes).
	bytes *atomic.Uint64

	// syncs records the last syncs queued (its own lock).
	syncs syncLog
}

// syncRecord is one hold-back sync: its epoch, when it was queued for the
// backup, the backup's lag then (what the policy's bound is checked
// against: since the epoch of the sync before was applied here), and
// when the backup acknowledged an epoch at or after it (zero until then).
// Queued to acknowledged is how long the sync took: its own bytes, what
// was queued ahead of it on the backup link, the link's round trip and
// the backup's commit.
type syncRecord struct {
	epoch  uint64
	queued time.Time
	lag    time.Duration
	acked  time.Time
}

// syncLog keeps the last len(recent) syncs queued, for figures (the
// ft-holdback benchmark shows them next to the lag it samples).
type syncLog struct {
	mu     sync.Mutex
	recent [64]syncRecord
	n      uint64 // syncs recorded; the latest is recent[(n-1)%len]
}

// add records a sync of epoch e queued now with the backup lagging lag.
func (l *syncLog) add(e uint64, lag time.Duration) {
	l.mu.Lock()
	l.recent[l.n%uint64(len(l.recent))] = syncRecord{epoch: e, queued: time.Now(), lag: lag}
	l.n++
	l.mu.Unlock()
}

// ackedUpTo marks the syncs up to epoch e acknowledged now (the backup
// acknowledges in epoch order).
func (l *syncLog) ackedUpTo(e uint64) {
	now := time.Now()
	l.mu.Lock()
	for i := range l.recent {
		if r := &l.recent[i]; r.epoch != 0 && r.epoch <= e && r.acked.IsZero() {
			r.acked = now
		}
	}
	l.mu.Unlock()
}

// list returns the syncs recorded, oldest first.
func (l *syncLog) list() []syncRecord {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := min(l.n, uint64(len(l.recent)))
	out := make([]syncRecord, 0, k)
	for i := l.n - k; i < l.n; i++ {
		out = append(out, l.recent[i%uint64(len(l.recent))])
	}
	return out
}

// setRate sets the cap on pages staged ahead of a sync (0: none).
func (h *heldPages) setRate(r uint64) {
	h.mu.Lock()
	h.rate = r
	h.mu.Unlock()
}

// reset restarts the ledger from a re-seed of epoch e (0: none yet).
// Call with h.mu held.
func (h *heldPages) reset(e uint64) {
	h.lacks, h.lacking, h.synced, h.holdMode = nil, 0, e, false
	h.bytes.Store(0)
}

// mark records page off (an image page index) as lacking at the backup
// (held) or not (staged or served). Call with h.mu held.
func (h *heldPages) mark(off uint64, lack bool, pages uint64) {
	if h.lacks == nil {
		if !lack {
			return
		}
		h.lacks = make([]bool, pages)
	}
	switch {
	case lack && !h.lacks[off]:
		h.lacks[off] = true
		h.lacking++
	case !lack && h.lacks[off]:
		h.lacks[off] = false
		h.lacking--
	}
}

// lacked reports whether the backup lacks page off. Call with h.mu held.
func (h *heldPages) lacked(off uint64) bool { return h.lacks != nil && h.lacks[off] }

// publish stores the held bytes in the intermediary's figure. Call with
// h.mu held.
func (h *heldPages) publish() { h.bytes.Store(h.lacking * mmu.PageSize) }

// syncCheckpoint builds the hold-back sync to the image's epoch: every
// page held back since the last sync, copied from the image with the sum the
// primary sent it with (the backup checks it end to end), and the state;
// the backup commits it together with the pages staged since. Call with
// b.held.mu held and the image at the last epoch forwarded (in.mu held:
// no checkpoint is between its Apply and its forward).
// A backup with no epoch yet cannot take a delta: it gets a re-seed
// instead, and syncCheckpoint returns nil.
func (in *Intermediary) syncCheckpoint(b *backupLink) *Checkpoint {
	h := &b.held
	if h.synced == 0 {
		h.lacks, h.lacking = nil, 0
		b.requestReseed()
		return nil
	}
	var cp *Checkpoint
	in.img.ReadSummed(func(mem, state []byte, epoch uint64, sum func(p, pfn uint64) uint32) {
		cp = &Checkpoint{Epoch: epoch, Kind: KindSync, Base: h.synced, State: append([]byte(nil), state...)}
		cp.PFNs = make([]uint64, 0, h.lacking)
		cp.Data = make([]byte, 0, h.lacking*mmu.PageSize)
		cp.Sums = make([]uint32, 0, h.lacking)
		for _, r := range in.regions {
			first := r.Offset / mmu.PageSize
			for k := uint64(0); k < r.Size/mmu.PageSize; k++ {
				if off := first + k; h.lacked(off) {
					pfn := r.GPA/mmu.PageSize + k
					cp.PFNs = append(cp.PFNs, pfn)
					cp.Data = append(cp.Data, mem[off*mmu.PageSize:(off+1)*mmu.PageSize]...)
					cp.Sums = append(cp.Sums, sum(off, pfn))
					h.lacks[off] = false
				}
			}
		}
	})
	lag := time.Since(in.appliedAt(h.synced))
	in.log.Debug("hold-back sync", "epoch", cp.Epoch, "base", h.synced, "pages", len(cp.PFNs), "lag", lag)
	h.syncs.add(cp.Epoch, lag)
	h.lacking = 0
	h.synced = cp.Epoch
	in.syncs.Add(1)
	return cp
}

// pageLimiter caps a page rate with a token bucket of bytes
// (golang.org/x/time/rate): refilled at the rate, holding at most a tenth
// of a second's worth (at least two pages), full at first. Not safe for
// concurrent use.
type pageLimiter struct {
	lim  *xrate.Limiter
	rate uint64
}

// take returns how many of n pages may go now at rate bytes/s (0: no cap),
// and spends them.
func (p *pageLimiter) take(rate uint64, n int) int {
	if rate == 0 || n == 0 {
		return n
	}
	now := time.Now()
	burst := int(max(rate/10, 2*mmu.PageSize))
	switch {
	case p.lim == nil:
		p.lim = xrate.NewLimiter(xrate.Limit(rate), burst)
	case p.rate != rate:
		p.lim.SetLimitAt(now, xrate.Limit(rate))
		p.lim.SetBurstAt(now, burst)
	}
	p.rate = rate
	k := min(n, int(p.lim.TokensAt(now)/mmu.PageSize))
	if k > 0 {
		p.lim.AllowN(now, k*mmu.PageSize)
	}
	return k
}
