package ft

import (
	"errors"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// corruptImagePage flips one byte of page pfn in the intermediary's image,
// as a bookkeeping bug between the page's arrival and its forwarding would.
func corruptImagePage(t *testing.T, in *Intermediary, pfn uint64) {
	t.Helper()
	off, err := in.PageOffset(pfn)
	if err != nil {
		t.Fatal(err)
	}
	in.img.mu.Lock()
	in.img.mem[off+100] ^= 0x5a
	in.img.mu.Unlock()
}

// refusedDigest reports whether err is the backup's refusal of a page
// whose end-to-end sum does not match.
func refusedDigest(err error) bool {
	var we *wire.Error
	return errors.As(err, &we) && (we.Code == wire.CodeIncomplete || we.Code == wire.CodeProtocol)
}

// TestSyncCarriesPrimarySums: a hold-back sync is built from the
// intermediary's image, yet each of its pages goes with the sum the primary
// computed: a page corrupted in the image after it arrived is refused by the
// backup, which commits nothing of the sync, rather than checked against the
// intermediary's own (corrupt) copy.
func TestSyncCarriesPrimarySums(t *testing.T) {
	const memSize = 4 << 20
	in, bk, pc := forwardRig(t, memSize, holdAll{}, BackupConfig{})
	sendAcked(t, pc, holdBackEpoch(1), 0)
	waitFor(t, "the seed", func() bool { return bk.Committed() == 1 })
	b := attachedBackup(in)
	for e := uint64(2); e <= 5; e++ {
		sendAcked(t, pc, holdBackEpoch(e), e-1)
	}
	corruptImagePage(t, in, 11) // a hot page: held back, so in the sync
	err := b.sync(t.Context(), in, 5)
	if !refusedDigest(err) {
		t.Fatalf("sync with a page corrupted at the intermediary = %v, want the backup's refusal", err)
	}
	if got := bk.Committed(); got != 1 {
		t.Errorf("backup committed epoch %d after refusing the sync, want 1", got)
	}
}

// stageCorrupt stages every page of a checkpoint, and first corrupts page
// pfn of the received checkpoint the staged pages are copied from.
type stageCorrupt struct{ pfn uint64 }

func (s stageCorrupt) Decide(cp *Checkpoint, _ func(int) float64) Decision {
	var d Decision
	for i, pfn := range cp.PFNs {
		if pfn == s.pfn {
			cp.Page(i)[7] ^= 0xa5
		}
		d.Stage = append(d.Stage, i)
	}
	return d
}
func (stageCorrupt) SyncNow(BackupView) bool { return false }

// TestStagedCarriesPrimarySums: staged pages go with the primary's sums: a
// page corrupted at the intermediary between its arrival and its staging is
// refused by the backup, and the sync after it is not committed.
func TestStagedCarriesPrimarySums(t *testing.T) {
	const memSize = 4 << 20
	in, bk, pc := forwardRig(t, memSize, stageCorrupt{pfn: 203}, BackupConfig{})
	sendAcked(t, pc, holdBackEpoch(1), 0)
	waitFor(t, "the seed", func() bool { return bk.Committed() == 1 })
	b := attachedBackup(in) // the link ends when the backup refuses
	for e := uint64(2); e <= 4; e++ {
		sendAcked(t, pc, holdBackEpoch(e), e-1)
	}
	err := b.sync(t.Context(), in, 4)
	if !refusedDigest(err) {
		t.Fatalf("staging a page corrupted at the intermediary, then a sync = %v, want the backup's refusal", err)
	}
	if got := bk.Committed(); got != 1 {
		t.Errorf("backup committed epoch %d after refusing staged pages, want 1", got)
	}
}

// TestServedCarriesPrimarySums: pages served on a backup's request come
// from the intermediary's image with the primary's sums: a page corrupted
// in the image is refused by the backup's staging (the check it runs on
// every staged page), the others pass.
func TestServedCarriesPrimarySums(t *testing.T) {
	const memSize = 4 << 20
	in, c := rawBackup(t, memSize, HoldBack{Manifest: true, MaxHeld: 1 << 30, MaxLagEpochs: 1 << 20, MaxLag: time.Hour}, 6)
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bk.Close() })
	maxPFN := uint64(memSize / mmu.PageSize)

	if err := c.WriteMessage(&wire.PageRequest{ID: 1, PFNs: []uint64{10}}); err != nil {
		t.Fatal(err)
	}
	batch, ok := next(t, c).(*wire.PageBatch)
	if !ok || len(batch.Pages) != 1 {
		t.Fatalf("reply to a request for a held page = %v, want it staged", batch)
	}
	if err := bk.stage(batch, maxPFN); err != nil {
		t.Fatalf("backup staging a served page = %v", err)
	}
	next(t, c) // Served

	corruptImagePage(t, in, 11)
	if err := c.WriteMessage(&wire.PageRequest{ID: 2, PFNs: []uint64{11}}); err != nil {
		t.Fatal(err)
	}
	batch, ok = next(t, c).(*wire.PageBatch)
	if !ok || len(batch.Pages) != 1 {
		t.Fatalf("reply to a request for a held page = %v, want it staged", batch)
	}
	if err := bk.stage(batch, maxPFN); !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("backup staging a page corrupted at the intermediary = %v, want ErrBadCheckpoint", err)
	}
}

