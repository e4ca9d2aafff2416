package ft

import (
	"errors"
	"fmt"
	"sync"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// MessageConn is what the checkpoint stream needs of a link
// (transport.Conn has it).
//
// ReadMessage never returns a wire.Heartbeat: liveness is the transport's
// (transport.Conn answers for it and drops heartbeats), so the roles treat
// one as any message out of protocol.
type MessageConn interface {
	WriteMessage(wire.Message) error
	ReadMessage() (wire.Message, error)
}

// stateChunk is the most state bytes sent in one StateBlob.
const stateChunk = 1 << 20

// batchPages is the most pages sent in one PageBatch: 1 MiB, small enough
// that a batch's pages are still in the CPU's cache when the sender, having
// summed them, seals them into TLS records, and when the receiver, having
// read them from TLS, verifies their sums.
const batchPages = 256

// ErrBadCheckpoint wraps every way a received checkpoint stream can be
// wrong; the receiver refuses it and changes nothing.
var ErrBadCheckpoint = errors.New("bad checkpoint")

func badf(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadCheckpoint, fmt.Sprintf(format, a...))
}

// ErrLinkBroken wraps a checkpoint stream that ended before the checkpoint
// did: the link failed (end of stream, reset, a truncated frame, a silent
// peer), so the checkpoint never arrived whole. It is not a refusal: the
// sender is lost, not wrong.
var ErrLinkBroken = errors.New("link broken mid-checkpoint")

// readFailed classifies an error reading a checkpoint's stream: bytes that
// arrived and break the wire format (a bad checksum, a malformed frame)
// refuse the checkpoint (ErrBadCheckpoint); anything else is a link that
// broke (ErrLinkBroken).
func readFailed(epoch uint64, err error) error {
	if errors.Is(err, ErrBadCheckpoint) { // a compressed batch that does not decode
		return fmt.Errorf("checkpoint %d: %w", epoch, err)
	}
	for _, bad := range []error{wire.ErrBadMagic, wire.ErrChecksum, wire.ErrMalformed, wire.ErrTooLarge,
		wire.ErrUnknownType, wire.ErrVersion} {
		if errors.Is(err, bad) {
			return fmt.Errorf("%w: checkpoint %d: %w", ErrBadCheckpoint, epoch, err)
		}
	}
	return fmt.Errorf("checkpoint %d: %w: %w", epoch, ErrLinkBroken, err)
}

// SendCheckpoint writes cp to c: CheckpointBegin, PageBatches, StateBlobs
// and a CheckpointEnd whose digest covers all of them. base is the epoch the
// delta applies on (0 for a full image). Each page goes with its end-to-end
// sum: cp.Sums if the checkpoint carries them (it was received, or taken
// from an image that keeps them), else computed here from the page (the
// primary, where the pages were captured). The pages are written from
// where they lie in cp.Data (see wire.Writer).
func SendCheckpoint(c MessageConn, cp *Checkpoint, base uint64) error {
	if err := cp.validate(); err != nil {
		return fmt.Errorf("send checkpoint: %w", err)
	}
	if cp.Sums != nil && len(cp.Sums) != len(cp.PFNs) {
		return fmt.Errorf("send checkpoint %d: %d page sums for %d pages", cp.Epoch, len(cp.Sums), len(cp.PFNs))
	}
	if !cp.Kind.Commits() {
		return sendStaged(c, cp)
	}
	begin := wire.CheckpointBegin{Epoch: cp.Epoch, Base: base, Pages: uint64(len(cp.PFNs)), StateLen: uint64(len(cp.State)), Flags: cp.Kind.wireFlags()}
	if cp.Kind == KindFull {
		begin.Base = 0
	}
	if err := c.WriteMessage(&begin); err != nil {
		return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
	}
	d := wire.NewDigester(begin)
	if err := eachBatch(cp, func(batch *wire.PageBatch) error {
		d.AddBatch(batch)
		return c.WriteMessage(batch)
	}); err != nil {
		return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
	}
	for off := 0; off < len(cp.State); off += stateChunk {
		chunk := cp.State[off:min(off+stateChunk, len(cp.State))]
		d.AddState(chunk)
		if err := c.WriteMessage(&wire.StateBlob{Epoch: cp.Epoch, Offset: uint64(off), Data: chunk}); err != nil {
			return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
		}
	}
	// Disk replication (disk.go): the epoch's disk writes, and a full
	// image's disk seed, before the End.
	if err := sendCheckpointDisks(c, cp); err != nil {
		return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
	}
	end := wire.CheckpointEnd{Epoch: cp.Epoch, Pages: begin.Pages, StateLen: begin.StateLen, Digest: d.Sum()}
	if err := c.WriteMessage(&end); err != nil {
		return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
	}
	return nil
}

