package ft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// Intermediary receives checkpoints from the primary, verifies each one
// completely, applies it to its image and only then acknowledges it. It
// forwards what it acknowledged to the backup, as its ForwardPolicy decides,
// without ever delaying an acknowledgement; on Failover it fences the primary
// and activates the backup at the last acknowledged epoch.
type Intermediary struct {
	img     *Image
	regions []mmu.Region
	log     *slog.Logger

	// mu orders applying and acknowledging against fencing: a checkpoint is
	// applied and acknowledged under mu, and only while not fenced.
	mu      sync.Mutex
	fenced  bool
	primary MessageConn // the primary link being served, if any

	// bmu guards policy and backup.
	bmu    sync.Mutex
	policy ForwardPolicy
	backup *backupLink
}

// ErrFenced is returned by ServePrimary once Failover has fenced the
// primary: it is never acknowledged again.
var ErrFenced = errors.New("primary fenced")

// ErrPrimaryLost is returned by ServePrimary when the primary's link ends
// without a goodbye or fails: the caller should fail over.
var ErrPrimaryLost = errors.New("primary lost")

// NewIntermediary returns an intermediary for a guest of memSize bytes. It
// forwards with ForwardEvery until SetForwardPolicy says otherwise.
func NewIntermediary(memSize uint64, log *slog.Logger) (*Intermediary, error) {
	if memSize == 0 || memSize%mmu.RegionSize != 0 {
		return nil, fmt.Errorf("intermediary: guest memory of %d bytes: want a non-zero multiple of 2 MiB", memSize)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Intermediary{img: NewImage(memSize), regions: mmu.Layout(memSize), log: log, policy: ForwardEvery{}}, nil
}

// Image returns the intermediary's replica.
func (in *Intermediary) Image() *Image { return in.img }

// PageOffset maps a guest page frame number to its offset in the image.
func (in *Intermediary) PageOffset(pfn uint64) (uint64, error) {
	return mmu.LayoutOffset(in.regions, pfn*mmu.PageSize, mmu.PageSize)
}

// maxPFN is one past the highest guest page frame.
func (in *Intermediary) maxPFN() uint64 { return layoutMaxPFN(in.regions) }

// layoutMaxPFN is one past the highest page frame of a guest-physical layout.
func layoutMaxPFN(regions []mmu.Region) uint64 {
	r := regions[len(regions)-1]
	return (r.GPA + r.Size) / mmu.PageSize
}

// Fenced reports whether Failover has fenced the primary.
func (in *Intermediary) Fenced() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.fenced
}

// ServePrimary handles one primary link until it ends. A checkpoint that
// fails verification or does not apply is refused with an Error, changes
// nothing, and ends the link. Once the intermediary is fenced it neither
// applies nor acknowledges anything from the primary and returns ErrFenced.
func (in *Intermediary) ServePrimary(c MessageConn) error {
	in.mu.Lock()
	if in.fenced {
		in.mu.Unlock()
		_ = c.WriteMessage(&wire.Error{Code: wire.CodeFenced, Reason: "this intermediary has failed over"})
		return ErrFenced
	}
	in.primary = c
	in.mu.Unlock()
	defer func() {
		in.mu.Lock()
		if in.primary == c {
			in.primary = nil
		}
		in.mu.Unlock()
	}()
	for {
		m, err := c.ReadMessage()
		if in.Fenced() {
			return ErrFenced
		}
		if errors.Is(err, io.EOF) {
			// A primary that finishes says Bye; a link that just ends
			// means the primary (or its host) is gone.
			return fmt.Errorf("%w: link closed without a goodbye", ErrPrimaryLost)
		}
		if err != nil {
			return fmt.Errorf("%w: %w", ErrPrimaryLost, err)
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			cp, base, err := ReceiveCheckpoint(c, m, in.maxPFN())
			if err == nil {
				err = in.commit(c, cp, base)
			}
			if errors.Is(err, ErrFenced) {
				return err
			}
			if err != nil {
				in.log.Warn("refused a checkpoint", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
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

// commit applies a verified checkpoint and acknowledges it, unless the
// primary has been fenced. An apply error changes nothing.
func (in *Intermediary) commit(c MessageConn, cp *Checkpoint, base uint64) error {
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.fenced {
		return ErrFenced
	}
	if err := in.img.Apply(cp, base, in.PageOffset); err != nil {
		return err
	}
	if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
		return fmt.Errorf("acknowledge epoch %d: %w", cp.Epoch, err)
	}
	// Queued under mu, so that Failover finds every applied epoch queued.
	in.forward(cp)
	return nil
}

// Failover fences the primary (it is not read or acknowledged again and its
// link is closed), brings the backup to the last epoch the intermediary
// acknowledged, waits for the backup to acknowledge that epoch, and tells it
// to activate. It returns the epoch the backup activated at. Every output the
// primary released is covered by that epoch: the intermediary applied every
// checkpoint before acknowledging it, and the backup holds what it applied.
// Fencing cannot be undone; if no backup is attached or the backup link
// fails, Failover returns an error and may be called again once a backup is
// attached (it is re-seeded from the image).
func (in *Intermediary) Failover(ctx context.Context) (uint64, error) {
	in.mu.Lock()
	in.fenced = true
	pc := in.primary
	epoch := in.img.Epoch() // everything applied was acknowledged (or its ack failed)
	in.mu.Unlock()
	switch c := pc.(type) {
	case interface {
		CloseWithError(wire.Code, string) error
	}:
		_ = c.CloseWithError(wire.CodeFenced, "fenced: the backup takes over")
	case io.Closer:
		_ = c.Close()
	}
	if epoch == 0 {
		return 0, errors.New("failover: the intermediary holds no epoch to activate")
	}
	in.bmu.Lock()
	b := in.backup
	in.bmu.Unlock()
	if b == nil {
		return 0, fmt.Errorf("failover to epoch %d: no backup attached", epoch)
	}
	in.log.Info("failover: primary fenced", "epoch", epoch)
	if err := b.sync(ctx, epoch); err != nil {
		return 0, fmt.Errorf("failover to epoch %d: %w", epoch, err)
	}
	if err := b.activate(ctx, epoch); err != nil {
		return 0, fmt.Errorf("failover to epoch %d: %w", epoch, err)
	}
	in.log.Info("failover: backup activated", "epoch", epoch)
	return epoch, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}
