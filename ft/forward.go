package ft

import (
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// forward passes an acknowledged checkpoint through the policy to the
// attached backup, if any: the policy's Decision says what goes now, the
// hold-back ledger (heldPages) records what the backup lacks, and the
// backup link's writer sends it. It never blocks on the backup. It
// reports whether cp itself was queued (its page memory is then the
// writer's, which gives it back to in.spare once sent). If shared, cp's
// page memory is the image's (ApplyAdopting): what goes whole is a copy,
// as the image changes with the next checkpoint.
// Call with in.mu held, the image at cp's epoch.
func (in *Intermediary) forward(cp *Checkpoint, shared bool) (queued bool) {
	in.bmu.Lock()
	b := in.backup
	in.bmu.Unlock()
	if b == nil {
		return false
	}
	p := in.policy.get()
	offs := make([]uint64, len(cp.PFNs))
	for i, pfn := range cp.PFNs {
		off, _ := in.PageOffset(pfn) // Apply checked every page
		offs[i] = off / mmu.PageSize
	}
	freq := func(i int) float64 { f, _ := in.img.Frequency(offs[i]); return f }
	d := p.Decide(cp, freq)

	h := &b.held
	h.mu.Lock()
	defer h.mu.Unlock()
	h.rate = d.Rate
	var out []outgoing
	if d.Whole && !h.holdMode {
		if shared {
			out = append(out, outgoing{cp: cp.withOwnPages(in.spare.take(len(cp.Data)))})
		} else {
			out = append(out, outgoing{cp: cp})
			queued = true
		}
		if h.synced != 0 || cp.Kind == KindFull {
			// The backup's base once this arrives: a policy installed
			// later syncs on it.
			h.synced = cp.Epoch
		}
	} else {
		h.holdMode = true
		stage := d.Stage
		if !d.Whole {
			stage = stage[:h.limiter.take(h.rate, len(stage))]
		}
		staged := make(map[int]bool, len(stage))
		for _, i := range stage {
			if i >= 0 && i < len(cp.PFNs) {
				staged[i] = true
			}
		}
		pages := in.img.Pages()
		for i, off := range offs {
			h.mark(off, !staged[i], pages)
		}
		if len(staged) > 0 {
			out = append(out, outgoing{cp: stagedPages(cp, stage)})
		}
		v := BackupView{Epoch: cp.Epoch, Synced: h.synced, HeldBytes: h.lacking * mmu.PageSize,
			LagEpochs: cp.Epoch - min(cp.Epoch, h.synced), Lag: time.Since(in.appliedAt(h.synced))}
		// A backup with no epoch yet is seeded at once, whatever the policy.
		if d.Whole || h.synced == 0 || p.SyncNow(v) {
			if sync := in.syncCheckpoint(b); sync != nil {
				out = append(out, outgoing{cp: sync})
			}
		} else {
			// Tell the backup what changed, unless a sync brings it now.
			for _, m := range manifests(cp, freq, d.Describe) {
				in.manifests.Add(1)
				out = append(out, outgoing{msg: m, epoch: cp.Epoch})
			}
		}
	}
	h.publish()
	if len(out) == 0 {
		return false
	}
	b.enqueue(out...)
	return queued
}

// manifests describes the pages of cp at the indexes describe for the
// backup, in manifests of at most wire.MaxManifestPages pages.
func manifests(cp *Checkpoint, freq func(i int) float64, describe []int) []*wire.Manifest {
	var out []*wire.Manifest
	var m *wire.Manifest
	for _, i := range describe {
		if i < 0 || i >= len(cp.PFNs) {
			continue
		}
		if m == nil || len(m.Pages) == wire.MaxManifestPages {
			m = &wire.Manifest{Epoch: cp.Epoch}
			out = append(out, m)
		}
		m.Pages = append(m.Pages, wire.ManifestPage{PFN: cp.PFNs[i], Freq: wire.FreqFixed(freq(i))})
	}
	return out
}

// stagedPages copies the pages of cp at the indexes stage into a
// KindStagePages checkpoint, with their sums as the primary sent them
// (cp.Sums, which a received checkpoint has), so that the backup checks
// them end to end.
func stagedPages(cp *Checkpoint, stage []int) *Checkpoint {
	out := &Checkpoint{Epoch: cp.Epoch, Kind: KindStagePages, PFNs: make([]uint64, 0, len(stage)), Data: make([]byte, 0, len(stage)*mmu.PageSize)}
	if cp.Sums != nil {
		out.Sums = make([]uint32, 0, len(stage))
	}
	for _, i := range stage {
		if i >= 0 && i < len(cp.PFNs) {
			out.PFNs = append(out.PFNs, cp.PFNs[i])
			out.Data = append(out.Data, cp.Page(i)...)
			if cp.Sums != nil {
				out.Sums = append(out.Sums, cp.Sums[i])
			}
		}
	}
	return out
}

// withOwnPages returns cp with a copy of its page data, in buf if it is
// large enough (the rest shared: a received checkpoint's PFNs, sums and
// state are never written).
func (cp *Checkpoint) withOwnPages(buf []byte) *Checkpoint {
	c := *cp
	c.Data = append(buf[:0], cp.Data...)
	return &c
}
