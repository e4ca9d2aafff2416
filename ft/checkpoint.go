package ft

import (
	"fmt"
	"math/bits"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// Checkpoint is one epoch's worth of guest changes: the pages written since
// the previous checkpoint (or all of memory for a full image), copied while
// the vCPUs were paused, and the machine state at that moment.
type Checkpoint struct {
	Epoch uint64
	Kind  CheckpointKind // what it carries (validate checks the fields against it)
	Base  uint64         // a KindSync's base epoch (0 for the other kinds)
	PFNs  []uint64       // guest-physical page frame numbers, ascending
	Data  []byte         // len(PFNs) pages of 4 KiB, in PFN order
	// Sums are the pages' end-to-end sums (wire.PageSum), in PFN order,
	// as the primary computed them from the pages it captured; nil in the
	// primary's own checkpoints (summed as they are sent). Every checkpoint
	// the intermediary builds (forwarded, staged, served, a sync or a
	// re-seed) carries the primary's sums, from the received checkpoint or
	// its image, so that the backup checks each page end to end.
	Sums  []uint32
	State []byte // the encoded vmm.MachineState

	// Disk replication (disk.go). Disk is the epoch's writes to the
	// guest's disks (nil: a guest without disks, or a checkpoint built
	// at the intermediary, whose disk writes travel on their own). Seed,
	// on a full image, is every disk as of the image's epoch.
	Disk *DiskEpoch
	Seed *DiskSeed
	// diskErr is why the primary could not take the disk writes or seed
	// at the pause: the checkpoint is not sent.
	diskErr error

	// Timings of the stun (vCPUs paused): the whole stun and its parts.
	Stun, Pause, Harvest, Copy, Capture, Resume time.Duration
}

// Page returns the data of the i-th page.
func (c *Checkpoint) Page(i int) []byte { return c.Data[i*mmu.PageSize : (i+1)*mmu.PageSize] }

// pauseWait is how long a checkpoint waits for another controller's pause
// (large-page sampling reads the vCPUs' CR3 while paused) to end.
const pauseWait = time.Second

// Checkpointer takes epoch checkpoints of a running machine. It turns on the
// machine's dirty log when created.
//
// The pages of a checkpoint from Take or TakePaused live in one of two
// staging buffers that the checkpointer reuses, so that the stun does not pay
// for fresh memory: a checkpoint's PFNs and Data stay valid until the
// second-next Take (the previous epoch can be streamed while the next is
// taken). TakeFull's image is the caller's to keep.
type Checkpointer struct {
	m       *vmm.Machine
	mem     *mmu.Memory
	dl      *mmu.DirtyLog
	bitmap  []uint64
	epoch   uint64
	staging [2]struct {
		pfns []uint64
		data []byte
	}
}

// NewCheckpointer enables dirty logging on m and returns a checkpointer
// whose first Take or TakeFull is epoch 1.
func NewCheckpointer(m *vmm.Machine) (*Checkpointer, error) {
	mem := m.Memory()
	dl, err := mem.EnableDirtyLog(m.VM())
	if err != nil {
		return nil, err
	}
	m.CaptureOnPause(true) // vCPUs read their state as they park: a shorter stun
	return &Checkpointer{m: m, mem: mem, dl: dl, bitmap: make([]uint64, mem.BitmapWords())}, nil
}

// Close turns dirty logging off.
func (c *Checkpointer) Close() error { return c.dl.Disable() }

// Epoch returns the last epoch taken (0: none).
func (c *Checkpointer) Epoch() uint64 { return c.epoch }

// Take pauses the machine, harvests the pages written since the last
// checkpoint, copies them and the machine state, and resumes the machine.
func (c *Checkpointer) Take() (*Checkpoint, error) { return c.TakeWith(nil, nil) }

// TakeWith is Take with two hooks, either may be nil: atPause runs once the
// vCPUs are paused, with the epoch about to be taken; whilePaused runs with
// the checkpoint before the vCPUs resume. The checkpoint's Stun is the whole
// time from the pause request to the end of the resume. If only the resume
// fails (the machine was stopped meanwhile), the checkpoint is returned with
// the error: its pages are no longer in the dirty log, so it must be used.
func (c *Checkpointer) TakeWith(atPause func(epoch uint64), whilePaused func(*Checkpoint)) (*Checkpoint, error) {
	cp := &Checkpoint{Epoch: c.epoch + 1}
	start := time.Now()
	d, err := c.m.PauseWait(pauseWait)
	if err != nil {
		return nil, err
	}
	cp.Pause = d
	if atPause != nil {
		atPause(cp.Epoch)
	}
	err = c.stunned(cp)
	if err == nil {
		c.epoch = cp.Epoch
		if whilePaused != nil {
			whilePaused(cp)
		}
	}
	r, rerr := c.m.Resume()
	cp.Resume = r
	cp.Stun = time.Since(start)
	if err != nil {
		return nil, err
	}
	return cp, rerr
}

// DirtyPages returns how many pages the guest (or the VMM) has written since
// the last checkpoint, without taking them: what the next checkpoint would
// copy, as of now. Call it from the goroutine that takes the checkpoints.
func (c *Checkpointer) DirtyPages() (int, error) { return c.dl.Count() }

// TakePaused takes a checkpoint of a machine the caller has paused, or of
// one whose Run is over, and leaves it so.
func (c *Checkpointer) TakePaused() (*Checkpoint, error) {
	cp := &Checkpoint{Epoch: c.epoch + 1}
	start := time.Now()
	if err := c.stunned(cp); err != nil {
		return nil, err
	}
	cp.Stun = time.Since(start)
	c.epoch = cp.Epoch
	return cp, nil
}

// stunned does the work of a checkpoint while the vCPUs are paused.
func (c *Checkpointer) stunned(cp *Checkpoint) error {
	t := time.Now()
	clear(c.bitmap)
	if _, err := c.dl.Harvest(c.bitmap); err != nil {
		return err
	}
	cp.Harvest = time.Since(t)
	t = time.Now()
	if err := c.copyPages(cp, c.bitmap); err != nil {
		return err
	}
	cp.Copy = time.Since(t)
	t = time.Now()
	st, err := c.m.CaptureState()
	if err != nil {
		return fmt.Errorf("checkpoint %d: %w", cp.Epoch, err)
	}
	if cp.State, err = st.MarshalBinary(); err != nil {
		return fmt.Errorf("checkpoint %d: %w", cp.Epoch, err)
	}
	cp.Capture = time.Since(t)
	return nil
}

// copyPages appends every page set in bm to cp, in guest-physical order.
func (c *Checkpointer) copyPages(cp *Checkpoint, bm []uint64) error {
	n := 0
	for _, w := range bm {
		n += bits.OnesCount64(w)
	}
	st := &c.staging[cp.Epoch%2]
	if want := n + n/4; cap(st.pfns) < n || shrink(cap(st.pfns), want) {
		st.pfns = make([]uint64, 0, want)
		st.data = make([]byte, 0, want*mmu.PageSize)
	}
	cp.PFNs, cp.Data = st.pfns[:0], st.data[:0]
	backing := c.mem.Backing()
	for _, r := range c.mem.Regions() {
		first, last := r.Offset/mmu.PageSize, (r.Offset+r.Size)/mmu.PageSize
		for p := first; p < last; {
			w := bm[p/64] >> (p % 64)
			if w == 0 {
				p += 64 - p%64
				continue
			}
			p += uint64(bits.TrailingZeros64(w))
			if p >= last {
				break
			}
			off := p * mmu.PageSize
			cp.PFNs = append(cp.PFNs, (r.GPA+off-r.Offset)/mmu.PageSize)
			cp.Data = append(cp.Data, backing[off:off+mmu.PageSize]...)
			p++
		}
	}
	st.pfns, st.data = cp.PFNs, cp.Data
	return nil
}

// shrink reports whether a staging buffer of have pages is worth giving
// back for one of want: when it is over shrinkPages and four times what the
// epoch needs. A guest's boot dirties far more per epoch than its steady
// state; without this both buffers kept the boot's size for good, next to
// guest memory and a full image (and got a 256 MiB guest's primary killed
// by the OOM killer in a 1 GiB appliance node on its second full image).
func shrink(have, want int) bool { return have > shrinkPages && have > 4*want }

// shrinkPages is the staging size (in pages, 16 MiB) below which a buffer is
// always kept.
const shrinkPages = 4096

// TakeFull takes a full image: rounds of live pre-copy (the guest keeps
// running while memory is copied, then what it dirtied meanwhile), and a
// final stun that copies what is still dirty together with the machine
// state. The result holds every page of guest memory as of the stun.
func (c *Checkpointer) TakeFull(rounds int) (*Checkpoint, error) {
	return c.TakeFullWith(rounds, nil)
}

// TakeFullWith is TakeFull calling whilePaused (if not nil) with the
// checkpoint during the final stun, after it was taken and before the vCPUs
// resume.
func (c *Checkpointer) TakeFullWith(rounds int, whilePaused func(*Checkpoint)) (*Checkpoint, error) {
	// Start the dirty log afresh: pages dirtied from here on are re-copied.
	clear(c.bitmap)
	if _, err := c.dl.Harvest(c.bitmap); err != nil {
		return nil, err
	}
	image := make([]byte, c.mem.Size())
	copy(image, c.mem.Backing())
	for i := 0; i < rounds; i++ {
		clear(c.bitmap)
		if _, err := c.dl.Harvest(c.bitmap); err != nil {
			return nil, err
		}
		copyMarked(image, c.mem.Backing(), c.bitmap)
	}
	cp, err := c.TakeWith(nil, whilePaused)
	if cp == nil {
		return nil, err
	}
	// A failed resume (err) still leaves a good image: it is returned with
	// the error, like TakeWith's checkpoint.
	for i, pfn := range cp.PFNs {
		off, err := c.mem.Offset(pfn*mmu.PageSize, mmu.PageSize)
		if err != nil {
			return nil, err
		}
		copy(image[off:], cp.Page(i))
	}
	cp.Kind, cp.Data, cp.PFNs = KindFull, image, c.allPFNs()
	return cp, err
}

// TakeFullPaused takes a full image of a machine the caller has paused, or
// of one whose Run is over.
func (c *Checkpointer) TakeFullPaused() (*Checkpoint, error) {
	cp, err := c.TakePaused()
	if err != nil {
		return nil, err
	}
	cp.Kind, cp.Data, cp.PFNs = KindFull, append([]byte(nil), c.mem.Backing()...), c.allPFNs()
	return cp, nil
}

// allPFNs lists every guest page frame in backing order, which is ascending
// GPA: the order of a full image's data.
func (c *Checkpointer) allPFNs() []uint64 {
	var pfns []uint64
	for _, r := range c.mem.Regions() {
		for off := uint64(0); off < r.Size; off += mmu.PageSize {
			pfns = append(pfns, (r.GPA+off)/mmu.PageSize)
		}
	}
	return pfns
}

// copyMarked copies the pages marked in bm from src to dst (same layout).
func copyMarked(dst, src []byte, bm []uint64) {
	for i, w := range bm {
		for w != 0 {
			b := bits.TrailingZeros64(w)
			w &^= 1 << b
			off := (uint64(i)*64 + uint64(b)) * mmu.PageSize
			copy(dst[off:off+mmu.PageSize], src[off:off+mmu.PageSize])
		}
	}
}
