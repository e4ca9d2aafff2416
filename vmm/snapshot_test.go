package vmm

import (
	"bytes"
	"errors"
	"hash/crc32"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/mmu"
)

// testSnapshot returns a snapshot of testState(2) with 8 MiB of patterned
// memory, and that memory's bytes.
func testSnapshot(t *testing.T) (snap, mem []byte) {
	t.Helper()
	m, err := mmu.New(mmu.Config{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	b := m.Backing()
	for i := 0; i < len(b); i += 4096 {
		b[i], b[i+4095] = byte(i>>12), 0xa5
	}
	var buf bytes.Buffer
	if err := WriteSnapshot(&buf, testState(2), m); err != nil {
		t.Fatalf("WriteSnapshot() = %v", err)
	}
	return buf.Bytes(), bytes.Clone(b)
}

func TestSnapshotRoundTrip(t *testing.T) {
	snap, mem := testSnapshot(t)
	st, r, err := ReadSnapshot(bytes.NewReader(snap))
	if err != nil {
		t.Fatalf("ReadSnapshot() = %v", err)
	}
	if !reflect.DeepEqual(st, testState(2)) {
		t.Errorf("ReadSnapshot() state = %+v, want %+v", st, testState(2))
	}
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, mem) {
		t.Errorf("ReadSnapshot() memory = %d bytes, %v; want the %d bytes written", len(got), err, len(mem))
	}
	// The state must match the memory it is written with.
	small, err := mmu.New(mmu.Config{Size: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if err := WriteSnapshot(io.Discard, testState(1), small); err == nil || !strings.Contains(err.Error(), "4 MiB of memory for a state with 8 MiB") {
		t.Errorf("WriteSnapshot(8 MiB state, 4 MiB memory) = %v, want a size mismatch", err)
	}
}

// readWholeSnapshot reads a snapshot to its end, as restoring does.
func readWholeSnapshot(b []byte) error {
	_, r, err := ReadSnapshot(bytes.NewReader(b))
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, r)
	return err
}

func TestSnapshotCorrupt(t *testing.T) {
	snap, _ := testSnapshot(t)
	stateLen := int(le.Uint64(snap[16:]))
	memStart := snapshotHeaderSize + stateLen
	flip := func(off int) []byte {
		b := bytes.Clone(snap)
		b[off] ^= 0x40
		return b
	}
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "empty, not an Understudy snapshot"},
		{"tiny", []byte("US"), "2 bytes, not an Understudy snapshot"},
		{"foreign", []byte("#!/bin/sh\necho hello, this is not a snapshot at all\n"), `not an Understudy snapshot (starts with "#!/bin/s")`},
		{"header truncated", snap[:20], "header is 20 of 40 bytes"},
		{"header corrupt", flip(17), "corrupt header"},
		{"state truncated", snap[:snapshotHeaderSize+100], "machine state is 100 of"},
		{"state corrupt", flip(snapshotHeaderSize + 200), "corrupt machine state"},
		{"memory truncated", snap[:memStart+1000], "memory image is 1000 of 8388608 bytes"},
		{"memory corrupt", flip(memStart + 5<<20), "corrupt memory image"},
		{"trailer truncated", snap[:len(snap)-3], "trailer is 5 of 8 bytes"},
		{"end marker", flip(len(snap) - 1), "no end marker"},
		{"data after the end", append(bytes.Clone(snap), 'x'), "data after the end marker"},
	}
	for _, tc := range tests {
		err := readWholeSnapshot(tc.in)
		if !errors.Is(err, ErrBadSnapshot) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: reading the snapshot = %v, want ErrBadSnapshot and %q", tc.name, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: error %q is not one line", tc.name, err)
		}
	}
	// A header with valid CRCs but a state that does not decode, and one
	// whose memory length disagrees with the state.
	for _, tc := range []struct {
		name string
		edit func(hdr []byte)
		want string
	}{
		{"version", func(h []byte) { le.PutUint32(h[8:], 9) }, "version 9"},
		{"state too large", func(h []byte) { le.PutUint64(h[16:], MaxStateSize+1) }, "machine state of"},
		{"memory length", func(h []byte) { le.PutUint64(h[24:], 4<<20) }, "header says 4194304 bytes of memory, the machine state 8388608"},
	} {
		b := bytes.Clone(snap)
		tc.edit(b)
		le.PutUint32(b[36:], crc32.Checksum(b[:36], castagnoli))
		if err := readWholeSnapshot(b); !errors.Is(err, ErrBadSnapshot) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: reading the snapshot = %v, want ErrBadSnapshot and %q", tc.name, err, tc.want)
		}
	}
}
