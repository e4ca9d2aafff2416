package diskrep

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// The journal (<disk>.journal) holds at most one staged epoch:
//
//	header   magic "USDJ" | version u16 (1) | reserved u16 (0) | epoch u64 |
//	         disk size u64 | payload length u64
//	payload  the epoch's writes, encoded as a virtio.DiskWrites
//	sum      u32: CRC-32C of the header and the payload
//	marker   (only once Commit decided to apply it) magic "USDC" |
//	         crc u32 (CRC-32C of the epoch and the sum) | epoch u64
//
// A journal is complete when its sum and its marker check out; then its
// writes may be partly on the disk already, and Open applies them again
// (writing the same bytes twice leaves the same disk). Anything else in
// the journal file (empty, torn, no marker, a bad sum) means the disk was
// never touched for that epoch, and the journal is discarded.
//
// The epoch record (<disk>.epoch) is two 64-byte slots, written
// alternately so that a torn write of one leaves the other:
//
//	magic "USDE" | flags u32 (bit 0: seeded) | sequence u64 | epoch u64 |
//	disk size u64 | fingerprint 28 bytes (the first 28 of Fingerprint.Root) |
//	crc u32 (CRC-32C of the slot before it)
//
// The valid slot with the higher sequence is the record.

const (
	journalVersion    = 1
	journalHeaderSize = 32
	journalSumSize    = 4
	markerSize        = 16
	slotSize          = 64
	slotRootBytes     = 28
	flagSeeded        = 1
	// maxJournalPayload bounds the payload a journal header may announce:
	// a DiskWrites of a whole disk of the largest size could not be
	// staged anyway; this keeps a corrupt header from allocating much.
	maxJournalPayload = 1 << 34
)

var (
	journalMagic = [4]byte{'U', 'S', 'D', 'J'}
	markerMagic  = [4]byte{'U', 'S', 'D', 'C'}
	slotMagic    = [4]byte{'U', 'S', 'D', 'E'}
	castagnoli   = crc32.MakeTable(crc32.Castagnoli)
	le           = binary.LittleEndian
)

// encodeJournal returns the journal of epoch's writes (payload, already
// encoded), without the marker.
func encodeJournal(epoch, size uint64, payload []byte) []byte {
	b := make([]byte, 0, journalHeaderSize+len(payload)+journalSumSize+markerSize)
	b = append(b, journalMagic[:]...)
	b = le.AppendUint16(b, journalVersion)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint64(b, epoch)
	b = le.AppendUint64(b, size)
	b = le.AppendUint64(b, uint64(len(payload)))
	b = append(b, payload...)
	return le.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// encodeMarker returns the commit marker of a journal with the given epoch
// and sum.
func encodeMarker(epoch uint64, sum uint32) []byte {
	var c [12]byte
	le.PutUint64(c[0:], epoch)
	le.PutUint32(c[8:], sum)
	b := append([]byte(nil), markerMagic[:]...)
	b = le.AppendUint32(b, crc32.Checksum(c[:], castagnoli))
	return le.AppendUint64(b, epoch)
}

// committedJournal is a complete journal found by Open.
type committedJournal struct {
	epoch  uint64
	writes *virtio.DiskWrites
}

// readJournal reads the journal file and returns its epoch and writes if
// it is complete (sum and marker check out, for a disk of size bytes), or
// nil and the reason it is not.
func readJournal(f *os.File, size uint64) (*committedJournal, string, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, "", err
	}
	n := fi.Size()
	if n == 0 {
		return nil, "empty", nil
	}
	if n < journalHeaderSize+journalSumSize+markerSize {
		return nil, fmt.Sprintf("%d bytes, too short to be complete", n), nil
	}
	var hdr [journalHeaderSize]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return nil, "", err
	}
	switch {
	case [4]byte(hdr[0:4]) != journalMagic:
		return nil, "bad magic", nil
	case le.Uint16(hdr[4:]) != journalVersion || le.Uint16(hdr[6:]) != 0:
		return nil, fmt.Sprintf("version %d", le.Uint16(hdr[4:])), nil
	case le.Uint64(hdr[16:]) != size:
		return nil, fmt.Sprintf("for a disk of %d bytes, not %d", le.Uint64(hdr[16:]), size), nil
	}
	epoch, plen := le.Uint64(hdr[8:]), le.Uint64(hdr[24:])
	if plen > maxJournalPayload || int64(plen) != n-journalHeaderSize-journalSumSize-markerSize {
		return nil, fmt.Sprintf("payload of %d bytes in a file of %d bytes (no commit marker, or torn)", plen, n), nil
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil && err != io.EOF {
		return nil, "", err
	}
	body := b[:journalHeaderSize+plen]
	sum := le.Uint32(b[len(body):])
	if got := crc32.Checksum(body, castagnoli); got != sum {
		return nil, fmt.Sprintf("sum %#08x, the content's %#08x", sum, got), nil
	}
	marker := b[len(body)+journalSumSize:]
	if [markerSize]byte(marker) != [markerSize]byte(encodeMarker(epoch, sum)) {
		return nil, "bad commit marker", nil
	}
	w, err := virtio.DecodeDiskWrites(body[journalHeaderSize:])
	if err != nil {
		return nil, err.Error(), nil
	}
	if w.Size != size {
		return nil, fmt.Sprintf("writes for a disk of %d bytes", w.Size), nil
	}
	return &committedJournal{epoch: epoch, writes: w}, "", nil
}

// record is the replica's epoch record.
type record struct {
	seq    uint64
	seeded bool
	epoch  uint64
	size   uint64
	root   [slotRootBytes]byte
}

func (r *record) encode() []byte {
	b := append(make([]byte, 0, slotSize), slotMagic[:]...)
	var flags uint32
	if r.seeded {
		flags |= flagSeeded
	}
	b = le.AppendUint32(b, flags)
	b = le.AppendUint64(b, r.seq)
	b = le.AppendUint64(b, r.epoch)
	b = le.AppendUint64(b, r.size)
	b = append(b, r.root[:]...)
	return le.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

func decodeSlot(b []byte) (record, bool) {
	if len(b) != slotSize || [4]byte(b[0:4]) != slotMagic || crc32.Checksum(b[:slotSize-4], castagnoli) != le.Uint32(b[slotSize-4:]) {
		return record{}, false
	}
	flags := le.Uint32(b[4:])
	if flags&^flagSeeded != 0 {
		return record{}, false
	}
	r := record{seeded: flags&flagSeeded != 0, seq: le.Uint64(b[8:]), epoch: le.Uint64(b[16:]), size: le.Uint64(b[24:])}
	copy(r.root[:], b[32:60])
	return r, true
}

// readRecord returns the newest valid slot of the record file, or a
// zero record (not seeded) if it has none.
func readRecord(f *os.File) (record, error) {
	var b [2 * slotSize]byte
	n, err := f.ReadAt(b[:], 0)
	if err != nil && err != io.EOF {
		return record{}, err
	}
	var best record
	for i := 0; (i+1)*slotSize <= n; i++ {
		if r, ok := decodeSlot(b[i*slotSize : (i+1)*slotSize]); ok && r.seq >= best.seq {
			best = r
		}
	}
	return best, nil
}

// writeRecord writes r (whose seq the caller has advanced) into its slot
// and makes it durable.
func writeRecord(f *os.File, r record) error {
	if _, err := f.WriteAt(r.encode(), int64(r.seq%2)*slotSize); err != nil {
		return err
	}
	return f.Sync()
}

func rootPrefix(root [32]byte) (p [slotRootBytes]byte) {
	copy(p[:], root[:])
	return p
}
