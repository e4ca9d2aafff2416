package ft

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// diskStore is the intermediary's copy of the guest's disks, at its
// image's epoch: seeded by each full image from the primary (its
// fingerprints checked), advanced by each epoch's writes (whose ranges'
// CRCs were checked on arrival), and copied, at one epoch with the image,
// to seed a new or returning backup. It is a plain file per disk, not
// synced: like the intermediary's memory image it does not outlive the
// intermediary. Fields other than dir are guarded by the intermediary's
// mu (the image's lock order).
type diskStore struct {
	dirOnce sync.Once
	dir     string
	dirErr  error
	set     string // the directory SetDiskDir gave ("": a temporary one)

	epoch uint64
	disks []storedDisk
	// has mirrors len(disks) > 0, for a look without the intermediary's mu.
	has atomic.Bool
	// Figures.
	bytes atomic.Uint64 // disk write bytes received and applied
}

type storedDisk struct {
	f    *os.File
	size uint64
	fp   [32]byte
}

// SetDiskDir sets where the intermediary keeps its copy of the guest's
// disks and receives disk seeds ("", the default: a new directory under
// os.TempDir(), which RemoveDisks removes). Call it before serving the
// primary.
func (in *Intermediary) SetDiskDir(dir string) { in.disks.set = dir }

// diskDir returns the directory of the disk store, made on first use.
func (in *Intermediary) diskDir() string {
	s := &in.disks
	s.dirOnce.Do(func() {
		if s.set != "" {
			s.dir, s.dirErr = s.set, os.MkdirAll(s.set, 0o700)
			return
		}
		s.dir, s.dirErr = os.MkdirTemp("", "understudy-intermediary-disks-")
	})
	if s.dirErr != nil || s.dir == "" {
		in.log.Warn("no directory for the guest's disks: disk seeds are refused", "err", s.dirErr)
		return ""
	}
	return s.dir
}

// checkDisks checks, before anything is applied, that cp's disk writes
// or seed fit the store: a full image's seed must have the fingerprints
// it came with; a delta must carry writes for every stored disk, of its
// size, and none if no disk is stored. Call with in.mu held.
func (in *Intermediary) checkDisks(cp *Checkpoint) error {
	s := &in.disks
	if cp.Kind == KindFull {
		if cp.Seed != nil {
			if err := cp.Seed.Verify(); err != nil {
				return fmt.Errorf("checkpoint %d: %w", cp.Epoch, err)
			}
		}
		return nil
	}
	var ws int
	if cp.Disk != nil {
		ws = len(cp.Disk.Writes)
	}
	if ws != len(s.disks) {
		return badf("checkpoint %d: disk writes for %d disks, the intermediary keeps %d", cp.Epoch, ws, len(s.disks))
	}
	for i := range ws {
		w := cp.Disk.Writes[i]
		if w.Disk != uint32(i) || w.Size != s.disks[i].size {
			return badf("checkpoint %d: disk %d's writes name disk %d of %d bytes; it has %d", cp.Epoch, i, w.Disk, w.Size, s.disks[i].size)
		}
	}
	return nil
}

// applyDisks brings the store to cp's epoch, after the image took cp: a
// full image's seed replaces it (its files move into the store), a
// delta's writes go to the disks. An error leaves the store empty (a
// backup is not seeded from it until the next full image). Call with
// in.mu held.
func (in *Intermediary) applyDisks(cp *Checkpoint) error {
	s := &in.disks
	if cp.Kind == KindFull {
		s.drop()
		if cp.Seed == nil {
			s.epoch = cp.Epoch
			return nil
		}
		for i, d := range cp.Seed.Disks {
			path := filepath.Join(in.diskDir(), fmt.Sprintf("disk%d", i))
			err := os.Rename(d.Path, path)
			var f *os.File
			if err == nil {
				f, err = os.OpenFile(path, os.O_RDWR, 0)
			}
			if err != nil {
				cp.Seed.Remove()
				s.drop()
				return fmt.Errorf("keep disk %d of checkpoint %d: %w", i, cp.Epoch, err)
			}
			s.disks = append(s.disks, storedDisk{f: f, size: d.Size, fp: d.Fingerprint})
		}
		cp.Seed = nil // the store's now
		s.epoch = cp.Epoch
		s.has.Store(true)
		return nil
	}
	if cp.Disk != nil {
		for i, w := range cp.Disk.Writes {
			for _, r := range w.Ranges {
				if _, err := s.disks[i].f.WriteAt(r.Data, int64(r.Off)); err != nil {
					s.drop()
					return fmt.Errorf("apply disk %d writes of checkpoint %d: %w", i, cp.Epoch, err)
				}
			}
			s.disks[i].fp = w.Fingerprint
		}
		s.bytes.Add(cp.Disk.Bytes())
	}
	s.epoch = cp.Epoch
	return nil
}

