package ft

import (
	"context"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// sync makes sure the backup holds epoch (Failover and the orderly end
// call it): whatever hold-back kept goes in a sync, anything else a policy
// held back is sent as a re-seed from the image, and the backup's
// acknowledgement is awaited.
func (b *backupLink) sync(ctx context.Context, in *Intermediary, epoch uint64) error {
	in.flushHeld(b)
	b.poke()
	idle := func() bool { return !b.busy && !b.reseed && len(b.queue) == 0 }
	if err := b.wait(ctx, func() bool { return b.acked >= epoch || idle() }); err != nil {
		return err
	}
	b.mu.Lock()
	if b.acked < epoch && b.sent < epoch && idle() {
		b.reseed = true // held back: bring the backup up from the image
	}
	b.mu.Unlock()
	b.poke()
	return b.wait(ctx, func() bool { return b.acked >= epoch })
}

// flushHeld queues a sync to the image's epoch if hold-back left the
// backup short of it.
func (in *Intermediary) flushHeld(b *backupLink) {
	// in.mu: no checkpoint is between its Apply and its forward, so the
	// image is at the last epoch the ledger accounted for.
	in.mu.Lock()
	defer in.mu.Unlock()
	h := &b.held
	h.mu.Lock()
	defer h.mu.Unlock()
	// synced == 0: a re-seed is on its way (forward asked for it), and its
	// snapshot, taken after this, covers the image's epoch.
	if !h.holdMode || h.synced == 0 || h.synced >= in.img.Epoch() {
		return
	}
	cp := in.syncCheckpoint(b)
	h.publish()
	if cp != nil {
		b.enqueue(outgoing{cp: cp})
	} else {
		b.poke()
	}
}

// syncIfDue asks the policy, between checkpoints, whether the backup is
// past a bound, and if so queues a sync to the image's epoch. forward asks
// only when a checkpoint arrives, so without this a primary that sends
// none for a while (a long epoch, a stalled host) would stretch the
// backup's lag in time past the bound while the intermediary holds a
// newer epoch. The backup link's writer calls it on its status ticker.
// While a checkpoint is being applied (in.mu held) it does nothing:
// forward asks the policy once that checkpoint is accounted for.
func (in *Intermediary) syncIfDue(b *backupLink) {
	// in.mu: the image is at the last epoch the ledger accounted for.
	if !in.mu.TryLock() {
		return
	}
	defer in.mu.Unlock()
	h := &b.held
	h.mu.Lock()
	defer h.mu.Unlock()
	e := in.img.Epoch()
	// Not in hold mode: everything went whole. synced == 0: a re-seed is
	// on its way.
	if !h.holdMode || h.synced == 0 || h.synced >= e {
		return
	}
	v := BackupView{Epoch: e, Synced: h.synced, HeldBytes: h.lacking * mmu.PageSize,
		LagEpochs: e - h.synced, Lag: time.Since(in.appliedAt(h.synced))}
	if !in.policy.get().SyncNow(v) {
		return
	}
	cp := in.syncCheckpoint(b)
	h.publish()
	if cp != nil {
		b.enqueue(outgoing{cp: cp})
	}
}

// activate tells the backup to activate at epoch and waits for it to
// confirm.
// The Activate goes through the writer, so that it never lands inside a
// checkpoint stream.
func (b *backupLink) activate(ctx context.Context, epoch uint64) error {
	b.reply(&wire.Activate{Epoch: epoch})
	return b.wait(ctx, func() bool { return b.activated })
}
