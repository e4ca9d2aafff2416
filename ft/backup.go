package ft

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// BackupConfig configures a backup.
type BackupConfig struct {
	// Restore is what the activated machine takes from this host and the
	// caller (console, OnRecord, ...) rather than from the replicated state.
	Restore vmm.RestoreConfig
	// Log receives refusals and activations (nil: discarded).
	Log *slog.Logger
}

// Backup keeps a committed image of the protected guest at a complete epoch
// and activates it on the intermediary's request. A checkpoint stream is
// staged whole and verified (ReceiveCheckpoint) before it is committed, and
// it is committed atomically (Image.Apply): the committed epoch advances only
// by complete verified checkpoints, and anything refused changes nothing.
type Backup struct {
	img     *Image
	regions []mmu.Region
	cfg     BackupConfig
	log     *slog.Logger

	// mu guards active.
	mu     sync.Mutex
	active bool // activated: the guest runs here now
}

// ErrActivated is returned once the backup has activated: it takes no more
// checkpoints and does not activate twice.
var ErrActivated = errors.New("backup already activated")

// NewBackup returns a backup for a guest of memSize bytes, with no epoch yet.
func NewBackup(memSize uint64, cfg BackupConfig) (*Backup, error) {
	if memSize == 0 || memSize%mmu.RegionSize != 0 {
		return nil, fmt.Errorf("backup: guest memory of %d bytes: want a non-zero multiple of 2 MiB", memSize)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Backup{img: NewImage(memSize), regions: mmu.Layout(memSize), cfg: cfg, log: log}, nil
}

// Image returns the committed image.
func (b *Backup) Image() *Image { return b.img }

// Committed returns the committed epoch (0: none).
func (b *Backup) Committed() uint64 { return b.img.Epoch() }

func (b *Backup) pageOffset(pfn uint64) (uint64, error) {
	return mmu.LayoutOffset(b.regions, pfn*mmu.PageSize, mmu.PageSize)
}

// Serve handles one intermediary link. It first reports its committed epoch
// (Status), then commits every verified checkpoint and acknowledges it (Ack).
// A checkpoint that fails verification or does not apply is refused with an
// Error, changes nothing, and ends the link. Activate{e} for the committed
// epoch e restores the guest, confirms with Ready and returns the machine,
// ready to Run (the caller runs and closes it); Activate for any other epoch
// is refused with an Error and changes nothing. Serve returns a nil machine
// when the link ends without activation.
func (b *Backup) Serve(c MessageConn) (*vmm.Machine, error) {
	if b.activated() {
		_ = c.WriteMessage(&wire.Error{Code: wire.CodeRefused, Reason: ErrActivated.Error()})
		return nil, ErrActivated
	}
	if err := c.WriteMessage(&wire.Status{Role: wire.RoleBackup, Committed: b.Committed()}); err != nil {
		return nil, fmt.Errorf("backup: report status: %w", err)
	}
	maxPFN := layoutMaxPFN(b.regions)
	for {
		m, err := c.ReadMessage()
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("backup: %w", err)
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			if b.activated() {
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeRefused, Reason: ErrActivated.Error()})
				return nil, ErrActivated
			}
			cp, base, err := ReceiveCheckpoint(c, m, maxPFN)
			if err == nil {
				err = b.img.Apply(cp, base, b.pageOffset)
			}
			if err != nil {
				b.log.Warn("refused a checkpoint", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return nil, fmt.Errorf("backup: %w", err)
			}
			b.log.Debug("committed", "epoch", cp.Epoch, "pages", len(cp.PFNs))
			if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
				return nil, fmt.Errorf("backup: acknowledge epoch %d: %w", cp.Epoch, err)
			}
		case *wire.Activate:
			mach, err := b.Activate(m.Epoch)
			if err != nil {
				b.log.Warn("refused to activate", "epoch", m.Epoch, "err", err)
				code := wire.CodeRefused
				if !errors.Is(err, ErrWrongEpoch) && !errors.Is(err, ErrActivated) {
					code = wire.CodeInternal
				}
				if werr := c.WriteMessage(&wire.Error{Code: code, Reason: truncate(err.Error(), wire.MaxReasonLen)}); werr != nil {
					return nil, fmt.Errorf("backup: %w", werr)
				}
				continue
			}
			if err := c.WriteMessage(&wire.Ready{}); err != nil {
				// The guest is restored and is the caller's to run: the
				// intermediary fenced the primary before asking.
				b.log.Warn("could not confirm activation", "epoch", m.Epoch, "err", err)
			}
			return mach, nil
		case *wire.Heartbeat:
		case *wire.Bye:
			return nil, nil
		default:
			err := fmt.Errorf("backup: unexpected %v from the intermediary", m.Type())
			_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: err.Error()})
			return nil, err
		}
	}
}

func (b *Backup) activated() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.active
}

// ErrWrongEpoch is returned by Activate for an epoch the backup has not
// committed.
var ErrWrongEpoch = errors.New("epoch not committed here")

// Activate restores the guest of committed epoch epoch into a new machine
// that is ready to Run, with the console and callbacks of the backup's
// configuration. An epoch other than the committed one is refused
// (ErrWrongEpoch) and changes nothing. Before returning it passes the output
// records the primary still held at that epoch (see envelope.go) to the
// configured OnRecord, so clients, which drop records they have already
// seen, continue without a gap. Once a machine has been restored the backup
// takes no more checkpoints and does not activate again.
func (b *Backup) Activate(epoch uint64) (*vmm.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.active {
		return nil, ErrActivated
	}
	var (
		m    *vmm.Machine
		held []vmm.Record
		err  error
	)
	b.img.Read(func(mem, state []byte, committed uint64) {
		if committed == 0 || committed != epoch {
			err = fmt.Errorf("activate epoch %d: %w (committed: %d)", epoch, ErrWrongEpoch, committed)
			return
		}
		var machine []byte
		if machine, held, err = openState(state); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
			return
		}
		st := new(vmm.MachineState)
		if err = st.UnmarshalBinary(machine); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
			return
		}
		if m, err = vmm.Restore(b.cfg.Restore, st, bytes.NewReader(mem)); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
		}
	})
	if err != nil {
		return nil, err
	}
	// Release the output the primary still held at this epoch: it is
	// covered by the committed checkpoint (clients drop what they saw).
	if b.cfg.Restore.OnRecord != nil {
		for _, r := range held {
			b.cfg.Restore.OnRecord(r)
		}
	}
	b.active = true
	b.log.Info("activated", "epoch", epoch)
	return m, nil
}
