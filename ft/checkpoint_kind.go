package ft

import (
	"fmt"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// CheckpointKind says what a Checkpoint carries and how its receiver takes
// it. The zero value is a delta, what a Checkpointer's Take returns.
type CheckpointKind uint8

const (
	// KindDelta: the pages written since a base epoch (given beside the
	// checkpoint: the previous epoch, or what the backup holds), and the
	// state. It applies only on that base.
	KindDelta CheckpointKind = iota
	// KindFull: every page of guest memory and the state. It applies on
	// any image (a seed or a re-seed).
	KindFull
	// KindStagePages: pages sent to a backup ahead of a sync (hold-back,
	// or pages the backup requested): bare page batches of version Epoch,
	// without state. They change nothing until a sync commits them.
	KindStagePages
	// KindSync: a hold-back sync, a delta on Base (the backup's last sync
	// or re-seed) that the backup commits together with the pages staged
	// since Base, its own pages winning.
	KindSync
)

func (k CheckpointKind) String() string {
	switch k {
	case KindDelta:
		return "delta"
	case KindFull:
		return "full"
	case KindStagePages:
		return "stage"
	case KindSync:
		return "sync"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Commits reports whether a checkpoint of kind k moves its receiver's
// committed epoch (every kind but staged pages).
func (k CheckpointKind) Commits() bool { return k != KindStagePages }

// wireFlags are the CheckpointBegin flags of a committing kind.
func (k CheckpointKind) wireFlags() uint32 {
	switch k {
	case KindFull:
		return wire.FlagFullImage
	case KindSync:
		return wire.FlagStaged
	}
	return 0
}

// kindOf is the kind a CheckpointBegin's flags announce (the wire package
// refuses contradictory flags).
func kindOf(flags uint32) CheckpointKind {
	switch {
	case flags&wire.FlagFullImage != 0:
		return KindFull
	case flags&wire.FlagStaged != 0:
		return KindSync
	}
	return KindDelta
}

// validate is the one check of a checkpoint's shape against its kind: a
// known kind, page data for every PFN, a Base only on a sync (and below its
// epoch), and no state on staged pages.
func (cp *Checkpoint) validate() error {
	switch {
	case cp.Kind > KindSync:
		return fmt.Errorf("checkpoint %d: unknown kind %d", cp.Epoch, uint8(cp.Kind))
	case len(cp.Data) != len(cp.PFNs)*mmu.PageSize:
		return fmt.Errorf("checkpoint %d (%v): %d bytes of page data for %d pages", cp.Epoch, cp.Kind, len(cp.Data), len(cp.PFNs))
	case cp.Kind == KindSync && (cp.Base == 0 || cp.Base >= cp.Epoch):
		return fmt.Errorf("checkpoint %d: sync on base epoch %d (want 1 <= base < epoch)", cp.Epoch, cp.Base)
	case cp.Kind != KindSync && cp.Base != 0:
		return fmt.Errorf("checkpoint %d (%v): base epoch %d on a kind that takes none", cp.Epoch, cp.Kind, cp.Base)
	case cp.Kind == KindStagePages && len(cp.State) != 0:
		return fmt.Errorf("checkpoint %d: staged pages carry no state", cp.Epoch)
	}
	return nil
}
