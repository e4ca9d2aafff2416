package ft

import (
	"fmt"
	"os"
)

// The primary's side of disk replication (see disk.go).

// sealFull is seal for a full image's final pause: the disk seed first
// (TakeFullWith sets the checkpoint's kind only after the pause).
func (p *Primary) sealFull(cp *Checkpoint) {
	p.takeDiskSeed(cp)
	p.seal(cp)
}

// sealDisks runs in seal, with the machine paused or stopped: a full
// image's checkpoint takes the disk seed (unless sealFull did), any other
// the epoch's disk writes. An error fails the checkpoint's send (the link
// is then restarted with a full image, whose seed covers every disk).
func (p *Primary) sealDisks(cp *Checkpoint) {
	switch {
	case cp.Seed != nil || cp.diskErr != nil:
	case cp.Kind == KindFull:
		p.takeDiskSeed(cp)
	default:
		ws, err := p.m.TakeDiskWrites()
		if err != nil {
			cp.diskErr = err
			return
		}
		if len(ws) > 0 {
			cp.Disk = &DiskEpoch{Epoch: cp.Epoch, Writes: ws}
		}
	}
}

// takeDiskSeed copies every disk as it is at this pause (vmm.Machine
// CloneDisk: a reflink where the file system has them), with its
// fingerprint; the copies are streamed once the guest runs again and
// removed once sent. The harvest that gives the fingerprints also starts
// the next epoch's writes afresh: the seed holds the earlier ones.
func (p *Primary) takeDiskSeed(cp *Checkpoint) {
	ws, err := p.m.TakeDiskWrites()
	if err != nil {
		cp.diskErr = err
		return
	}
	if len(ws) == 0 {
		return
	}
	dir := p.cfg.DiskSeedDir
	if dir == "" {
		dir = os.TempDir()
	}
	seed := &DiskSeed{}
	for i, w := range ws {
		f, err := os.CreateTemp(dir, fmt.Sprintf("understudy-seed-%d-disk%d-*", cp.Epoch, i))
		if err == nil {
			name := f.Name()
			f.Close()
			os.Remove(name)
			err = p.m.CloneDisk(i, name)
			seed.Disks = append(seed.Disks, SeedDisk{Path: name, Size: w.Size, Fingerprint: w.Fingerprint})
		}
		if err != nil {
			seed.Remove()
			p.m.ReturnDiskWrites(ws)
			cp.diskErr = fmt.Errorf("disk %d seed: %w", i, err)
			return
		}
	}
	cp.Seed = seed
}

// diskSent is the sender's bookkeeping once cp's send is over: a seed's
// copies are removed; the writes of a checkpoint that could not be sent
// are put back, for the next harvest.
func (p *Primary) diskSent(cp *Checkpoint, err error) {
	cp.Seed.Remove()
	switch {
	case cp.Disk == nil:
	case err != nil:
		p.m.ReturnDiskWrites(cp.Disk.Writes)
	default:
		p.diskSentB.Add(cp.Disk.Bytes())
	}
}