// pagePlacer is a link that can read page batches straight into memory
// the caller places (transport.Conn can; see wire.Reader.SetPagePlace).
type pagePlacer interface {
	SetPagePlace(func(pages int) []byte)
}

// ReceiveCheckpoint reads the rest of the checkpoint that begin opened and
// verifies it: every frame belongs to the epoch, pages ascend and stay below
// maxPFN, the counts and state length match the Begin, and the digest
// matches. Only a verified checkpoint is returned; its data is its own.
// A checkpoint that arrived and fails verification is an ErrBadCheckpoint;
// a link that broke before the checkpoint ended is an ErrLinkBroken.
//
// The checkpoint's disk writes come in cp.Disk; a disk seed is refused
// (the caller keeps no disks).
func ReceiveCheckpoint(c MessageConn, begin *wire.CheckpointBegin, maxPFN uint64) (*Checkpoint, uint64, error) {
	return receiveCheckpoint(c, begin, maxPFN, nil, nil)
}

// receiveCheckpoint is ReceiveCheckpoint receiving the pages into spare if
// it is large enough (the caller no longer uses it), else into new memory,
// and a disk seed into files in the directory seedDir returns, asked when
// a seed arrives (cp.Seed, the caller's to remove; nil or "": refused).
func receiveCheckpoint(c MessageConn, begin *wire.CheckpointBegin, maxPFN uint64, spare []byte, seedDir func() string) (cp *Checkpoint, base uint64, err error) {
	if begin.StateLen == 0 || begin.StateLen > wire.MaxStateLen {
		return nil, 0, badf("checkpoint %d: state length %d", begin.Epoch, begin.StateLen)
	}
	if begin.Pages > maxPFN {
		return nil, 0, badf("checkpoint %d: %d pages, guest has %d", begin.Epoch, begin.Pages, maxPFN)
	}
	cp = &Checkpoint{Epoch: begin.Epoch, Kind: kindOf(begin.Flags), State: make([]byte, 0, begin.StateLen)}
	// Disk replication (disk.go): the epoch's disk writes and a seed.
	var disk diskAssembly
	seed := seedReceiver{dirOf: seedDir}
	defer func() {
		if err != nil {
			seed.abort()
		}
	}()
	if cp.Kind == KindSync {
		cp.Base = begin.Base
	}
	cp.PFNs = make([]uint64, 0, begin.Pages)
	cp.Sums = make([]uint32, 0, begin.Pages)
	// The pages are read straight into cp.Data, batch after batch, where
	// the link can place them; else copied there.
	if n := int(begin.Pages) * mmu.PageSize; cap(spare) >= n {
		cp.Data = spare[:n]
	} else {
		cp.Data = make([]byte, n)
	}
	if pp, ok := c.(pagePlacer); ok {
		pp.SetPagePlace(func(n int) []byte {
			got := len(cp.PFNs)
			if uint64(got+n) > begin.Pages {
				return nil // more than announced: refused below
			}
			return cp.Data[got*mmu.PageSize : (got+n)*mmu.PageSize]
		})
		defer pp.SetPagePlace(nil)
	}
	d := wire.NewDigester(*begin)
	for {
		m, err := c.ReadMessage()
		if err != nil {
			return nil, 0, readFailed(begin.Epoch, err)
		}
		switch m := m.(type) {
		case *wire.PageBatch:
			if m.Epoch != begin.Epoch {
				return nil, 0, badf("page batch of epoch %d inside checkpoint %d", m.Epoch, begin.Epoch)
			}
			for _, p := range m.Pages {
				if p.PFN >= maxPFN {
					return nil, 0, badf("checkpoint %d: page %#x beyond guest memory", begin.Epoch, p.PFN)
				}
				if n := len(cp.PFNs); n > 0 && p.PFN <= cp.PFNs[n-1] {
					return nil, 0, badf("checkpoint %d: page %#x out of order", begin.Epoch, p.PFN)
				}
				if uint64(len(cp.PFNs)) == begin.Pages {
					return nil, 0, badf("checkpoint %d: more than %d pages", begin.Epoch, begin.Pages)
				}
				// The end-to-end check: the page is what the primary
				// captured at that PFN.
				if sum := wire.PageSum(p.PFN, p.Data); sum != p.Sum {
					return nil, 0, badf("checkpoint %d: digest mismatch: page %#x sums to %#08x, sent with %#08x", begin.Epoch, p.PFN, sum, p.Sum)
				}
				i := len(cp.PFNs)
				if dst := cp.Page(i); &dst[0] != &p.Data[0] {
					copy(dst, p.Data) // not placed: copied
				}
				cp.PFNs = append(cp.PFNs, p.PFN)
				cp.Sums = append(cp.Sums, p.Sum)
			}
			d.AddBatch(m)
		case *wire.StateBlob:
			if m.Epoch != begin.Epoch || m.Offset != uint64(len(cp.State)) || uint64(len(cp.State)+len(m.Data)) > begin.StateLen {
				return nil, 0, badf("checkpoint %d: state chunk of epoch %d at %d (+%d)", begin.Epoch, m.Epoch, m.Offset, len(m.Data))
			}
			cp.State = append(cp.State, m.Data...)
			d.AddState(m.Data)
		case *wire.CheckpointEnd:
			switch {
			case m.Epoch != begin.Epoch:
				return nil, 0, badf("end of epoch %d closes checkpoint %d", m.Epoch, begin.Epoch)
			case m.Pages != begin.Pages || uint64(len(cp.PFNs)) != begin.Pages:
				return nil, 0, badf("checkpoint %d: %d pages received, %d announced, %d at the end", begin.Epoch, len(cp.PFNs), begin.Pages, m.Pages)
			case m.StateLen != begin.StateLen || uint64(len(cp.State)) != begin.StateLen:
				return nil, 0, badf("checkpoint %d: %d state bytes received, %d announced", begin.Epoch, len(cp.State), begin.StateLen)
			case m.Digest != d.Sum():
				return nil, 0, badf("checkpoint %d: digest mismatch", begin.Epoch)
			}
			if err := checkEnvelope(cp.State); err != nil { // envelope.go
				return nil, 0, fmt.Errorf("checkpoint %d: %w", begin.Epoch, err)
			}
			if err := finishCheckpointDisks(cp, &disk, &seed); err != nil {
				return nil, 0, err
			}
			return cp, begin.Base, nil
		case *wire.DiskWrites:
			if m.Epoch != begin.Epoch {
				return nil, 0, badf("disk writes of epoch %d inside checkpoint %d", m.Epoch, begin.Epoch)
			}
			if err := disk.add(m); err != nil {
				return nil, 0, err
			}
		case *wire.DiskSeed:
			if cp.Kind != KindFull {
				return nil, 0, badf("checkpoint %d (%v): a disk seed outside a full image", begin.Epoch, cp.Kind)
			}
			if err := seed.add(begin.Epoch, m); err != nil {
				if errors.Is(err, ErrBadCheckpoint) {
					return nil, 0, err
				}
				return nil, 0, fmt.Errorf("checkpoint %d: receive the disk seed: %w", begin.Epoch, err)
			}
		default:
			return nil, 0, badf("checkpoint %d: unexpected %v", begin.Epoch, m.Type())
		}
	}
}

