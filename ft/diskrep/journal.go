package diskrep

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
)

// The journal (<disk>.journal) is a chain of entries, appended in order:
//
//	header   magic "USDJ" | version u16 (1) | kind u16 (1 writes, 2 commit) |
//	         epoch u64 | disk size u64 | payload length u64
//	payload  kind 1: the epoch's writes, encoded as a virtio.DiskWrites;
//	         kind 2: nothing
//	sum      u32: CRC-32C of the previous entry's sum (4 bytes, 0 for the
//	         first entry), the header and the payload
//
// Writes entries stage epochs, ascending. A commit entry of epoch s says
// that every writes entry before it with an epoch up to s is committed:
// Commit makes it durable before it touches the disk. Since each sum
// covers the one before, a valid commit entry implies that every entry
// before it is intact. Open reads entries up to the first one that does
// not check out (a torn or never-synced tail); if the last valid commit
// entry names an epoch after the recorded one, the disk may hold part of
// its writes, and Open applies the writes it covers again (the same bytes
// to the same places: idempotent). Everything else in the journal is
// discarded: staged epochs do not survive a restart, as the backup's
// memory image does not.
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
	kindWrites        = 1
	kindCommit        = 2
	slotSize          = 64
	slotRootBytes     = 28
	flagSeeded        = 1
	// maxJournalPayload bounds the payload a journal header may announce,
	// so that a corrupt header does not make Open allocate much.
	maxJournalPayload = 1 << 34
)

var (
	journalMagic = [4]byte{'U', 'S', 'D', 'J'}
	slotMagic    = [4]byte{'U', 'S', 'D', 'E'}
	castagnoli   = crc32.MakeTable(crc32.Castagnoli)
	le           = binary.LittleEndian
)

// appendEntry appends a journal entry chained to prev and returns the
// result and the entry's sum.
func appendEntry(b []byte, prev uint32, kind uint16, epoch, size uint64, payload []byte) ([]byte, uint32) {
	start := len(b)
	b = append(b, journalMagic[:]...)
	b = le.AppendUint16(b, journalVersion)
	b = le.AppendUint16(b, kind)
	b = le.AppendUint64(b, epoch)
	b = le.AppendUint64(b, size)
	b = le.AppendUint64(b, uint64(len(payload)))
	b = append(b, payload...)
	var p [4]byte
	le.PutUint32(p[:], prev)
	sum := crc32.Update(crc32.Checksum(p[:], castagnoli), castagnoli, b[start:])
	return le.AppendUint32(b, sum), sum
}

// entry is a journal entry that checked out.
type entry struct {
	kind    uint16
	epoch   uint64
	payload []byte
}

// readJournal reads the valid entries at the start of journal content b
// (of a disk of size bytes) and returns them and why it stopped reading
// ("" at the end of b).
func readJournal(b []byte, size uint64) ([]entry, string) {
	var out []entry
	var prev uint32
	lastWrites := uint64(0)
	for off := 0; off < len(b); {
		rest := b[off:]
		if len(rest) < journalHeaderSize+journalSumSize {
			return out, fmt.Sprintf("%d bytes at %d, too short for an entry", len(rest), off)
		}
		kind, epoch, plen := le.Uint16(rest[6:]), le.Uint64(rest[8:]), le.Uint64(rest[24:])
		switch {
		case [4]byte(rest[0:4]) != journalMagic:
			return out, fmt.Sprintf("bad magic at %d", off)
		case le.Uint16(rest[4:]) != journalVersion:
			return out, fmt.Sprintf("version %d at %d", le.Uint16(rest[4:]), off)
		case kind != kindWrites && kind != kindCommit:
			return out, fmt.Sprintf("entry kind %d at %d", kind, off)
		case le.Uint64(rest[16:]) != size:
			return out, fmt.Sprintf("entry at %d is for a disk of %d bytes, not %d", off, le.Uint64(rest[16:]), size)
		case plen > maxJournalPayload || plen > uint64(len(rest)-journalHeaderSize-journalSumSize):
			return out, fmt.Sprintf("entry at %d announces %d payload bytes, %d are there", off, plen, len(rest)-journalHeaderSize-journalSumSize)
		case kind == kindCommit && plen != 0:
			return out, fmt.Sprintf("commit entry at %d has a payload", off)
		}
		n := journalHeaderSize + int(plen)
		var p [4]byte
		le.PutUint32(p[:], prev)
		sum := crc32.Update(crc32.Checksum(p[:], castagnoli), castagnoli, rest[:n])
		if got := le.Uint32(rest[n:]); got != sum {
			return out, fmt.Sprintf("entry at %d: sum %#08x, its content's %#08x", off, got, sum)
		}
		if kind == kindWrites {
			if epoch <= lastWrites {
				return out, fmt.Sprintf("entry at %d stages epoch %d after epoch %d", off, epoch, lastWrites)
			}
			lastWrites = epoch
		}
		out = append(out, entry{kind: kind, epoch: epoch, payload: rest[journalHeaderSize:n:n]})
		prev = sum
		off += n + journalSumSize
	}
	return out, ""
}

// committed returns, from a journal's valid entries, the epoch of the last
// commit entry and the writes entries before it with epochs in
// (after, epoch]; ok is false if there is no commit entry after after.
func committed(entries []entry, after uint64) (uint64, []entry, bool) {
	last := -1
	for i, e := range entries {
		if e.kind == kindCommit {
			last = i
		}
	}
	if last < 0 || entries[last].epoch <= after {
		return 0, nil, false
	}
	s := entries[last].epoch
	var ws []entry
	for _, e := range entries[:last] {
		if e.kind == kindWrites && e.epoch > after && e.epoch <= s {
			ws = append(ws, e)
		}
	}
	return s, ws, true
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