// drop forgets the stored disks.
func (s *diskStore) drop() {
	for _, d := range s.disks {
		d.f.Close()
		os.Remove(d.f.Name())
	}
	s.disks = nil
	s.has.Store(false)
}

// snapshot copies every stored disk, at epoch (the image's, in.mu held),
// for a backup's seed; the copies are the caller's. It returns nil if no
// disk is stored.
func (in *Intermediary) snapshotDisks(epoch uint64) (*DiskSeed, error) {
	s := &in.disks
	if len(s.disks) == 0 {
		return nil, nil
	}
	if s.epoch != epoch {
		return nil, fmt.Errorf("the disks are at epoch %d, the image at %d", s.epoch, epoch)
	}
	seed := &DiskSeed{}
	for i, d := range s.disks {
		f, err := os.CreateTemp(in.diskDir(), fmt.Sprintf("reseed-%d-disk%d-*", epoch, i))
		if err != nil {
			seed.Remove()
			return nil, err
		}
		seed.Disks = append(seed.Disks, SeedDisk{Path: f.Name(), Size: d.size, Fingerprint: d.fp})
		err = cloneFile(f, d.f, int64(d.size))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			seed.Remove()
			return nil, fmt.Errorf("copy disk %d: %w", i, err)
		}
	}
	return seed, nil
}

// cloneFile makes dst a copy of src's first size bytes: a reflink where
// the file system has them, else a copy.
func cloneFile(dst, src *os.File, size int64) error {
	if err := unix.IoctlFileClone(int(dst.Fd()), int(src.Fd())); err == nil {
		return nil
	} else if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return err
	}
	_, err := io.Copy(dst, io.NewSectionReader(src, 0, size))
	return err
}

// forwardDisks passes cp's disk writes to the attached backup, ahead of
// whatever checkpoint will commit the epoch there (forward, called next).
// A full image from the primary with disks breaks the backup's chain of
// disk epochs (its writes are in the seed, not in any epoch's), so it
// asks for a re-seed, which brings the disks with the image. Call with
// in.mu held, after applyDisks.
func (in *Intermediary) forwardDisks(cp *Checkpoint) {
	in.bmu.Lock()
	b := in.backup
	in.bmu.Unlock()
	d := cp.Disk
	// What forward queues of cp goes without the writes: they go on
	// their own.
	cp.Disk = nil
	if b == nil {
		return
	}
	switch {
	case cp.Kind == KindFull && len(in.disks.disks) > 0:
		b.requestReseed()
	case d != nil:
		b.enqueue(outgoing{disk: d, epoch: cp.Epoch})
	}
}

// RemoveDisks removes the intermediary's copy of the guest's disks, and
// its directory if the intermediary made it; call it once the
// intermediary is done (after Failover or when its primary finished).
func (in *Intermediary) RemoveDisks() {
	in.mu.Lock()
	defer in.mu.Unlock()
	s := &in.disks
	s.drop()
	// After this, diskDir gives "" (seeds refused) if it made no
	// directory yet; if it did, s.dir is read after it was set.
	s.dirOnce.Do(func() {})
	if s.set == "" && s.dir != "" {
		os.RemoveAll(s.dir)
	}
}
