package ft

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// Intermediary receives checkpoints from the primary, verifies each one
// completely, applies it to its image and only then acknowledges it.
// Forwarding to the backup builds on the same image.
type Intermediary struct {
	img     *Image
	regions []mmu.Region
	log     *slog.Logger
}

// NewIntermediary returns an intermediary for a guest of memSize bytes.
func NewIntermediary(memSize uint64, log *slog.Logger) (*Intermediary, error) {
	if memSize == 0 || memSize%mmu.RegionSize != 0 {
		return nil, fmt.Errorf("intermediary: guest memory of %d bytes: want a non-zero multiple of 2 MiB", memSize)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Intermediary{img: NewImage(memSize), regions: mmu.Layout(memSize), log: log}, nil
}

// Image returns the intermediary's replica.
func (in *Intermediary) Image() *Image { return in.img }

// PageOffset maps a guest page frame number to its offset in the image.
func (in *Intermediary) PageOffset(pfn uint64) (uint64, error) {
	return mmu.LayoutOffset(in.regions, pfn*mmu.PageSize, mmu.PageSize)
}

// maxPFN is one past the highest guest page frame.
func (in *Intermediary) maxPFN() uint64 {
	r := in.regions[len(in.regions)-1]
	return (r.GPA + r.Size) / mmu.PageSize
}

// ServePrimary handles one primary link until it ends. A checkpoint that
// fails verification or does not apply is refused with an Error, changes
// nothing, and ends the link.
func (in *Intermediary) ServePrimary(c MessageConn) error {
	for {
		m, err := c.ReadMessage()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			cp, base, err := ReceiveCheckpoint(c, m, in.maxPFN())
			if err == nil {
				err = in.img.Apply(cp, base, in.PageOffset)
			}
			if err != nil {
				in.log.Warn("refused a checkpoint", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return err
			}
			if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
				return err
			}
		case *wire.Heartbeat:
		case *wire.Bye:
			return nil
		default:
			err := fmt.Errorf("unexpected %v from the primary", m.Type())
			_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: err.Error()})
			return err
		}
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