// sendStaged sends the pages of a KindStagePages checkpoint as bare page batches of
// its epoch.
func sendStaged(c MessageConn, cp *Checkpoint) error {
	if err := eachBatch(cp, func(batch *wire.PageBatch) error { return c.WriteMessage(batch) }); err != nil {
		return fmt.Errorf("stage pages of epoch %d: %w", cp.Epoch, err)
	}
	return nil
}

// eachBatch passes cp's pages to fn as page batches of its epoch, at most
// wire.MaxBatchPages each, in order, with their sums (cp.Sums, or computed
// from the pages). The batch is reused between calls.
//
// Sums computed here (the primary's own checkpoints) are computed by a
// helper goroutine for a checkpoint of several batches, at most
// sumAhead batches ahead of fn: the next batches are summed on another
// core while fn seals and writes this one, and their pages are still in
// the shared cache when fn reads them.
func eachBatch(cp *Checkpoint, fn func(*wire.PageBatch) error) error {
	sums := cp.Sums
	var summed chan struct{} // one value per batch summed
	if sums == nil && len(cp.PFNs) > sumAhead*batchPages {
		sums = make([]uint32, len(cp.PFNs))
		summed = make(chan struct{}, sumAhead)
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < len(cp.PFNs); i += batchPages {
				for j := i; j < min(i+batchPages, len(cp.PFNs)); j++ {
					sums[j] = wire.PageSum(cp.PFNs[j], cp.Page(j))
				}
				select {
				case summed <- struct{}{}:
				case <-stop:
					return
				}
			}
		}()
		// cp's pages are the caller's again once this returns.
		defer wg.Wait()
		defer close(stop)
	}
	batch := wire.PageBatch{Epoch: cp.Epoch}
	for i := 0; i < len(cp.PFNs); i += batchPages {
		n := min(batchPages, len(cp.PFNs)-i)
		if summed != nil {
			<-summed
		}
		batch.Pages = batch.Pages[:0]
		for j := i; j < i+n; j++ {
			p := wire.Page{PFN: cp.PFNs[j], Data: cp.Page(j)}
			if sums != nil {
				p.Sum = sums[j]
			} else {
				p.Sum = wire.PageSum(p.PFN, p.Data)
			}
			batch.Pages = append(batch.Pages, p)
		}
		if err := fn(&batch); err != nil {
			return err
		}
	}
	return nil
}

