package arch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// statsDescBlob encodes descs as KVM does: 16 fixed bytes and a
// nameSize-byte NUL-padded name each.
func statsDescBlob(nameSize int, descs ...StatDesc) []byte {
	var b []byte
	for _, d := range descs {
		p := make([]byte, statsDescFixed+nameSize)
		binary.LittleEndian.PutUint32(p, d.Flags)
		binary.LittleEndian.PutUint16(p[4:], uint16(d.Exponent))
		binary.LittleEndian.PutUint16(p[6:], d.Size)
		binary.LittleEndian.PutUint32(p[8:], d.Offset)
		binary.LittleEndian.PutUint32(p[12:], d.BucketSize)
		copy(p[16:], d.Name)
		b = append(b, p...)
	}
	return b
}

func statsHeaderBlob(h statsHeader) []byte {
	b := make([]byte, statsHeaderSize)
	for i, v := range []uint32{h.flags, h.nameSize, h.numDesc, h.idOffset, h.descOffset, h.dataOffset} {
		binary.LittleEndian.PutUint32(b[4*i:], v)
	}
	return b
}

// Real descriptors as a KVM VM stats fd reports them (flags: cumulative /
// instant, base-10 exponent, histogram sizes).
var goodDescs = []StatDesc{
	{Name: "remote_tlb_flush", Flags: 0, Size: 1, Offset: 0},
	{Name: "pages_4k", Flags: 1, Size: 1, Offset: 8},
	{Name: "halt_poll_success_ns", Flags: 0x20, Exponent: -9, Size: 1, Offset: 16},
	{Name: "halt_wait_hist", Flags: 0x52, Exponent: -9, Size: 32, Offset: 24, BucketSize: 0},
	{Name: "max_size", Flags: 3, Size: 4096, Offset: 1 << 20, BucketSize: 1000},
}

func TestParseStatsDescs(t *testing.T) {
	long := strings.Repeat("x", 48) // fills the name field, no NUL
	tests := []struct {
		name     string
		b        []byte
		n        uint32
		nameSize uint32
		want     []StatDesc
	}{
		{"kvm", statsDescBlob(48, goodDescs...), uint32(len(goodDescs)), 48, goodDescs},
		{"none", nil, 0, 48, []StatDesc{}},
		{"unterminated name", statsDescBlob(48, StatDesc{Name: long, Size: 1}), 1, 48, []StatDesc{{Name: long, Size: 1}}},
		{"1-byte names", statsDescBlob(1, StatDesc{Name: "a", Size: 2, Offset: 64}), 1, 1, []StatDesc{{Name: "a", Size: 2, Offset: 64}}},
		{"largest names", statsDescBlob(4096, StatDesc{Name: "n", Size: 1}), 1, 4096, []StatDesc{{Name: "n", Size: 1}}},
		// Trailing bytes beyond n descriptors are ignored.
		{"trailing", append(statsDescBlob(48, goodDescs[:2]...), 0xff, 0xff), 1, 48, goodDescs[:1]},
		// A NUL ends the name; bytes after it are padding.
		{"padding", func() []byte {
			b := statsDescBlob(8, StatDesc{Name: "ab", Size: 1})
			copy(b[16+3:], "junk")
			return b
		}(), 1, 8, []StatDesc{{Name: "ab", Size: 1}}},
	}
	for _, tt := range tests {
		got, err := ParseStatsDescs(tt.b, tt.n, tt.nameSize)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: ParseStatsDescs(%d bytes, %d, %d) = %+v, %v; want %+v, nil", tt.name, len(tt.b), tt.n, tt.nameSize, got, err, tt.want)
		}
	}
}

func TestParseStatsDescsErrors(t *testing.T) {
	good := statsDescBlob(48, goodDescs...)
	n := uint32(len(goodDescs))
	tests := []struct {
		name     string
		b        []byte
		n        uint32
		nameSize uint32
		want     string
	}{
		{"truncated", good[:len(good)-1], n, 48, "descriptor block of"},
		{"truncated fixed part", good[:10], 1, 48, "descriptor block of"},
		{"empty", nil, 1, 48, "descriptor block of"},
		{"name size 0", good, n, 0, "out of range"},
		{"name size too big", good, n, 4097, "out of range"},
		{"name size huge", good, n, 1 << 31, "out of range"},
		{"too many descs", good, 4097, 48, "out of range"},
		{"descs huge", good, 1 << 31, 48, "out of range"},
		{"zero size", statsDescBlob(48, goodDescs[0], StatDesc{Name: "empty", Size: 0, Offset: 8}), 2, 48, `"empty" has 0 values`},
		{"oversized", statsDescBlob(48, StatDesc{Name: "big", Size: 4097}), 1, 48, `"big" has 4097 values`},
		{"max u16 size", statsDescBlob(48, StatDesc{Name: "max", Size: 0xffff}), 1, 48, `"max" has 65535 values`},
		{"unaligned offset", statsDescBlob(48, goodDescs[0], StatDesc{Name: "odd", Size: 1, Offset: 12}), 2, 48, `"odd" at unaligned offset 12`},
		{"unaligned offset 1", statsDescBlob(48, StatDesc{Name: "one", Size: 1, Offset: 1}), 1, 48, "unaligned"},
	}
	for _, tt := range tests {
		got, err := ParseStatsDescs(tt.b, tt.n, tt.nameSize)
		if err == nil || !strings.Contains(err.Error(), tt.want) || got != nil {
			t.Errorf("%s: ParseStatsDescs(%d bytes, %d, %d) = %+v, %v; want nil, error containing %q", tt.name, len(tt.b), tt.n, tt.nameSize, got, err, tt.want)
		}
	}
}

