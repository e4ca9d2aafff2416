package ft

import (
	"errors"
	"fmt"

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

// ErrBadCheckpoint wraps every way a received checkpoint stream can be
// wrong; the receiver refuses it and changes nothing.
var ErrBadCheckpoint = errors.New("bad checkpoint")

func badf(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadCheckpoint, fmt.Sprintf(format, a...))
}

// SendCheckpoint writes cp to c: CheckpointBegin, PageBatches, StateBlobs
// and a CheckpointEnd whose digest covers all of them. base is the epoch the
// delta applies on (0 for a full image).
func SendCheckpoint(c MessageConn, cp *Checkpoint, base uint64) error {
	if err := cp.validate(); err != nil {
		return fmt.Errorf("send checkpoint: %w", err)
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
	end := wire.CheckpointEnd{Epoch: cp.Epoch, Pages: begin.Pages, StateLen: begin.StateLen, Digest: d.Sum()}
	if err := c.WriteMessage(&end); err != nil {
		return fmt.Errorf("send checkpoint %d: %w", cp.Epoch, err)
	}
	return nil
}

// ReceiveCheckpoint reads the rest of the checkpoint that begin opened and
// verifies it: every frame belongs to the epoch, pages ascend and stay below
// maxPFN, the counts and state length match the Begin, and the digest
// matches. Only a verified checkpoint is returned; its data is its own.
func ReceiveCheckpoint(c MessageConn, begin *wire.CheckpointBegin, maxPFN uint64) (*Checkpoint, uint64, error) {
	if begin.StateLen == 0 || begin.StateLen > wire.MaxStateLen {
		return nil, 0, badf("checkpoint %d: state length %d", begin.Epoch, begin.StateLen)
	}
	if begin.Pages > maxPFN {
		return nil, 0, badf("checkpoint %d: %d pages, guest has %d", begin.Epoch, begin.Pages, maxPFN)
	}
	cp := &Checkpoint{Epoch: begin.Epoch, Kind: kindOf(begin.Flags), State: make([]byte, 0, begin.StateLen)}
	if cp.Kind == KindSync {
		cp.Base = begin.Base
	}
	cp.PFNs = make([]uint64, 0, begin.Pages)
	cp.Data = make([]byte, 0, begin.Pages*mmu.PageSize)
	d := wire.NewDigester(*begin)
	for {
		m, err := c.ReadMessage()
		if err != nil {
			return nil, 0, fmt.Errorf("checkpoint %d: %w", begin.Epoch, err)
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
				cp.PFNs = append(cp.PFNs, p.PFN)
				cp.Data = append(cp.Data, p.Data...)
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
			return cp, begin.Base, nil
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
// wire.MaxBatchPages each, in order. The batch is reused between calls.
func eachBatch(cp *Checkpoint, fn func(*wire.PageBatch) error) error {
	batch := wire.PageBatch{Epoch: cp.Epoch}
	for i := 0; i < len(cp.PFNs); i += wire.MaxBatchPages {
		n := min(wire.MaxBatchPages, len(cp.PFNs)-i)
		batch.Pages = batch.Pages[:0]
		for j := i; j < i+n; j++ {
			batch.Pages = append(batch.Pages, wire.Page{PFN: cp.PFNs[j], Data: cp.Page(j)})
		}
		if err := fn(&batch); err != nil {
			return err
		}
	}
	return nil
}
