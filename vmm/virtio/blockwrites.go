package virtio

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// Write tracking for disk replication. Every write request the device
// completes marks the WriteBlock-sized blocks it touched in a bitmap the
// device owns (one bit per 4 KiB: 32 KiB of bitmap for a 1 GiB disk). At a
// checkpoint, with the machine paused and the transport quiesced (so no
// request is half done and the guest cannot write), the caller harvests the
// set: TakeWrites returns the written ranges since the previous harvest,
// coalesced and ascending, and clears the set; ReadWrites reads their
// current bytes from the disk file into a DiskWrites for the checkpoint.
// HarvestWrites does both, and puts the ranges back if the read fails, so
// no write is ever lost from the set. Blocks nobody wrote are never read or
// copied.
//
// A read request is not tracked. The device offers neither DISCARD nor
// WRITE_ZEROES, so writes (VIRTIO_BLK_T_OUT) are the only requests that
// change the disk; a device that adds them must mark their ranges too.

// WriteBlock is the granularity of write tracking: a harvested range starts
// at a multiple of WriteBlock and its length is a multiple of WriteBlock,
// except that the last block of a disk whose size is not a multiple ends
// at the disk's end.
const WriteBlock = 4096

// MaxWriteRange bounds the length of one harvested range: TakeWrites splits
// a longer run of written blocks into ranges of at most this length.
const MaxWriteRange = 4 << 20

// WriteRange is a range of a disk, in bytes.
type WriteRange struct {
	Off uint64
	Len uint64
}

// End returns Off+Len.
func (r WriteRange) End() uint64 { return r.Off + r.Len }

// markWritten records that [off, off+n) of the disk was written: in the
// fingerprint's chunk set and in the replication write set. Called with the
// transport's lock held (from Notify).
func (b *Block) markWritten(off int64, n int) {
	if n <= 0 || off < 0 {
		return
	}
	b.wmu.Lock()
	defer b.wmu.Unlock()
	for c := off / FingerprintChunk; c <= (off+int64(n)-1)/FingerprintChunk; c++ {
		if w := int(c / 64); w < len(b.written) {
			b.written[w] |= 1 << (c % 64)
		}
	}
	b.markBlocks(uint64(off), uint64(n))
}

// markBlocks sets the write-set bits of [off, off+n). Called with wmu held.
func (b *Block) markBlocks(off, n uint64) {
	if n == 0 {
		return
	}
	last := (off + n - 1) / WriteBlock
	for blk := off / WriteBlock; blk <= last; blk++ {
		w := blk / 64
		if w >= uint64(len(b.wset)) {
			return
		}
		// Whole words at once in the middle of a long write.
		if blk%64 == 0 && last-blk >= 63 {
			b.wcount += 64 - uint64(bits.OnesCount64(b.wset[w]))
			b.wset[w] = ^uint64(0)
			blk += 63
			continue
		}
		if bit := uint64(1) << (blk % 64); b.wset[w]&bit == 0 {
			b.wset[w] |= bit
			b.wcount++
		}
	}
}

// Size returns the disk's size in bytes (the backing file's size; the
// capacity the guest sees is Capacity sectors, at most this).
func (b *Block) Size() int64 { return b.size }

// PendingWrites returns the number of WriteBlock blocks written since the
// previous harvest.
func (b *Block) PendingWrites() uint64 {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	return b.wcount
}

// TakeWrites returns the ranges of the disk written since the previous
// TakeWrites (or since the device was created), ascending, not
// overlapping, each at most MaxWriteRange long, and clears the set. Call it
// while the machine is paused and the transport quiesced, at the same pause
// as the memory capture the writes belong to. Without writes it returns nil
// without scanning the set.
func (b *Block) TakeWrites() []WriteRange {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	if b.wcount == 0 {
		return nil
	}
	var out []WriteRange
	size := uint64(b.size)
	add := func(first, end uint64) { // blocks [first, end)
		off, stop := first*WriteBlock, min(end*WriteBlock, size)
		for off < stop {
			n := min(stop-off, MaxWriteRange)
			out = append(out, WriteRange{Off: off, Len: n})
			off += n
		}
	}
	run, inRun := uint64(0), false
	for w, word := range b.wset {
		base := uint64(w) * 64
		if !inRun && word == 0 || inRun && word == ^uint64(0) {
			continue
		}
		for i := uint64(0); i < 64; i++ {
			set := word&(1<<i) != 0
			switch {
			case set && !inRun:
				run, inRun = base+i, true
			case !set && inRun:
				add(run, base+i)
				inRun = false
			}
			if !inRun && word>>i == 0 {
				break
			}
		}
	}
	if inRun {
		add(run, uint64(len(b.wset))*64)
	}
	clear(b.wset)
	b.wcount = 0
	return out
}