// sumAhead is how many batches eachBatch's helper sums ahead of the
// sender at most.
const sumAhead = 2

// pageBuffer keeps the page memory of received checkpoints that nothing
// uses any more (at most keepBuffers of them), for the next ones: a new
// buffer of a large checkpoint costs a page fault and the kernel's zeroing
// for each of its pages before the first byte lands, about as much as
// receiving it. Two circulate at the intermediary while it forwards: one
// being sent to the backup, one being received.
type pageBuffer struct {
	mu   sync.Mutex
	bufs [keepBuffers][]byte
	// missed counts takes that found no kept memory large enough (the
	// receiver then allocates).
	missed uint64
}

// keepBuffers is how many page buffers a pageBuffer keeps.
const keepBuffers = 2

// take returns kept memory of at least n bytes (the smallest that fits),
// which is the caller's now, or nil if none fits.
func (p *pageBuffer) take(n int) []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	best := -1
	for i, b := range p.bufs {
		if b != nil && cap(b) >= n && (best < 0 || cap(b) < cap(p.bufs[best])) {
			best = i
		}
	}
	if best < 0 {
		p.missed++
		return nil
	}
	b := p.bufs[best]
	p.bufs[best] = nil
	return b
}

// put keeps b, the page memory of a checkpoint nothing refers to any more,
// in a free place or instead of smaller kept memory.
func (p *pageBuffer) put(b []byte) {
	if cap(b) == 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	small := 0
	for i, k := range p.bufs {
		if k == nil {
			p.bufs[i] = b[:0]
			return
		}
		if cap(k) < cap(p.bufs[small]) {
			small = i
		}
	}
	if cap(b) > cap(p.bufs[small]) {
		p.bufs[small] = b[:0]
	}
}

// misses returns how many takes found no kept memory large enough.
func (p *pageBuffer) misses() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.missed
}
