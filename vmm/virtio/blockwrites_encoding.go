package virtio

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash/crc32"
)

// DiskWrites is one epoch's writes to one disk: the current bytes of every
// range written since the previous harvest, and the disk's fingerprint
// with them applied. The backup applies them to its copy of the disk
// (package ft/diskrep) and, before it does, checks that the result will
// have this fingerprint.
type DiskWrites struct {
	// Disk is the disk's index among the machine's virtio-blk disks (the
	// order of vmm.LinuxConfig.Disks).
	Disk uint32
	// Size is the disk's size in bytes.
	Size uint64
	// Fingerprint is Fingerprint.Root of the whole disk with these writes
	// applied.
	Fingerprint [sha256.Size]byte
	// Ranges are the written ranges, ascending and not overlapping.
	Ranges []DiskRange
}

// DiskRange is the content of one written range of a disk.
type DiskRange struct {
	Off  uint64
	Data []byte
}

// Bytes returns the number of data bytes in w's ranges.
func (w *DiskWrites) Bytes() uint64 {
	var n uint64
	for _, r := range w.Ranges {
		n += uint64(len(r.Data))
	}
	return n
}

// Encoding of DiskWrites, version 1 (all integers little-endian). It
// travels in a checkpoint and is staged in the backup's journal, so
// decoding treats it as untrusted:
//
//	header  magic "USDW" | version u16 (1) | reserved u16 (0) | disk u32 |
//	        range count u32 | disk size u64 | block size u32 (WriteBlock) |
//	        reserved u32 (0) | fingerprint 32 bytes
//	ranges  per range: offset u64 | length u32 | crc u32 | data (length bytes)
//
// The crc of a range is CRC-32C (Castagnoli) over the disk index u32, the
// offset u64, the length u32 and the data: a range that arrives with other
// bytes, at another offset or for another disk is refused. Ranges are
// ascending and do not overlap (they may touch); each starts at a multiple
// of WriteBlock, is 1 to MaxWriteRange bytes long, and its length is a
// multiple of WriteBlock unless it ends at the disk's end; none extends
// past the disk. The disk is 1 byte to MaxReplicatedDisk bytes; there are
// at most MaxDiskWriteRanges ranges; nothing follows the last range.

// DiskWritesVersion is the version of the DiskWrites encoding this build
// writes and reads.
const DiskWritesVersion = 1

// Bounds of a DiskWrites encoding.
const (
	MaxDiskWriteRanges = 1 << 20
	MaxReplicatedDisk  = 1 << 44 // 16 TiB
	diskWritesHeader   = 64
	diskRangeHeader    = 16
)

// ErrBadDiskWrites is wrapped by every error about a malformed DiskWrites.
var ErrBadDiskWrites = errors.New("bad disk writes")

var diskWritesMagic = [4]byte{'U', 'S', 'D', 'W'}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func badWrites(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadDiskWrites, fmt.Sprintf(format, args...))
}

// RangeSum is the CRC-32C a range of disk carries in the encoding.
func RangeSum(disk uint32, off uint64, data []byte) uint32 {
	var h [16]byte
	le.PutUint32(h[0:], disk)
	le.PutUint64(h[4:], off)
	le.PutUint32(h[12:], uint32(len(data)))
	return crc32.Update(crc32.Checksum(h[:], castagnoli), castagnoli, data)
}

// checkRange checks one range against the rules of the encoding, given the
// end of the previous range.
func checkDiskRange(size, prevEnd, off, n uint64) error {
	end := off + n
	switch {
	case n == 0 || n > MaxWriteRange:
		return badWrites("range at %d is %d bytes, want 1 to %d", off, n, MaxWriteRange)
	case off%WriteBlock != 0:
		return badWrites("range at %d is not aligned to %d bytes", off, WriteBlock)
	case off > size || n > size-off:
		return badWrites("range [%d, +%d) extends past the disk's %d bytes", off, n, size)
	case n%WriteBlock != 0 && end != size:
		return badWrites("range at %d is %d bytes, not a multiple of %d, and does not end at the disk's end", off, n, WriteBlock)
	case off < prevEnd:
		return badWrites("range at %d overlaps or precedes the previous one, which ends at %d", off, prevEnd)
	}
	return nil
}

func (w *DiskWrites) validate() error {
	switch {
	case w.Size == 0 || w.Size > MaxReplicatedDisk:
		return badWrites("disk size %d, want 1 to %d", w.Size, uint64(MaxReplicatedDisk))
	case len(w.Ranges) > MaxDiskWriteRanges:
		return badWrites("%d ranges, at most %d", len(w.Ranges), MaxDiskWriteRanges)
	}
	var prev uint64
	for _, r := range w.Ranges {
		if err := checkDiskRange(w.Size, prev, r.Off, uint64(len(r.Data))); err != nil {
			return err
		}
		prev = r.Off + uint64(len(r.Data))
	}
	return nil
}

// EncodedLen returns the length of w's encoding.
func (w *DiskWrites) EncodedLen() int {
	n := diskWritesHeader
	for _, r := range w.Ranges {
		n += diskRangeHeader + len(r.Data)
	}
	return n
}

// AppendBinary appends w's encoding to b. It fails if w breaks a rule
// decoding enforces.
func (w *DiskWrites) AppendBinary(b []byte) ([]byte, error) {
	if err := w.validate(); err != nil {
		return b, err
	}
	b = append(b, diskWritesMagic[:]...)
	b = le.AppendUint16(b, DiskWritesVersion)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint32(b, w.Disk)
	b = le.AppendUint32(b, uint32(len(w.Ranges)))
	b = le.AppendUint64(b, w.Size)
	b = le.AppendUint32(b, WriteBlock)
	b = le.AppendUint32(b, 0)
	b = append(b, w.Fingerprint[:]...)
	for _, r := range w.Ranges {
		b = le.AppendUint64(b, r.Off)
		b = le.AppendUint32(b, uint32(len(r.Data)))
		b = le.AppendUint32(b, RangeSum(w.Disk, r.Off, r.Data))
		b = append(b, r.Data...)
	}
	return b, nil
}

