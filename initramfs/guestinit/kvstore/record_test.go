package kvstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"strings"
	"testing"
)

func encode(t testing.TB, r Record) []byte {
	t.Helper()
	b := make([]byte, RecordSize)
	if err := EncodeRecord(b, r); err != nil {
		t.Fatal(err)
	}
	return b
}

// reseal recomputes a record's checksum after a test changed it.
func reseal(b []byte) {
	binary.LittleEndian.PutUint32(b[offCRC:], crc32.Checksum(b[:offCRC], castagnoli))
}

func TestRecordRoundTrip(t *testing.T) {
	for _, r := range []Record{
		{Kind: kindHeader, LogID: 0x1122334455667788},
		{Kind: kindPut, LogID: 7, Seq: 1, Key: "k", Value: "v"},
		{Kind: kindPut, LogID: 7, Seq: 1 << 40, Key: strings.Repeat("K", MaxKey), Value: strings.Repeat("~", MaxValue)},
	} {
		b := encode(t, r)
		got, err := DecodeRecord(b)
		if err != nil || got != r {
			t.Errorf("DecodeRecord(EncodeRecord(%+v)) = %+v, %v", r, got, err)
		}
	}
}

func TestEncodeRecordRefuses(t *testing.T) {
	for _, r := range []Record{
		{Kind: kindHeader, Seq: 1},
		{Kind: kindHeader, Key: "k"},
		{Kind: kindPut, Key: "k", Value: "v"}, // seq 0
		{Kind: kindPut, Seq: 1, Key: "", Value: "v"},
		{Kind: kindPut, Seq: 1, Key: "k", Value: "a b"},
		{Kind: kindPut, Seq: 1, Key: strings.Repeat("K", MaxKey+1), Value: "v"},
		{Kind: kindPut, Seq: 1, Key: "k", Value: strings.Repeat("v", MaxValue+1)},
		{Kind: 3, Seq: 1, Key: "k", Value: "v"},
	} {
		if err := EncodeRecord(make([]byte, RecordSize), r); err == nil {
			t.Errorf("EncodeRecord(%+v) succeeded", r)
		}
	}
	if err := EncodeRecord(make([]byte, RecordSize-1), Record{Kind: kindHeader}); err == nil {
		t.Error("EncodeRecord into a short buffer succeeded")
	}
}

func TestDecodeRecordErrors(t *testing.T) {
	good := encode(t, Record{Kind: kindPut, LogID: 9, Seq: 3, Key: "key", Value: "value"})
	mod := func(f func(b []byte), resealed bool) []byte {
		b := bytes.Clone(good)
		f(b)
		if resealed {
			reseal(b)
		}
		return b
	}
	for _, tt := range []struct {
		name string
		b    []byte
		want error
	}{
		{"zeros", make([]byte, RecordSize), ErrEmpty},
		{"text", mod(func(b []byte) { copy(b, "hello") }, false), ErrNotRecord},
		{"junk at the end", mod(func(b []byte) { clear(b); b[RecordSize-1] = 1 }, false), ErrNotRecord},
		{"short", good[:RecordSize-1], ErrMalformed},
		{"bit flip in the value", mod(func(b []byte) { b[offValue] ^= 1 }, false), ErrChecksum},
		{"bit flip in the checksum", mod(func(b []byte) { b[offCRC] ^= 1 }, false), ErrChecksum},
		{"key too long", mod(func(b []byte) { binary.LittleEndian.PutUint16(b[offKeyLen:], MaxKey+1) }, true), ErrMalformed},
		{"value too long", mod(func(b []byte) { binary.LittleEndian.PutUint16(b[offValLen:], MaxValue+1) }, true), ErrMalformed},
		{"bytes after the key", mod(func(b []byte) { b[offKey+10] = 'x' }, true), ErrMalformed},
		{"bytes after the value", mod(func(b []byte) { b[offCRC-1] = 'x' }, true), ErrMalformed},
		{"empty key", mod(func(b []byte) { binary.LittleEndian.PutUint16(b[offKeyLen:], 0); clear(b[offKey:offValue]) }, true), ErrMalformed},
		{"space in the value", mod(func(b []byte) { b[offValue+1] = ' ' }, true), ErrMalformed},
		{"seq 0", mod(func(b []byte) { binary.LittleEndian.PutUint64(b[offSeq:], 0) }, true), ErrMalformed},
		{"unknown kind", mod(func(b []byte) { binary.LittleEndian.PutUint32(b[offKind:], 7) }, true), ErrMalformed},
		{"header with a key", mod(func(b []byte) {
			binary.LittleEndian.PutUint32(b[offKind:], kindHeader)
			binary.LittleEndian.PutUint64(b[offSeq:], 0)
		}, true), ErrMalformed},
	} {
		if _, err := DecodeRecord(tt.b); !errors.Is(err, tt.want) {
			t.Errorf("DecodeRecord(%s) = %v, want %v", tt.name, err, tt.want)
		}
	}
}

// FuzzDecodeRecord feeds DecodeRecord arbitrary slots: it must never panic,
// must fail with one of its four errors, and must accept only what
// EncodeRecord produces byte for byte.
func FuzzDecodeRecord(f *testing.F) {
	f.Add(make([]byte, RecordSize))
	f.Add(encode(f, Record{Kind: kindHeader, LogID: 42}))
	f.Add(encode(f, Record{Kind: kindPut, LogID: 42, Seq: 1, Key: "key", Value: "value"}))
	f.Add(encode(f, Record{Kind: kindPut, LogID: 42, Seq: 99, Key: strings.Repeat("k", MaxKey), Value: strings.Repeat("v", MaxValue)}))
	f.Add([]byte(recordMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Most inputs fail the checksum; reseal half of the full-size ones
		// so that the field checks behind it are fuzzed too.
		if len(b) == RecordSize && len(b) > 0 && b[0]&1 == 0 {
			copy(b, recordMagic)
			reseal(b)
		}
		r, err := DecodeRecord(b)
		if err != nil {
			if !errors.Is(err, ErrEmpty) && !errors.Is(err, ErrNotRecord) && !errors.Is(err, ErrChecksum) && !errors.Is(err, ErrMalformed) {
				t.Fatalf("DecodeRecord: error %v of no known kind", err)
			}
			return
		}
		out := make([]byte, RecordSize)
		if err := EncodeRecord(out, r); err != nil {
			t.Fatalf("DecodeRecord accepted %+v, which EncodeRecord refuses: %v", r, err)
		}
		if !bytes.Equal(out, b) {
			t.Fatalf("DecodeRecord accepted a slot that EncodeRecord(%+v) does not produce", r)
		}
	})
}