func TestParseStatsHeader(t *testing.T) {
	tests := []struct {
		name string
		b    []byte
		want statsHeader
		err  string // "" for success
	}{
		{"kvm", statsHeaderBlob(statsHeader{0, 48, 40, 24, 72, 2632}), statsHeader{0, 48, 40, 24, 72, 2632}, ""},
		{"longer input", append(statsHeaderBlob(statsHeader{1, 4096, 4096, 1, 2, 3}), 9, 9, 9), statsHeader{1, 4096, 4096, 1, 2, 3}, ""},
		{"no descriptors", statsHeaderBlob(statsHeader{nameSize: 1}), statsHeader{nameSize: 1}, ""},
		{"truncated", statsHeaderBlob(statsHeader{0, 48, 40, 24, 72, 2632})[:23], statsHeader{}, "23 bytes, want 24"},
		{"empty", nil, statsHeader{}, "0 bytes, want 24"},
		{"zero name size", statsHeaderBlob(statsHeader{nameSize: 0, numDesc: 1}), statsHeader{}, "name size 0 out of range"},
		{"oversized name", statsHeaderBlob(statsHeader{nameSize: 4097, numDesc: 1}), statsHeader{}, "name size 4097 out of range"},
		{"huge name", statsHeaderBlob(statsHeader{nameSize: 0xffffffff}), statsHeader{}, "out of range"},
		{"too many descs", statsHeaderBlob(statsHeader{nameSize: 48, numDesc: 4097}), statsHeader{}, "4097 descriptors, at most 4096"},
	}
	for _, tt := range tests {
		got, err := parseStatsHeader(tt.b)
		switch {
		case tt.err == "" && (err != nil || got != tt.want):
			t.Errorf("%s: parseStatsHeader(% x) = %+v, %v; want %+v, nil", tt.name, tt.b, got, err, tt.want)
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("%s: parseStatsHeader(% x) = %+v, %v; want error containing %q", tt.name, tt.b, got, err, tt.err)
		}
	}
}

// writeStatsFile lays out a complete stats "fd" the way KVM does (header, id,
// descriptors, data) in a file, and opens it.
func writeStatsFile(t *testing.T, id string, nameSize int, descs []StatDesc, values []uint64) int {
	t.Helper()
	idOff := statsHeaderSize
	descOff := idOff + nameSize
	dataOff := descOff + len(descs)*(statsDescFixed+nameSize)
	var b bytes.Buffer
	b.Write(statsHeaderBlob(statsHeader{0, uint32(nameSize), uint32(len(descs)), uint32(idOff), uint32(descOff), uint32(dataOff)}))
	idb := make([]byte, nameSize)
	copy(idb, id)
	b.Write(idb)
	b.Write(statsDescBlob(nameSize, descs...))
	for _, v := range values {
		binary.Write(&b, binary.LittleEndian, v)
	}
	path := filepath.Join(t.TempDir(), "stats")
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

func TestStatsFromFile(t *testing.T) {
	descs := []StatDesc{
		{Name: "pages_4k", Flags: 1, Size: 1, Offset: 0},
		{Name: "hist", Size: 2, Offset: 8},
		{Name: "pages_2m", Flags: 1, Size: 1, Offset: 24},
	}
	fd := writeStatsFile(t, "kvm-1234", 48, descs, []uint64{512, 7, 8, 3})
	s, err := newStats(fd)
	if err != nil {
		t.Fatalf("newStats(file) = %v", err)
	}
	defer s.Close()
	if s.ID != "kvm-1234" {
		t.Errorf("newStats(file).ID = %q, want %q", s.ID, "kvm-1234")
	}
	if !reflect.DeepEqual(s.Descs, descs) {
		t.Errorf("newStats(file).Descs = %+v, want %+v", s.Descs, descs)
	}
	for _, tt := range []struct {
		name string
		want uint64
	}{{"pages_4k", 512}, {"hist", 7}, {"pages_2m", 3}} {
		if !s.Has(tt.name) {
			t.Errorf("Has(%q) = false, want true", tt.name)
		}
		if got, err := s.Value(tt.name); err != nil || got != tt.want {
			t.Errorf("Value(%q) = %d, %v; want %d, nil", tt.name, got, err, tt.want)
		}
	}
	if s.Has("pages_1g") {
		t.Errorf("Has(%q) = true, want false", "pages_1g")
	}
	if got, err := s.Value("pages_1g"); err == nil || !strings.Contains(err.Error(), `"pages_1g"`) {
		t.Errorf("Value(%q) = %d, %v; want an error naming it", "pages_1g", got, err)
	}
}

func TestStatsShortData(t *testing.T) {
	// The second statistic's value lies past the end of the data: reading
	// it must fail, not return zero.
	descs := []StatDesc{{Name: "ok", Size: 1, Offset: 0}, {Name: "beyond", Size: 1, Offset: 64}}
	fd := writeStatsFile(t, "short", 16, descs, []uint64{42})
	s, err := newStats(fd)
	if err != nil {
		t.Fatalf("newStats(file) = %v", err)
	}
	defer s.Close()
	if got, err := s.Value("ok"); err != nil || got != 42 {
		t.Errorf("Value(%q) = %d, %v; want 42, nil", "ok", got, err)
	}
	if got, err := s.Value("beyond"); err == nil || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("Value(%q) past the data = %d, %v; want io.ErrUnexpectedEOF", "beyond", got, err)
	}
}