// DecodeDiskWrites decodes and checks an encoded DiskWrites. The ranges'
// Data alias b. Every error wraps ErrBadDiskWrites.
func DecodeDiskWrites(b []byte) (*DiskWrites, error) {
	if len(b) < diskWritesHeader {
		return nil, badWrites("%d bytes, shorter than the %d-byte header", len(b), diskWritesHeader)
	}
	if [4]byte(b[0:4]) != diskWritesMagic {
		return nil, badWrites("magic %q, want %q", b[0:4], diskWritesMagic[:])
	}
	if v := le.Uint16(b[4:]); v != DiskWritesVersion {
		return nil, badWrites("version %d, this build reads %d", v, DiskWritesVersion)
	}
	if le.Uint16(b[6:]) != 0 || le.Uint32(b[28:]) != 0 {
		return nil, badWrites("a reserved header field is not 0")
	}
	if bs := le.Uint32(b[24:]); bs != WriteBlock {
		return nil, badWrites("block size %d, this build uses %d", bs, WriteBlock)
	}
	w := &DiskWrites{Disk: le.Uint32(b[8:]), Size: le.Uint64(b[16:])}
	count := le.Uint32(b[12:])
	copy(w.Fingerprint[:], b[32:64])
	if w.Size == 0 || w.Size > MaxReplicatedDisk {
		return nil, badWrites("disk size %d, want 1 to %d", w.Size, uint64(MaxReplicatedDisk))
	}
	rest := b[diskWritesHeader:]
	// Every range takes at least diskRangeHeader+1 bytes: a count the
	// input cannot hold is refused before anything is allocated for it.
	if count > MaxDiskWriteRanges || uint64(count) > uint64(len(rest))/(diskRangeHeader+1) {
		return nil, badWrites("%d ranges in %d bytes (at most %d ranges)", count, len(rest), MaxDiskWriteRanges)
	}
	w.Ranges = make([]DiskRange, 0, count)
	var prev uint64
	for i := range count {
		if len(rest) < diskRangeHeader {
			return nil, badWrites("range %d: %d bytes left, shorter than a range header", i, len(rest))
		}
		off, n, sum := le.Uint64(rest), uint64(le.Uint32(rest[8:])), le.Uint32(rest[12:])
		if err := checkDiskRange(w.Size, prev, off, n); err != nil {
			return nil, fmt.Errorf("range %d: %w", i, err)
		}
		if uint64(len(rest)-diskRangeHeader) < n {
			return nil, badWrites("range %d at %d: %d data bytes, %d left", i, off, n, len(rest)-diskRangeHeader)
		}
		data := rest[diskRangeHeader : diskRangeHeader+n : diskRangeHeader+n]
		if got := RangeSum(w.Disk, off, data); got != sum {
			return nil, badWrites("range %d at %d: crc %#08x, the data's is %#08x", i, off, sum, got)
		}
		w.Ranges = append(w.Ranges, DiskRange{Off: off, Data: data})
		prev = off + n
		rest = rest[diskRangeHeader+n:]
	}
	if len(rest) != 0 {
		return nil, badWrites("%d bytes after the last range", len(rest))
	}
	return w, nil
}

// Split divides w into parts whose encodings are at most maxEncoded bytes
// each (for a transport that bounds its messages), in order; every part
// has w's disk, size and fingerprint. maxEncoded must hold a header and one
// range of MaxWriteRange bytes. JoinDiskWrites puts the parts together.
func (w *DiskWrites) Split(maxEncoded int) ([]*DiskWrites, error) {
	if maxEncoded < diskWritesHeader+diskRangeHeader+MaxWriteRange {
		return nil, fmt.Errorf("split disk writes: %d bytes cannot hold a range of %d bytes", maxEncoded, MaxWriteRange)
	}
	part := &DiskWrites{Disk: w.Disk, Size: w.Size, Fingerprint: w.Fingerprint}
	parts := []*DiskWrites{part}
	n := diskWritesHeader
	for _, r := range w.Ranges {
		if k := diskRangeHeader + len(r.Data); n+k > maxEncoded {
			part = &DiskWrites{Disk: w.Disk, Size: w.Size, Fingerprint: w.Fingerprint}
			parts = append(parts, part)
			n = diskWritesHeader
		}
		part.Ranges = append(part.Ranges, r)
		n += diskRangeHeader + len(r.Data)
	}
	return parts, nil
}

// JoinDiskWrites puts parts from Split back together: they must be of one
// disk, size and fingerprint, and their ranges ascending across parts.
// Every error wraps ErrBadDiskWrites.
func JoinDiskWrites(parts []*DiskWrites) (*DiskWrites, error) {
	if len(parts) == 0 {
		return nil, badWrites("no parts to join")
	}
	p0 := parts[0]
	w := &DiskWrites{Disk: p0.Disk, Size: p0.Size, Fingerprint: p0.Fingerprint}
	for i, p := range parts {
		if p.Disk != w.Disk || p.Size != w.Size || p.Fingerprint != w.Fingerprint {
			return nil, badWrites("part %d is of disk %d (%d bytes), part 0 of disk %d (%d bytes), or their fingerprints differ",
				i, p.Disk, p.Size, w.Disk, w.Size)
		}
		w.Ranges = append(w.Ranges, p.Ranges...)
	}
	if err := w.validate(); err != nil {
		return nil, err
	}
	return w, nil
}
