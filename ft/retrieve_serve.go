package ft

import (
	"fmt"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// servePages answers a backup's page request (backup-driven retrieval): the
// requested pages that changed since its last sync and were not staged
// since are staged now, from the image at its current epoch, within the
// policy's bandwidth cap; Served follows them. A request naming a page
// outside guest memory is refused whole (CodeBadRequest) and changes
// nothing. Pages served are no longer held: a sync brings them only if they
// change again. (The image may be one epoch ahead of the ledger, applied
// but not yet forwarded: a page served at that version is then marked
// again by its forward, and a sync brings it again, which is harmless.)
func (in *Intermediary) servePages(b *backupLink, m *wire.PageRequest) {
	for _, pfn := range m.PFNs {
		if _, err := in.PageOffset(pfn); err != nil {
			in.requestsRefused.Add(1)
			in.log.Warn("refused a page request from the backup", "id", m.ID, "pfn", pfn, "err", err)
			b.reply(&wire.Error{Code: wire.CodeBadRequest, Reason: truncate(fmt.Sprintf(
				"page request %d refused: page %#x (address %#x) is outside guest memory (%d pages)",
				m.ID, pfn, pfn*mmu.PageSize, in.img.Pages()), wire.MaxReasonLen)})
			return
		}
	}
	h := &b.held
	h.mu.Lock()
	defer h.mu.Unlock()
	var want []uint64
	if h.synced != 0 {
		for _, pfn := range m.PFNs {
			if off, _ := in.PageOffset(pfn); h.lacked(off / mmu.PageSize) {
				want = append(want, pfn)
			}
		}
		want = want[:h.limiter.take(h.rate, len(want))]
	}
	epoch := max(in.img.Epoch(), 1)
	var out []outgoing
	if len(want) > 0 {
		cp := &Checkpoint{Kind: KindStagePages, PFNs: want, Data: make([]byte, 0, len(want)*mmu.PageSize),
			Sums: make([]uint32, 0, len(want))}
		// Each page goes with the primary's sum (checked end to end).
		in.img.ReadSummed(func(mem, _ []byte, e uint64, sum func(p, pfn uint64) uint32) {
			cp.Epoch = e
			for _, pfn := range want {
				off, _ := in.PageOffset(pfn)
				cp.Data = append(cp.Data, mem[off:off+mmu.PageSize]...)
				cp.Sums = append(cp.Sums, sum(off/mmu.PageSize, pfn))
				h.mark(off/mmu.PageSize, false, 0)
			}
		})
		h.publish()
		in.pagesServed.Add(uint64(len(want)))
		epoch = cp.Epoch
		out = append(out, outgoing{cp: cp})
	}
	out = append(out, outgoing{msg: &wire.Served{ID: m.ID, Epoch: epoch, Pages: uint32(len(want))}})
	in.pagesRequested.Add(uint64(len(m.PFNs)))
	b.enqueue(out...)
}
