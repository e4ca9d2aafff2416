package ft

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Disk replication in the checkpoint stream (see package ft/diskrep for
// the backup's replica and why the intermediary holds no disk blocks
// back).
//
// The primary harvests, at each checkpoint's pause, the blocks the guest
// wrote in the epoch (vmm.Machine.TakeDiskWrites: one virtio.DiskWrites
// per disk, its ranges each with a CRC-32C, and the disk's fingerprint)
// and sends them inside checkpoint e as wire.DiskWrites frames (every
// disk in order, each split into parts below the frame limit). A full
// image carries instead the whole of every disk as wire.DiskSeed frames,
// copied at the image's final pause (vmm.Machine.CloneDisk) and streamed
// after the guest resumed. A receiver decodes every part (each range's
// CRC checked) and takes the checkpoint only when every disk's writes
// arrived whole: a corrupt or missing part refuses the whole checkpoint,
// which changes nothing.
//
// The intermediary keeps a copy of every disk at its image's epoch (a
// full image's seed, checked against the fingerprints, then each epoch's
// writes), to seed a new backup, and forwards each epoch's writes to the
// backup as they come, on their own, ahead of whatever checkpoint commits
// the epoch (a delta, or a hold-back sync covering several epochs). The
// backup stages each epoch on its replicas (which check the fingerprint)
// and commits them when its memory image commits the epoch.

// DiskEpoch is one epoch's writes to every disk of the guest: one
// DiskWrites per disk, in disk order (one without ranges for a disk not
// written).
type DiskEpoch struct {
	Epoch  uint64
	Writes []*virtio.DiskWrites
}

// Bytes returns the data bytes of the epoch's writes.
func (d *DiskEpoch) Bytes() uint64 {
	var n uint64
	for _, w := range d.Writes {
		n += w.Bytes()
	}
	return n
}

// DiskSeed is every disk of the guest as it was at a full image's epoch,
// each in a file.
type DiskSeed struct {
	Disks []SeedDisk
}

// SeedDisk is one disk of a seed.
type SeedDisk struct {
	Path        string
	Size        uint64
	Fingerprint [wire.FingerprintLen]byte
}

// Remove removes the seed's files.
func (s *DiskSeed) Remove() {
	if s == nil {
		return
	}
	for _, d := range s.Disks {
		if d.Path != "" {
			os.Remove(d.Path)
		}
	}
}

// Verify fingerprints every disk of the seed and compares it with the
// fingerprint it came with.
func (s *DiskSeed) Verify() error {
	for i, d := range s.Disks {
		f, err := os.Open(d.Path)
		if err != nil {
			return err
		}
		fp, err := virtio.NewFingerprint(f, int64(d.Size))
		f.Close()
		if err != nil {
			return fmt.Errorf("disk %d seed: %w", i, err)
		}
		if root := fp.Root(); root != d.Fingerprint {
			return badf("disk %d seed: fingerprint %x, sent with %x", i, root[:8], d.Fingerprint[:8])
		}
	}
	return nil
}

// diskPart is the most encoded bytes of one DiskWrites frame's data.
const diskPart = wire.MaxPayload - 64

// seedChunk is the most bytes of one DiskSeed frame.
const seedChunk = 1 << 20

// sendDiskEpoch writes d as DiskWrites frames: every disk in order, each
// in parts of at most diskPart encoded bytes.
func sendDiskEpoch(c MessageConn, d *DiskEpoch) error {
	n := uint32(len(d.Writes))
	for i, w := range d.Writes {
		parts, err := w.Split(diskPart)
		if err != nil {
			return fmt.Errorf("disk %d writes of epoch %d: %w", i, d.Epoch, err)
		}
		for j, p := range parts {
			b, err := p.AppendBinary(make([]byte, 0, p.EncodedLen()))
			if err != nil {
				return fmt.Errorf("disk %d writes of epoch %d: %w", i, d.Epoch, err)
			}
			m := &wire.DiskWrites{Epoch: d.Epoch, Disk: uint32(i), Disks: n, Part: uint32(j), Parts: uint32(len(parts)), Data: b}
			if err := c.WriteMessage(m); err != nil {
				return err
			}
		}
	}
	return nil
}

// sendDiskSeed streams every disk of s as DiskSeed frames of epoch: a
// disk's chunks ascend; chunks of zeros are not sent, but every disk's
// first one is, so the receiver learns of every disk.
func sendDiskSeed(c MessageConn, epoch uint64, s *DiskSeed) error {
	buf := make([]byte, seedChunk)
	for i, d := range s.Disks {
		f, err := os.Open(d.Path)
		if err != nil {
			return fmt.Errorf("disk %d seed: %w", i, err)
		}
		err = func() error {
			defer f.Close()
			for off := uint64(0); off < d.Size; off += seedChunk {
				p := buf[:min(seedChunk, d.Size-off)]
				if _, err := f.ReadAt(p, int64(off)); err != nil && !errors.Is(err, io.EOF) {
					return fmt.Errorf("disk %d seed: %w", i, err)
				}
				if off != 0 && allZero(p) {
					continue
				}
				m := &wire.DiskSeed{Epoch: epoch, Disk: uint32(i), Disks: uint32(len(s.Disks)), Size: d.Size,
					Offset: off, Fingerprint: d.Fingerprint, Data: p}
				if err := c.WriteMessage(m); err != nil {
					return err
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

var zeroChunk = make([]byte, seedChunk)

func allZero(p []byte) bool { return bytes.Equal(p, zeroChunk[:len(p)]) }

// diskAssembly puts one epoch's DiskWrites frames back together. Frames
// come disk after disk, part after part; each part is decoded (every
// range's CRC checked) as it arrives.
type diskAssembly struct {
	epoch uint64
	disks uint32
	disk  uint32 // the disk expected next
	part  uint32 // its part expected next
	parts uint32 // its part count (0: not started)
	cur   []*virtio.DiskWrites
	done  []*virtio.DiskWrites
}

// add takes the next frame of the epoch. Any error is ErrBadCheckpoint.
func (a *diskAssembly) add(m *wire.DiskWrites) error {
	if a.disks == 0 {
		a.epoch, a.disks = m.Epoch, m.Disks
	}
	switch {
	case a.complete():
		return badf("disk writes of epoch %d: disk %d part %d after the epoch's %d disks", m.Epoch, m.Disk, m.Part, a.disks)
	case m.Epoch != a.epoch || m.Disks != a.disks:
		return badf("disk writes of epoch %d (%d disks) among those of epoch %d (%d disks)", m.Epoch, m.Disks, a.epoch, a.disks)
	case m.Disk != a.disk || m.Part != a.part || (a.parts != 0 && m.Parts != a.parts):
		return badf("disk writes of epoch %d: disk %d part %d of %d, want disk %d part %d", m.Epoch, m.Disk, m.Part, m.Parts, a.disk, a.part)
	}
	w, err := virtio.DecodeDiskWrites(m.Data)
	if err != nil {
		return badf("disk writes of epoch %d, disk %d part %d: %v", m.Epoch, m.Disk, m.Part, err)
	}
	if w.Disk != m.Disk {
		return badf("disk writes of epoch %d: disk %d's part holds disk %d's writes", m.Epoch, m.Disk, w.Disk)
	}
	// Parts continue each other (one disk, ranges ascending across
	// them), so what is kept is bounded by the disk's size.
	if n := len(a.cur); n > 0 {
		prev := a.cur[n-1]
		if w.Size != prev.Size || w.Fingerprint != prev.Fingerprint {
			return badf("disk writes of epoch %d: disk %d part %d is of another disk size or fingerprint than part %d", m.Epoch, m.Disk, m.Part, m.Part-1)
		}
		if k := len(prev.Ranges); k > 0 && len(w.Ranges) > 0 {
			if end := prev.Ranges[k-1].Off + uint64(len(prev.Ranges[k-1].Data)); w.Ranges[0].Off < end {
				return badf("disk writes of epoch %d: disk %d part %d starts at %d, before part %d ends (%d)", m.Epoch, m.Disk, m.Part, w.Ranges[0].Off, m.Part-1, end)
			}
		}
	}
	a.parts = m.Parts
	a.cur = append(a.cur, w)
	a.part++
	if a.part == a.parts {
		joined, err := virtio.JoinDiskWrites(a.cur)
		if err != nil {
			return badf("disk writes of epoch %d, disk %d: %v", m.Epoch, m.Disk, err)
		}
		a.done = append(a.done, joined)
		a.cur, a.disk, a.part, a.parts = nil, a.disk+1, 0, 0
	}
	return nil
}

// started reports whether a frame was added.
func (a *diskAssembly) started() bool { return a.disks != 0 }

// complete reports whether every disk's writes arrived.
func (a *diskAssembly) complete() bool { return a.disks != 0 && a.disk == a.disks }

// result returns the epoch's writes; call once complete.
func (a *diskAssembly) result() *DiskEpoch { return &DiskEpoch{Epoch: a.epoch, Writes: a.done} }

// seedReceiver writes a checkpoint's DiskSeed frames into files in dir.
type seedReceiver struct {
	dirOf func() string // asked at the first chunk (nil: seeds refused)
	dir   string
	epoch uint64
	disks uint32
	files []*os.File
	seed  DiskSeed
	end   uint64 // the end of the last chunk of the current disk
}

// add writes the next chunk. Any error is ErrBadCheckpoint (or the
// file's).
func (s *seedReceiver) add(epoch uint64, m *wire.DiskSeed) error {
	if s.disks == 0 && s.dirOf != nil {
		s.dir = s.dirOf()
	}
	if s.dir == "" {
		return badf("checkpoint %d: a disk seed, and this receiver keeps no disks", epoch)
	}
	if s.disks == 0 {
		s.epoch, s.disks = m.Epoch, m.Disks
	}
	cur := len(s.files) - 1
	switch {
	case m.Epoch != epoch || m.Epoch != s.epoch || m.Disks != s.disks:
		return badf("checkpoint %d: seed chunk of epoch %d (%d disks), want epoch %d (%d disks)", epoch, m.Epoch, m.Disks, s.epoch, s.disks)
	case int(m.Disk) == cur+1 && m.Offset == 0:
		f, err := os.CreateTemp(s.dir, fmt.Sprintf("seed-%d-disk%d-*", epoch, m.Disk))
		if err != nil {
			return err
		}
		s.files = append(s.files, f)
		s.seed.Disks = append(s.seed.Disks, SeedDisk{Path: f.Name(), Size: m.Size, Fingerprint: m.Fingerprint})
		if err := f.Truncate(int64(m.Size)); err != nil {
			return err
		}
		cur, s.end = cur+1, 0
	case int(m.Disk) != cur || cur < 0:
		return badf("checkpoint %d: seed chunk of disk %d at %d, disk %d was being received", epoch, m.Disk, m.Offset, cur)
	case m.Offset < s.end || m.Size != s.seed.Disks[cur].Size || m.Fingerprint != s.seed.Disks[cur].Fingerprint:
		return badf("checkpoint %d: seed chunk of disk %d at %d (disk of %d bytes) after its chunk ending at %d", epoch, m.Disk, m.Offset, m.Size, s.end)
	}
	if _, err := s.files[cur].WriteAt(m.Data, int64(m.Offset)); err != nil {
		return err
	}
	s.end = m.Offset + uint64(len(m.Data))
	return nil
}

// finish closes the files and returns the seed (nil if none came); the
// seed's files are the caller's.
func (s *seedReceiver) finish() (*DiskSeed, error) {
	if s.disks == 0 {
		return nil, nil
	}
	var errs []error
	for _, f := range s.files {
		errs = append(errs, f.Sync(), f.Close())
	}
	s.files = nil
	if err := errors.Join(errs...); err != nil {
		s.seed.Remove()
		return nil, err
	}
	if uint32(len(s.seed.Disks)) != s.disks {
		s.seed.Remove()
		return nil, badf("checkpoint %d: seed of %d disks, %d arrived", s.epoch, s.disks, len(s.seed.Disks))
	}
	return &s.seed, nil
}

// abort removes what was received.
func (s *seedReceiver) abort() {
	for _, f := range s.files {
		f.Close()
	}
	s.files = nil
	s.seed.Remove()
}

// seedDirOf is where a backup receives a seed for the disk at path: next
// to it, so the replica renames nothing across file systems.
func seedDirOf(path string) string { return filepath.Dir(path) }

// sendCheckpointDisks sends cp's disk writes and, for a full image, its
// disk seed (inside the checkpoint, before its End).
func sendCheckpointDisks(c MessageConn, cp *Checkpoint) error {
	if cp.diskErr != nil {
		return cp.diskErr
	}
	if cp.Disk != nil {
		if cp.Disk.Epoch != cp.Epoch {
			return fmt.Errorf("disk writes of epoch %d in checkpoint %d", cp.Disk.Epoch, cp.Epoch)
		}
		if err := sendDiskEpoch(c, cp.Disk); err != nil {
			return err
		}
	}
	if cp.Seed != nil && cp.Kind == KindFull {
		return sendDiskSeed(c, cp.Epoch, cp.Seed)
	}
	return nil
}

// finishCheckpointDisks puts what a checkpoint's stream carried for the
// disks into cp, once it has ended: disk writes must be complete.
func finishCheckpointDisks(cp *Checkpoint, disk *diskAssembly, seed *seedReceiver) error {
	if disk.started() {
		if !disk.complete() {
			return badf("checkpoint %d: the disk writes of %d disks ended at disk %d part %d", cp.Epoch, disk.disks, disk.disk, disk.part)
		}
		cp.Disk = disk.result()
	}
	s, err := seed.finish()
	if err != nil {
		return err
	}
	cp.Seed = s
	return nil
}