func TestStatsFromBadFile(t *testing.T) {
	// A descriptor with zero values is rejected, and newStats closes the fd.
	fd := writeStatsFile(t, "bad", 16, []StatDesc{{Name: "zero", Size: 0}}, []uint64{1})
	if s, err := newStats(fd); err == nil {
		s.Close()
		t.Fatalf("newStats(descriptor of size 0) = nil error, want one")
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
		unix.Close(fd)
		t.Errorf("fd after a failed newStats: fcntl = %v, want EBADF (closed)", err)
	}
}

// FuzzParseStatsDescs checks that arbitrary descriptor blocks never panic
// and that accepted ones satisfy the documented bounds.
func FuzzParseStatsDescs(f *testing.F) {
	f.Add(statsDescBlob(48, goodDescs...), uint32(len(goodDescs)), uint32(48))
	f.Add(statsDescBlob(1, StatDesc{Name: "a", Size: 1}), uint32(1), uint32(1))
	f.Add([]byte{}, uint32(0), uint32(48))
	f.Add(statsDescBlob(8, StatDesc{Name: "x", Size: 0}), uint32(1), uint32(8))
	f.Fuzz(func(t *testing.T, b []byte, n, nameSize uint32) {
		descs, err := ParseStatsDescs(b, n, nameSize)
		if err != nil {
			if descs != nil {
				t.Fatalf("ParseStatsDescs = %+v with error %v, want nil", descs, err)
			}
			return
		}
		if nameSize == 0 || nameSize > maxStatsName || n > maxStatsDescs {
			t.Fatalf("ParseStatsDescs(_, %d, %d) accepted out-of-range sizes", n, nameSize)
		}
		if uint64(len(b)) < uint64(n)*uint64(statsDescFixed+nameSize) {
			t.Fatalf("ParseStatsDescs(%d bytes, %d, %d) accepted a truncated block", len(b), n, nameSize)
		}
		if len(descs) != int(n) {
			t.Fatalf("ParseStatsDescs(_, %d, %d) = %d descriptors, want %d", n, nameSize, len(descs), n)
		}
		for _, d := range descs {
			if d.Size == 0 || d.Size > maxStatsValues || d.Offset%8 != 0 {
				t.Fatalf("ParseStatsDescs accepted %+v", d)
			}
			if len(d.Name) > int(nameSize) || strings.IndexByte(d.Name, 0) >= 0 {
				t.Fatalf("ParseStatsDescs name %q: longer than %d bytes or contains NUL", d.Name, nameSize)
			}
		}
	})
}

// FuzzParseStatsHeader checks that arbitrary headers never panic and that
// accepted ones are in range and decoded little-endian.
func FuzzParseStatsHeader(f *testing.F) {
	f.Add(statsHeaderBlob(statsHeader{0, 48, 40, 24, 72, 2632}))
	f.Add(statsHeaderBlob(statsHeader{nameSize: 4097}))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseStatsHeader(b)
		if err != nil {
			return
		}
		if len(b) < statsHeaderSize {
			t.Fatalf("parseStatsHeader accepted %d bytes", len(b))
		}
		if h.nameSize == 0 || h.nameSize > maxStatsName || h.numDesc > maxStatsDescs {
			t.Fatalf("parseStatsHeader accepted %+v", h)
		}
		if want := statsHeaderBlob(h); !bytes.Equal(want, b[:statsHeaderSize]) {
			t.Fatalf("parseStatsHeader(% x) = %+v, which encodes as % x", b[:statsHeaderSize], h, want)
		}
	})
}