// RestoreWrites puts ranges (from TakeWrites) back into the write set, for
// a caller that harvested them but could not ship them: the next harvest
// includes them again.
func (b *Block) RestoreWrites(ranges []WriteRange) {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	for _, r := range ranges {
		b.markBlocks(r.Off, r.Len)
	}
}

// ReadWrites returns a DiskWrites for disk index with the current bytes of
// ranges (from TakeWrites) read from the disk file, and the disk's
// fingerprint brought up to date (only the chunks written since the last
// fingerprint are hashed again). Call it at the pause TakeWrites ran in:
// the guest cannot change the bytes while the machine is paused.
func (b *Block) ReadWrites(index uint32, ranges []WriteRange) (*DiskWrites, error) {
	var total uint64
	for _, r := range ranges {
		if r.Len == 0 || r.End() > uint64(b.size) || r.End() < r.Off {
			return nil, fmt.Errorf("virtio-blk %s: range [%d, +%d) is outside the disk's %d bytes", b.path, r.Off, r.Len, b.size)
		}
		total += r.Len
	}
	buf := make([]byte, total)
	w := &DiskWrites{Disk: index, Size: uint64(b.size), Ranges: make([]DiskRange, 0, len(ranges))}
	for _, r := range ranges {
		p := buf[:r.Len:r.Len]
		buf = buf[r.Len:]
		if _, err := b.f.ReadAt(p, int64(r.Off)); err != nil {
			return nil, fmt.Errorf("virtio-blk %s: read written range [%d, +%d): %w", b.path, r.Off, r.Len, err)
		}
		w.Ranges = append(w.Ranges, DiskRange{Off: r.Off, Data: p})
	}
	b.wmu.Lock()
	fp, err := b.fingerprint()
	if err == nil {
		w.Fingerprint = fp.Root()
	}
	b.wmu.Unlock()
	if err != nil {
		return nil, err
	}
	return w, nil
}

// HarvestWrites is TakeWrites then ReadWrites; if the read fails, the
// ranges go back into the write set (RestoreWrites) so that a later
// harvest ships them.
func (b *Block) HarvestWrites(index uint32) (*DiskWrites, error) {
	ranges := b.TakeWrites()
	w, err := b.ReadWrites(index, ranges)
	if err != nil {
		b.RestoreWrites(ranges)
		return nil, err
	}
	return w, nil
}

// CloneTo writes a copy of the disk file, as it is now, to a new file at
// dst (which must not exist), for seeding a new backup. Call it while the
// machine is paused, at the pause whose HarvestWrites gives the seed's
// fingerprint (and whose ranges the seed already holds): the copy then has
// exactly that fingerprint's content. On a file system with reflinks
// (btrfs, XFS) the copy is a clone made in constant time; elsewhere it is a
// full in-kernel copy (copy_file_range), which lengthens the pause by the
// disk's size over the copy rate. The copy is synced before CloneTo
// returns.
func (b *Block) CloneTo(dst string) error {
	out, err := os.OpenFile(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("virtio-blk %s: clone: %w", b.path, err)
	}
	err = b.cloneInto(out)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
		return fmt.Errorf("virtio-blk %s: clone to %s: %w", b.path, dst, err)
	}
	return nil
}

func (b *Block) cloneInto(out *os.File) error {
	if err := unix.IoctlFileClone(int(out.Fd()), int(b.f.Fd())); err != nil {
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
			return err
		}
		// No reflinks here: copy (io.Copy between files uses
		// copy_file_range).
		if _, err := io.Copy(out, io.NewSectionReader(b.f, 0, b.size)); err != nil {
			return err
		}
	}
	if fi, err := out.Stat(); err != nil {
		return err
	} else if fi.Size() != b.size {
		return fmt.Errorf("the copy is %d bytes, the disk %d", fi.Size(), b.size)
	}
	return out.Sync()
}

// SetFingerprint gives the device the fingerprint of its disk's current
// content, computed elsewhere, so that a restore into it (LoadState)
// compares the state's fingerprint with this one instead of reading the
// whole disk. ft/diskrep's replica keeps its disk's fingerprint up to date
// epoch by epoch (Replica.Activate returns it), which spares a failover one
// read and hash of the disk. The caller vouches that fp is the disk's:
// nothing checks it but the size.
func (b *Block) SetFingerprint(fp *Fingerprint) error {
	if fp == nil || fp.Size() != b.size {
		return fmt.Errorf("virtio-blk %s: a fingerprint of a disk of %v bytes, this one has %d", b.path, fpSize(fp), b.size)
	}
	b.wmu.Lock()
	b.trusted = fp.Clone()
	b.wmu.Unlock()
	return nil
}

func fpSize(fp *Fingerprint) any {
	if fp == nil {
		return "no"
	}
	return fp.Size()
}
