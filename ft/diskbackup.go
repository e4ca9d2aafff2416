package ft

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/ft/diskrep"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// The backup's side of disk replication (see disk.go): one
// diskrep.Replica per disk of BackupConfig.Disks, seeded with each full
// image (the whole disk, checked against the primary's fingerprint),
// staged with every epoch's writes as they arrive (each checked against
// the fingerprint the disk must have after them), and committed when the
// memory image commits the epoch. The image commits first, then every
// replica; a backup that dies between the two has nothing to activate
// (its image is in memory), and Open recovers each replica at its last
// whole epoch. Activation takes the replicas only at the image's epoch.

// backupDisks is the backup's replicas (only Serve's goroutine and
// Activate, under the backup's mu after Serve, touch them).
type backupDisks struct {
	assembly diskAssembly  // the epoch whose writes are arriving on their own (Serve only)
	bytes    atomic.Uint64 // disk write bytes staged
	// mu guards reps (and the replicas: DiskEpochs reads them).
	mu   sync.Mutex
	reps []*diskrep.Replica // opened at the first seed, in disk order
}

// seedDir is where the backup receives a disk seed: next to its first
// disk ("" if it keeps no disks: seeds are refused).
func (b *Backup) seedDir() string {
	if len(b.cfg.Disks) == 0 {
		return ""
	}
	return seedDirOf(b.cfg.Disks[0])
}

// diskWrites takes a DiskWrites frame the intermediary sent on its own;
// once the epoch's writes of every disk arrived, they are staged.
func (b *Backup) diskWrites(m *wire.DiskWrites) error {
	a := &b.disks.assembly
	if err := a.add(m); err != nil {
		*a = diskAssembly{}
		return err
	}
	if !a.complete() {
		return nil
	}
	d := a.result()
	*a = diskAssembly{}
	return b.stageDisks(d)
}

// stageDisks stages an epoch's writes on every replica.
func (b *Backup) stageDisks(d *DiskEpoch) error {
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	if len(b.disks.reps) == 0 {
		return badf("disk writes of epoch %d, and no disk is seeded here", d.Epoch)
	}
	if len(d.Writes) != len(b.disks.reps) {
		return badf("disk writes of epoch %d for %d disks, the backup keeps %d", d.Epoch, len(d.Writes), len(b.disks.reps))
	}
	for i, w := range d.Writes {
		if err := b.disks.reps[i].Stage(d.Epoch, w); err != nil {
			return fmt.Errorf("%w: disk %d: %w", ErrBadCheckpoint, i, err)
		}
	}
	b.disks.bytes.Add(d.Bytes())
	return nil
}

// beforeCommit readies the disks for cp, before the image takes it: a
// full image's seed is written to the replicas (refused unless every
// disk has the primary's fingerprint); a checkpoint's own writes (the
// primary's direct link) are staged; and every replica must hold the
// epoch staged.
func (b *Backup) beforeCommit(cp *Checkpoint) error {
	if cp.Kind == KindFull {
		defer cp.Seed.Remove()
		b.disks.assembly = diskAssembly{}
		return b.seedDisks(cp)
	}
	if cp.Disk != nil {
		if err := b.stageDisks(cp.Disk); err != nil {
			return err
		}
	}
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	for i, r := range b.disks.reps {
		if !slices.Contains(r.Staged(), cp.Epoch) {
			return badf("checkpoint %d: disk %d has not received the epoch's writes (staged: %v)", cp.Epoch, i, r.Staged())
		}
	}
	return nil
}

// seedDisks seeds every replica from a full image's disk seed.
func (b *Backup) seedDisks(cp *Checkpoint) error {
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	switch {
	case cp.Seed == nil && len(b.cfg.Disks) == 0:
		return nil
	case cp.Seed == nil:
		return badf("full image %d without the guest's disks; this backup keeps %d", cp.Epoch, len(b.cfg.Disks))
	case len(cp.Seed.Disks) != len(b.cfg.Disks):
		return badf("full image %d with %d disks; this backup keeps %d (understudy backup --disk, once per disk)", cp.Epoch, len(cp.Seed.Disks), len(b.cfg.Disks))
	}
	for i, d := range cp.Seed.Disks {
		if i == len(b.disks.reps) {
			r, err := diskrep.Open(b.cfg.Disks[i], int64(d.Size))
			if errors.Is(err, diskrep.ErrCorrupt) {
				// Whatever the file held is replaced by the seed.
				b.log.Warn("disk replica not usable; seeding it afresh", "disk", i, "err", err)
				if err = diskrep.Remove(b.cfg.Disks[i]); err == nil {
					r, err = diskrep.Open(b.cfg.Disks[i], int64(d.Size))
				}
			}
			if err != nil {
				return fmt.Errorf("disk %d: %w", i, err)
			}
			b.disks.reps = append(b.disks.reps, r)
		}
		f, err := os.Open(d.Path)
		if err != nil {
			return err
		}
		err = b.disks.reps[i].Seed(cp.Epoch, f, int64(d.Size), d.Fingerprint)
		f.Close()
		if errors.Is(err, diskrep.ErrFingerprint) {
			return fmt.Errorf("%w: full image %d: disk %d: %w", ErrBadCheckpoint, cp.Epoch, i, err)
		}
		if err != nil {
			return fmt.Errorf("full image %d: disk %d: %w", cp.Epoch, i, err)
		}
	}
	return nil
}

// afterCommit commits cp's epoch on every replica, once the image has.
func (b *Backup) afterCommit(cp *Checkpoint) error {
	if cp.Kind == KindFull {
		return nil // the seed is committed
	}
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	for i, r := range b.disks.reps {
		if err := r.Commit(cp.Epoch); err != nil {
			return fmt.Errorf("commit epoch %d on disk %d: %w", cp.Epoch, i, err)
		}
	}
	return nil
}

// activateDisks hands the replicas, which must be at the image's epoch,
// to the restore: rc's disks become the replicas' files with their
// fingerprints (the restore then does not read them). Call under b.mu.
func (b *Backup) activateDisks(epoch uint64, rc *vmm.RestoreConfig) error {
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	if len(b.disks.reps) == 0 {
		if len(b.cfg.Disks) > 0 {
			return fmt.Errorf("activate epoch %d: the disks were never seeded", epoch)
		}
		return nil
	}
	for i, r := range b.disks.reps {
		if r.Epoch() != epoch {
			return fmt.Errorf("activate epoch %d: disk %d holds epoch %d", epoch, i, r.Epoch())
		}
	}
	rc.Disks = make([]vmm.DiskConfig, len(b.disks.reps))
	for i, r := range b.disks.reps {
		path, fp, err := r.Activate()
		if err != nil {
			return fmt.Errorf("activate epoch %d: disk %d: %w", epoch, i, err)
		}
		rc.Disks[i] = vmm.DiskConfig{Path: path, Fingerprint: fp}
	}
	b.disks.reps = nil
	return nil
}

// closeDisks closes the replicas (their staged epochs are dropped by the
// next Open).
func (b *Backup) closeDisks() error {
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	var errs []error
	for _, r := range b.disks.reps {
		errs = append(errs, r.Close())
	}
	b.disks.reps = nil
	return errors.Join(errs...)
}

// DiskEpochs returns the committed epoch of every disk replica (nil
// before the first seed).
func (b *Backup) DiskEpochs() []uint64 {
	b.disks.mu.Lock()
	defer b.disks.mu.Unlock()
	var out []uint64
	for _, r := range b.disks.reps {
		out = append(out, r.Epoch())
	}
	return out
}
