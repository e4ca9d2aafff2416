package ft

import (
	"fmt"
	"sync"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// Image is a replica of guest memory and state as of a complete epoch, kept
// by the intermediary and the backup. It advances only by whole, verified
// checkpoints: Apply either applies all of one or nothing.
//
// For every page it also keeps the epoch that last changed it and how many
// of the recent epochs did (the modification-frequency estimate the
// intermediary's forwarding policy uses): Freq is a count of changes that
// halves every FreqHalfLife epochs, updated lazily.
type Image struct {
	// mu guards everything below.
	mu      sync.RWMutex
	mem     []byte
	state   []byte
	epoch   uint64
	changed []uint64  // per page: epoch of its last change
	freq    []float64 // per page: decayed change count as of changed[p]
	sums    []uint32  // per page: its end-to-end sum (wire.PageSum) as received
	summed  []bool    // per page: sums holds its sum (a page no checkpoint wrote has none)
	// owned: mem is the image's own (NewImage), so that ApplyAdopting may
	// replace it; not the guest RAM of NewImageOn, which is handed on.
	owned bool
	size  uint64 // len(mem), fixed (mem may be replaced: ApplyAdopting)
}

// FreqHalfLife is the number of epochs after which a page's change count
// halves.
const FreqHalfLife = 16

// NewImage returns an empty image of size bytes (no epoch yet).
func NewImage(size uint64) *Image {
	im := NewImageOn(make([]byte, size))
	im.owned = true
	return im
}

// NewImageOn returns an empty image kept in mem, whose length is the guest
// memory size (the backup keeps its image in guest RAM it can hand to the
// restored machine).
func NewImageOn(mem []byte) *Image {
	n := uint64(len(mem)) / mmu.PageSize
	return &Image{mem: mem, size: uint64(len(mem)), changed: make([]uint64, n), freq: make([]float64, n), sums: make([]uint32, n), summed: make([]bool, n)}
}

// Epoch returns the image's complete epoch (0: none yet).
func (im *Image) Epoch() uint64 {
	im.mu.RLock()
	defer im.mu.RUnlock()
	return im.epoch
}

// Size returns the guest memory size the image holds, in bytes.
func (im *Image) Size() uint64 { return im.size }

// Pages returns the number of pages.
func (im *Image) Pages() uint64 { return uint64(len(im.changed)) }

// Apply applies a verified checkpoint whose delta is based on epoch base. A
// delta must follow the image's epoch exactly; a full image may come at any
// time (a re-seed). pageOffset maps a PFN to its byte offset in the image.
func (im *Image) Apply(cp *Checkpoint, base uint64, pageOffset func(pfn uint64) (uint64, error)) error {
	_, err := im.apply(cp, base, pageOffset, false)
	return err
}

// ApplyAdopting is Apply, except that a full image whose pages lie in
// cp.Data exactly as in the image's memory (every page, in the order of
// their offsets) becomes the image's memory instead of being copied into
// it: the pages were received in their final place. It then returns the
// memory the image held until now, which is the caller's (adopted true),
// and cp.Data is the image's from then on: the caller must not write it,
// nor read it once it gives up the lock that keeps the image at cp's epoch
// (the intermediary's in.mu). Only an image with memory of its own
// (NewImage) and an epoch already adopts.
func (im *Image) ApplyAdopting(cp *Checkpoint, base uint64, pageOffset func(pfn uint64) (uint64, error)) (old []byte, adopted bool, err error) {
	old, err = im.apply(cp, base, pageOffset, im.owned)
	return old, old != nil, err
}

// apply applies cp (see Apply), adopting cp.Data as the image's memory if
// adopt and it is laid out as the image's memory; it returns the replaced
// memory if it did.
func (im *Image) apply(cp *Checkpoint, base uint64, pageOffset func(pfn uint64) (uint64, error), adopt bool) ([]byte, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if cp.Kind != KindFull && (base != im.epoch || im.epoch == 0) {
		return nil, badf("delta %d on epoch %d does not apply to an image at epoch %d", cp.Epoch, base, im.epoch)
	}
	if cp.Epoch <= im.epoch && cp.Kind != KindFull {
		return nil, badf("checkpoint %d is not after the image's epoch %d", cp.Epoch, im.epoch)
	}
	if cp.Sums != nil && len(cp.Sums) != len(cp.PFNs) {
		return nil, badf("checkpoint %d: %d page sums for %d pages", cp.Epoch, len(cp.Sums), len(cp.PFNs))
	}
	// Validate every offset first, so that a bad page changes nothing.
	offs := make([]uint64, len(cp.PFNs))
	for i, pfn := range cp.PFNs {
		off, err := pageOffset(pfn)
		if err != nil || off+mmu.PageSize > uint64(len(im.mem)) {
			return nil, badf("checkpoint %d: page %#x is not guest memory: %v", cp.Epoch, pfn, err)
		}
		offs[i] = off
	}
	// The first image is copied: the image's memory, never written yet,
	// would come back as spare memory whose every page faults on first
	// use; copied into, it faults once now, and the buffers that
	// circulate after it are warm.
	var old []byte
	if adopt && im.epoch != 0 && cp.Kind == KindFull && len(cp.Data) == len(im.mem) && len(offs) == len(im.changed) && inPlace(offs) {
		old, im.mem = im.mem, cp.Data
	}
	for i, off := range offs {
		if old == nil {
			copy(im.mem[off:off+mmu.PageSize], cp.Page(i))
		}
		p := off / mmu.PageSize
		if cp.Sums != nil {
			im.sums[p] = cp.Sums[i]
		} else {
			im.sums[p] = wire.PageSum(cp.PFNs[i], cp.Page(i))
		}
		im.summed[p] = true
		im.freq[p] = decay(im.freq[p], cp.Epoch-min(im.changed[p], cp.Epoch)) + 1
		im.changed[p] = cp.Epoch
	}
	im.state = append(im.state[:0], cp.State...)
	im.epoch = cp.Epoch
	return old, nil
}

// inPlace reports whether page i of a checkpoint lies at offs[i] = i pages
// for every i: its data is laid out as the image's memory.
func inPlace(offs []uint64) bool {
	for i, off := range offs {
		if off != uint64(i)*mmu.PageSize {
			return false
		}
	}
	return true
}

// decay halves f every FreqHalfLife epochs.
func decay(f float64, epochs uint64) float64 {
	for epochs >= FreqHalfLife && f > 0 {
		f /= 2
		epochs -= FreqHalfLife
	}
	return f * (1 - float64(epochs)/(2*FreqHalfLife))
}

// Frequency returns page p's change count as of the image's epoch.
func (im *Image) Frequency(p uint64) (float64, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if p >= uint64(len(im.freq)) {
		return 0, fmt.Errorf("page %d beyond the image's %d pages", p, len(im.freq))
	}
	return decay(im.freq[p], im.epoch-im.changed[p]), nil
}

// Read calls fn with the image's memory, state and epoch under a read lock.
func (im *Image) Read(fn func(mem, state []byte, epoch uint64)) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	fn(im.mem, im.state, im.epoch)
}