// TestForwardRecyclesPageMemory: with a backup attached, the page memory of
// a checkpoint the intermediary forwards whole comes back once the backup
// link's writer has sent it, so the intermediary receives the next ones
// into it instead of allocating per epoch; and what the backup commits is
// exactly what was sent (the receiver never writes into memory the writer
// is still sending: the backup's end-to-end check would refuse it), also
// when the primary runs ahead of the backup.
func TestForwardRecyclesPageMemory(t *testing.T) {
	const (
		memSize = 4 << 20
		epochs  = 40
	)
	in, bk, pc := forwardRig(t, memSize, nil, BackupConfig{})
	ref := NewImage(memSize)
	send := func(e uint64) {
		cp := holdBackEpoch(e)
		if err := ref.Apply(cp, e-1, in.PageOffset); err != nil {
			t.Fatal(err)
		}
		sendAcked(t, pc, cp, e-1)
	}
	// In step with the backup: two buffers circulate (one being sent, one
	// being received), so allocations stop after the first epochs.
	for e := uint64(1); e <= epochs; e++ {
		send(e)
		waitFor(t, "the backup's commit", func() bool { return bk.Committed() == e })
	}
	if n := in.spare.misses(); n > 3 {
		t.Errorf("the intermediary allocated page memory for %d of %d checkpoints forwarded whole, want at most 3", n, epochs)
	}
	if !sameImage(ref, bk.Image()) {
		t.Fatalf("backup image at epoch %d differs from what was sent", bk.Committed())
	}
	// Running ahead of the backup: the writer sends while the next
	// checkpoints are received.
	for e := uint64(epochs + 1); e <= 3*epochs; e++ {
		send(e)
	}
	if err := attachedBackup(in).sync(t.Context(), in, 3*epochs); err != nil {
		t.Fatal(err)
	}
	if !sameImage(ref, bk.Image()) {
		t.Errorf("backup image at epoch %d differs from what was sent", bk.Committed())
	}
}

// fullImage is a full image of every page of a memSize guest (laid out as
// the image's memory), page p filled with p+epoch.
func fullImage(epoch, memSize uint64) *Checkpoint {
	var pfns []uint64
	for p := range memSize / mmu.PageSize {
		pfns = append(pfns, p)
	}
	cp := testCheckpoint(epoch, true, pfns...)
	cp.State = []byte("full")
	return cp
}

// TestApplyAdopting: a full image laid out as the image's memory becomes
// the image's memory (the old memory is returned), once the image has an
// epoch; it is applied exactly as a copy would be. A full image of some
// pages only, and an image in guest RAM (NewImageOn), are copied.
func TestApplyAdopting(t *testing.T) {
	const memSize = 1 << 20
	layout := mmu.Layout(memSize)
	off := func(pfn uint64) (uint64, error) { return mmu.LayoutOffset(layout, pfn*mmu.PageSize, mmu.PageSize) }
	im, ref := NewImage(memSize), NewImage(memSize)
	for e, cp := range []*Checkpoint{fullImage(1, memSize), fullImage(2, memSize), testCheckpoint(3, true, 4, 9), fullImage(4, memSize)} {
		old, adopted, err := im.ApplyAdopting(cp, 0, off)
		if err != nil {
			t.Fatal(err)
		}
		if want := e == 1 || e == 3; adopted != want || (old != nil) != want {
			t.Errorf("epoch %d: adopted %v (old memory returned: %v), want %v", cp.Epoch, adopted, old != nil, want)
		}
		if adopted {
			var same bool
			im.Read(func(mem, _ []byte, _ uint64) { same = &mem[0] == &cp.Data[0] })
			if !same || &old[0] == &cp.Data[0] {
				t.Errorf("epoch %d: adopted, yet the image's memory is not the checkpoint's", cp.Epoch)
			}
		}
		if err := ref.Apply(cp, 0, off); err != nil {
			t.Fatal(err)
		}
		if !sameImage(im, ref) {
			t.Fatalf("epoch %d: the adopting image differs from a copying one", cp.Epoch)
		}
	}
	ram := NewImageOn(make([]byte, memSize))
	for _, cp := range []*Checkpoint{fullImage(1, memSize), fullImage(2, memSize)} {
		if _, adopted, err := ram.ApplyAdopting(cp, 0, off); err != nil || adopted {
			t.Errorf("an image in guest RAM: ApplyAdopting(%d) = adopted %v, %v; want a copy", cp.Epoch, adopted, err)
		}
	}
}

// TestForwardAdoptedImage: a full image the intermediary adopts goes to
// the backup as a copy, so that the checkpoints after it, applied to the
// image (the same memory), do not change what is still being sent: the
// backup follows the intermediary's image exactly.
func TestForwardAdoptedImage(t *testing.T) {
	const memSize = 4 << 20
	in, bk, pc := forwardRig(t, memSize, nil, BackupConfig{})
	ref := NewImage(memSize)
	send := func(cp *Checkpoint, base uint64) {
		if err := ref.Apply(cp, base, in.PageOffset); err != nil {
			t.Fatal(err)
		}
		sendAcked(t, pc, cp, base)
	}
	send(fullImage(1, memSize), 0)
	waitFor(t, "the seed", func() bool { return bk.Committed() == 1 })
	for e := uint64(2); e <= 30; e++ {
		if e%5 == 0 {
			send(fullImage(e, memSize), 0) // adopted
		} else {
			send(testCheckpoint(e, false, e, 100+e, 1000), e-1)
		}
	}
	if err := attachedBackup(in).sync(t.Context(), in, 30); err != nil {
		t.Fatal(err)
	}
	if !sameImage(ref, in.Image()) || !sameImage(ref, bk.Image()) {
		t.Errorf("after 30 epochs with adopted full images: intermediary same %v, backup same %v", sameImage(ref, in.Image()), sameImage(ref, bk.Image()))
	}
}
