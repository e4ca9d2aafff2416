package vmm

import (
	"fmt"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Disk replication (see package ft/diskrep and DESIGN.md section 4, "Disk
// writes are state, not output"): the primary writes its disks at once,
// and at each checkpoint, with the machine paused, harvests the blocks the
// guest wrote in the epoch and ships them with the epoch's memory. The
// backup applies them to its copy of each disk together with the memory.
//
// A checkpoint does, at one pause:
//
//	m.Pause()                      // block requests made available complete here
//	ws, err := m.TakeDiskWrites()  // one *virtio.DiskWrites per disk
//	// ... capture memory and state, send the checkpoint with ws ...
//	// if the checkpoint cannot be sent and will be retried as a later epoch:
//	m.ReturnDiskWrites(ws)
//	m.Resume()
//
// The first harvest after a disk is attached covers every write since then.
// A new backup's seed (each whole disk, with the full image) is taken at
// one pause: TakeDiskWrites there gives each disk's fingerprint (its ranges
// are in the seed, so they are not shipped), and CloneDisk copies each disk
// as it is at that pause; after Resume the copies are streamed to the
// backup (ft/diskrep Replica.Seed checks them against the fingerprints),
// and the next harvest holds exactly the writes after the seed.

// TakeDiskWrites harvests, from a paused machine, the writes to every
// virtio-blk disk since the previous harvest (virtio.Block.HarvestWrites):
// one DiskWrites per disk, in the order of LinuxConfig.Disks (or
// RestoreConfig.Disks), with DiskWrites.Disk that index, the current bytes
// of the written ranges and the disk's fingerprint after them. A disk
// without writes (a read-only one, say) has a DiskWrites with no ranges,
// so that the backup can check every disk at every epoch. A machine without
// disks returns nil.
//
// On an error no disk's writes are lost: the ones already taken are put
// back, and the next harvest returns them.
func (m *Machine) TakeDiskWrites() ([]*virtio.DiskWrites, error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if !m.paused && !m.halted.Load() {
		return nil, fmt.Errorf("take disk writes: %w", ErrNotPaused)
	}
	disks := m.blocks()
	var out []*virtio.DiskWrites
	for i, b := range disks {
		w, err := b.HarvestWrites(uint32(i))
		if err != nil {
			for j, w := range out {
				disks[j].RestoreWrites(rangesOf(w))
			}
			return nil, fmt.Errorf("take disk writes: disk %d: %w", i, err)
		}
		out = append(out, w)
	}
	return out, nil
}

// ReturnDiskWrites puts writes from TakeDiskWrites back, for a checkpoint
// that could not be sent: the next harvest includes their ranges again
// (with the disk's bytes as of that harvest). Entries for a disk the
// machine does not have are ignored.
func (m *Machine) ReturnDiskWrites(ws []*virtio.DiskWrites) {
	disks := m.blocks()
	for _, w := range ws {
		if w != nil && int(w.Disk) < len(disks) {
			disks[w.Disk].RestoreWrites(rangesOf(w))
		}
	}
}

// PendingDiskWrites returns the number of virtio.WriteBlock blocks written
// to the machine's disks since the last harvest, for status lines and for
// a caller that bounds the disk bytes of an epoch.
func (m *Machine) PendingDiskWrites() uint64 {
	var n uint64
	for _, b := range m.blocks() {
		n += b.PendingWrites()
	}
	return n
}

// CloneDisk copies disk i (in the order of LinuxConfig.Disks), as it is at
// this pause, to a new file at dst, for a backup's seed
// (virtio.Block.CloneTo: a reflink where the file system has them, a full
// copy elsewhere).
func (m *Machine) CloneDisk(i int, dst string) error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if !m.paused && !m.halted.Load() {
		return fmt.Errorf("clone disk %d: %w", i, ErrNotPaused)
	}
	disks := m.blocks()
	if i < 0 || i >= len(disks) {
		return fmt.Errorf("clone disk %d: the machine has %d disks", i, len(disks))
	}
	return disks[i].CloneTo(dst)
}

// blocks returns the machine's virtio-blk devices in disk order.
func (m *Machine) blocks() []*virtio.Block {
	if m.linux == nil {
		return nil
	}
	var out []*virtio.Block
	for _, s := range m.linux.virtio {
		var dev virtio.Device
		switch {
		case s.t != nil:
			dev = s.t.Device()
		default:
			dev = s.dev
		}
		if b, ok := dev.(*virtio.Block); ok {
			out = append(out, b)
		}
	}
	return out
}

func rangesOf(w *virtio.DiskWrites) []virtio.WriteRange {
	rs := make([]virtio.WriteRange, len(w.Ranges))
	for i, r := range w.Ranges {
		rs[i] = virtio.WriteRange{Off: r.Off, Len: uint64(len(r.Data))}
	}
	return rs
}