// ReadSummed is Read that also passes sum, which returns the end-to-end sum
// of image page p (an offset / page size) at guest page pfn: the sum the
// primary computed for it, as it was received with the page, so that a
// checkpoint built from the image carries the primary's sums and its pages
// are checked end to end, not against the image's own copy. (A page no
// checkpoint wrote, all zeros as the guest started, is summed from the
// image.) sum is valid only inside fn.
func (im *Image) ReadSummed(fn func(mem, state []byte, epoch uint64, sum func(p, pfn uint64) uint32)) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	fn(im.mem, im.state, im.epoch, im.pageSum)
}

// pageSum returns page p's end-to-end sum at pfn (see ReadSummed). Call
// with im.mu held.
func (im *Image) pageSum(p, pfn uint64) uint32 {
	if im.summed[p] {
		return im.sums[p]
	}
	return wire.PageSum(pfn, im.mem[p*mmu.PageSize:(p+1)*mmu.PageSize])
}

// Snapshot returns a copy of the image as a full-image checkpoint at its
// epoch: every page of the guest-physical layout regions (which must be the
// image's) in ascending order, and the machine state, copied under the read
// lock so that they belong to one epoch. It returns nil while the image
// holds no epoch yet.
func (im *Image) Snapshot(regions []mmu.Region) (*Checkpoint, error) {
	im.mu.RLock()
	defer im.mu.RUnlock()
	if im.epoch == 0 {
		return nil, nil
	}
	cp := &Checkpoint{Epoch: im.epoch, Kind: KindFull, Data: make([]byte, 0, len(im.mem)), State: append([]byte(nil), im.state...)}
	cp.PFNs = make([]uint64, 0, len(im.changed))
	cp.Sums = make([]uint32, 0, len(im.changed))
	for _, r := range regions {
		if r.Offset+r.Size > uint64(len(im.mem)) {
			return nil, fmt.Errorf("snapshot: region %#x+%#x beyond the image's %d bytes", r.GPA, r.Size, len(im.mem))
		}
		for off := uint64(0); off < r.Size; off += mmu.PageSize {
			pfn, p := (r.GPA+off)/mmu.PageSize, (r.Offset+off)/mmu.PageSize
			cp.PFNs = append(cp.PFNs, pfn)
			cp.Sums = append(cp.Sums, im.pageSum(p, pfn))
		}
		cp.Data = append(cp.Data, im.mem[r.Offset:r.Offset+r.Size]...)
	}
	return cp, nil
}
