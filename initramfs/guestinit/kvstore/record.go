package kvstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Sizes of the disk format and of the protocol's fields.
const (
	RecordSize = 512 // bytes per log slot
	MaxKey     = 64  // bytes of a key
	MaxValue   = 416 // bytes of a value
)

// Record layout, offsets in bytes.
const (
	offMagic  = 0   // 4 bytes, recordMagic
	offKind   = 4   // 4 bytes, kindHeader or kindPut
	offLogID  = 8   // 8 bytes
	offSeq    = 16  // 8 bytes: 0 for the header, the slot index for a PUT
	offKeyLen = 24  // 2 bytes
	offValLen = 26  // 2 bytes
	offKey    = 28  // MaxKey bytes, zero past the key
	offValue  = 92  // MaxValue bytes, zero past the value
	offCRC    = 508 // 4 bytes: CRC-32C of bytes [0, offCRC)
)

const recordMagic = "UKVR"

// Kinds of record.
const (
	kindHeader uint32 = 1
	kindPut    uint32 = 2
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Record is one decoded log slot: the header (Kind == kindHeader, Seq 0, no
// key or value) or a PUT.
type Record struct {
	Kind  uint32
	LogID uint64
	Seq   uint64
	Key   string
	Value string
}

// Errors of DecodeRecord. ErrEmpty and ErrNotRecord are the ordinary end of
// a log (a slot never written, or holding something else); the others say a
// slot looks like a record but is damaged.
var (
	ErrEmpty     = errors.New("empty slot")
	ErrNotRecord = errors.New("not a record")
	ErrChecksum  = errors.New("record checksum mismatch")
	ErrMalformed = errors.New("malformed record")
)

// ValidToken reports whether s is a valid key (max MaxKey) or value (max
// MaxValue): 1..max bytes, each printable ASCII other than space.
func ValidToken(s string, max int) bool {
	if len(s) == 0 || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// EncodeRecord writes r into b, which must be RecordSize bytes. It refuses
// a record DecodeRecord would not accept.
func EncodeRecord(b []byte, r Record) error {
	if len(b) != RecordSize {
		return fmt.Errorf("encode record: buffer of %d bytes, want %d", len(b), RecordSize)
	}
	switch r.Kind {
	case kindHeader:
		if r.Seq != 0 || r.Key != "" || r.Value != "" {
			return fmt.Errorf("encode record: a header has no sequence, key or value")
		}
	case kindPut:
		if r.Seq == 0 || !ValidToken(r.Key, MaxKey) || !ValidToken(r.Value, MaxValue) {
			return fmt.Errorf("encode record: PUT seq=%d with an invalid key or value", r.Seq)
		}
	default:
		return fmt.Errorf("encode record: kind %d", r.Kind)
	}
	clear(b)
	copy(b[offMagic:], recordMagic)
	binary.LittleEndian.PutUint32(b[offKind:], r.Kind)
	binary.LittleEndian.PutUint64(b[offLogID:], r.LogID)
	binary.LittleEndian.PutUint64(b[offSeq:], r.Seq)
	binary.LittleEndian.PutUint16(b[offKeyLen:], uint16(len(r.Key)))
	binary.LittleEndian.PutUint16(b[offValLen:], uint16(len(r.Value)))
	copy(b[offKey:offValue], r.Key)
	copy(b[offValue:offCRC], r.Value)
	binary.LittleEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
	return nil
}

// DecodeRecord reads one RecordSize-byte slot. Bytes read from the device
// are untrusted: every field is checked, and the bytes past the key and the
// value must be zero, so that a slot decodes only if EncodeRecord produced
// exactly it.
func DecodeRecord(b []byte) (Record, error) {
	if len(b) != RecordSize {
		return Record{}, fmt.Errorf("%w: %d bytes, want %d", ErrMalformed, len(b), RecordSize)
	}
	if string(b[offMagic:offMagic+4]) != recordMagic {
		for _, c := range b {
			if c != 0 {
				return Record{}, ErrNotRecord
			}
		}
		return Record{}, ErrEmpty
	}
	if got, want := binary.LittleEndian.Uint32(b[offCRC:]), crc32.Checksum(b[:offCRC], castagnoli); got != want {
		return Record{}, fmt.Errorf("%w: stored %#08x, computed %#08x", ErrChecksum, got, want)
	}
	r := Record{
		Kind:  binary.LittleEndian.Uint32(b[offKind:]),
		LogID: binary.LittleEndian.Uint64(b[offLogID:]),
		Seq:   binary.LittleEndian.Uint64(b[offSeq:]),
	}
	kl := int(binary.LittleEndian.Uint16(b[offKeyLen:]))
	vl := int(binary.LittleEndian.Uint16(b[offValLen:]))
	if kl > MaxKey || vl > MaxValue {
		return Record{}, fmt.Errorf("%w: key of %d or value of %d bytes", ErrMalformed, kl, vl)
	}
	for _, c := range b[offKey+kl : offValue] {
		if c != 0 {
			return Record{}, fmt.Errorf("%w: bytes after the key", ErrMalformed)
		}
	}
	for _, c := range b[offValue+vl : offCRC] {
		if c != 0 {
			return Record{}, fmt.Errorf("%w: bytes after the value", ErrMalformed)
		}
	}
	r.Key = string(b[offKey : offKey+kl])
	r.Value = string(b[offValue : offValue+vl])
	switch r.Kind {
	case kindHeader:
		if r.Seq != 0 || kl != 0 || vl != 0 {
			return Record{}, fmt.Errorf("%w: header with a sequence, key or value", ErrMalformed)
		}
	case kindPut:
		if r.Seq == 0 || !ValidToken(r.Key, MaxKey) || !ValidToken(r.Value, MaxValue) {
			return Record{}, fmt.Errorf("%w: PUT seq=%d with an invalid key or value", ErrMalformed, r.Seq)
		}
	default:
		return Record{}, fmt.Errorf("%w: kind %d", ErrMalformed, r.Kind)
	}
	return r, nil
}
