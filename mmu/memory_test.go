package mmu

import (
	"bytes"
	"errors"
	"fmt"
	"math/bits"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
	"golang.org/x/sys/unix"
)

const (
	mib = 1 << 20
	gib = 1 << 30
)

// newMemory allocates guest memory that is closed when the test ends.
func newMemory(t testing.TB, cfg Config) *Memory {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v) = %v", cfg, err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestNewErrors(t *testing.T) {
	for _, size := range []uint64{0, 4096, 1 * mib, 3 * mib, 2*mib + 4096, 4*gib + 1} {
		for _, b := range []Backing{Anonymous, Memfd} {
			cfg := Config{Size: size, Backing: b}
			m, err := New(cfg)
			if err == nil {
				m.Close()
				t.Errorf("New(%+v) = nil error, want one", cfg)
			} else if !strings.Contains(err.Error(), "multiple of 2 MiB") {
				t.Errorf("New(%+v) = %v, want an error about multiples of 2 MiB", cfg, err)
			}
		}
	}
}

func TestNew(t *testing.T) {
	tests := []Config{
		{Size: 2 * mib},
		{Size: 6 * mib},
		{Size: 2 * mib, Backing: Memfd},
		{Size: 10 * mib, Backing: Memfd},
		{Size: 4 * mib, THP: true},
	}
	for _, cfg := range tests {
		m := newMemory(t, cfg)
		b := m.Backing()
		if uint64(len(b)) != cfg.Size || m.Size() != cfg.Size {
			t.Errorf("New(%+v): len(Backing()) = %d, Size() = %d; want %d", cfg, len(b), m.Size(), cfg.Size)
		}
		if addr := arch.SliceAddr(b); addr%RegionSize != 0 {
			t.Errorf("New(%+v): backing at %#x, want 2 MiB aligned", cfg, addr)
		}
		if (m.FD() >= 0) != (cfg.Backing == Memfd) {
			t.Errorf("New(%+v).FD() = %d, want >= 0 only for memfd", cfg, m.FD())
		}
		want := []Region{{GPA: 0, Size: cfg.Size}}
		if got := m.Regions(); !reflect.DeepEqual(got, want) {
			t.Errorf("New(%+v).Regions() = %+v, want %+v", cfg, got, want)
		}
		// Fresh memory is zero, and every page is writable.
		for off := uint64(0); off < cfg.Size; off += PageSize {
			if b[off] != 0 {
				t.Fatalf("New(%+v): byte %#x = %#x, want 0", cfg, off, b[off])
			}
			b[off] = byte(off >> 12)
		}
	}
}

func TestBackingString(t *testing.T) {
	for b, want := range map[Backing]string{Anonymous: "anonymous", Memfd: "memfd"} {
		if got := b.String(); got != want {
			t.Errorf("Backing(%d).String() = %q, want %q", int(b), got, want)
		}
	}
}

func TestMemfdSharesContent(t *testing.T) {
	m := newMemory(t, Config{Size: 4 * mib, Backing: Memfd})
	fd := m.FD()
	// Written through the mapping, read through the fd.
	if err := m.Write(0x1ff_ff0, []byte("across a region boundary")); err != nil {
		t.Fatal(err)
	}
	copy(m.Backing()[4*mib-5:], "tail!")
	got := make([]byte, 4*mib)
	if n, err := unix.Pread(fd, got, 0); err != nil || n != len(got) {
		t.Fatalf("pread(memfd, %d bytes) = %d, %v", len(got), n, err)
	}
	if !bytes.Equal(got, m.Backing()) {
		t.Errorf("memfd content differs from the mapping")
	}
	// Written through the fd, read through the mapping.
	if _, err := unix.Pwrite(fd, []byte("from the fd"), 3*mib); err != nil {
		t.Fatal(err)
	}
	var buf [11]byte
	if err := m.Read(3*mib, buf[:]); err != nil || string(buf[:]) != "from the fd" {
		t.Errorf("Read(3 MiB) after pwrite = %q, %v; want %q", buf[:], err, "from the fd")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size != 4*mib {
		t.Errorf("fstat(memfd).Size = %d, %v; want %d", st.Size, err, 4*mib)
	}
}

func TestClose(t *testing.T) {
	for _, b := range []Backing{Anonymous, Memfd} {
		m, err := New(Config{Size: 2 * mib, Backing: b})
		if err != nil {
			t.Fatal(err)
		}
		fd := m.FD()
		if err := m.Close(); err != nil {
			t.Errorf("Close(%v) = %v", b, err)
		}
		if m.FD() != -1 || m.Backing() != nil {
			t.Errorf("after Close(%v): FD() = %d, Backing() has %d bytes; want -1, none", b, m.FD(), len(m.Backing()))
		}
		if fd >= 0 {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
				t.Errorf("memfd after Close: fcntl = %v, want EBADF", err)
			}
		}
	}
}

func TestLayout(t *testing.T) {
	tests := []struct {
		size uint64
		want []Region
	}{
		{2 * mib, []Region{{GPA: 0, Size: 2 * mib}}},
		{1 * gib, []Region{{GPA: 0, Size: 1 * gib}}},
		{3 * gib, []Region{{GPA: 0, Size: 3 * gib}}},
		{3*gib + 2*mib, []Region{{GPA: 0, Size: 3 * gib}, {GPA: 4 * gib, Size: 2 * mib, Offset: 3 * gib, Slot: 1}}},
		{4 * gib, []Region{{GPA: 0, Size: 3 * gib}, {GPA: 4 * gib, Size: 1 * gib, Offset: 3 * gib, Slot: 1}}},
		{16 * gib, []Region{{GPA: 0, Size: 3 * gib}, {GPA: 4 * gib, Size: 13 * gib, Offset: 3 * gib, Slot: 1}}},
	}
	for _, tt := range tests {
		if got := Layout(tt.size); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("Layout(%#x) = %+v, want %+v", tt.size, got, tt.want)
		}
	}
	// New lays out real memory the same way. MAP_NORESERVE makes 4 GiB
	// cheap as long as the test touches only a few pages.
	m := newMemory(t, Config{Size: 4 * gib})
	want := Layout(4 * gib)
	got := m.Regions()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("New(4 GiB).Regions() = %+v, want %+v", got, want)
	}
	// Regions returns a copy.
	got[1].GPA = 0
	if m.Regions()[1].GPA != 4*gib {
		t.Errorf("Regions() returned the Memory's own slice")
	}
}

// TestAccessBounds exercises Offset, Slice, Read, Write, Uint64, PutUint64
// and MarkDirty on a 4 GiB memory: [0, 3G) at offset 0, the hole [3G, 4G),
// and [4G, 5G) at offset 3G.
func TestAccessBounds(t *testing.T) {
	m := newMemory(t, Config{Size: 4 * gib})
	const bad = ^uint64(0)
	tests := []struct {
		gpa, n uint64
		off    uint64 // bad: out of range
	}{
		{0, 8, 0},
		{0, 0, 0},
		{0x1234, 100, 0x1234},
		{3*gib - 8, 8, 3*gib - 8},
		{3*gib - 1, 1, 3*gib - 1},
		{3*gib - 8, 0, 3*gib - 8},
		{3*gib - 4, 8, bad}, // crosses the end of the low region
		{3*gib - 8, 9, bad},
		{3 * gib, 1, bad}, // the hole
		{3 * gib, 0, bad}, // zero bytes in the hole are still not RAM
		{4*gib - 1, 1, bad},
		{3*gib - 8, gib, bad}, // would end inside the high region
		{4 * gib, 8, 3 * gib},
		{4*gib + 0x5000, 0, 3*gib + 0x5000},
		{5*gib - 8, 8, 4*gib - 8},
		{5*gib - 4, 8, bad}, // crosses the end of RAM
		{5 * gib, 1, bad},   // past the end
		{5 * gib, 0, bad},
		{1 << 52, 8, bad},
		{bad - 7, 8, bad},
		{0, 1 << 63, bad},
		{8, bad, bad},
		{4 * gib, bad, bad},
	}
	for _, tt := range tests {
		got, err := m.Offset(tt.gpa, tt.n)
		if tt.off == bad {
			if err == nil || !errors.Is(err, ErrOutOfRange) {
				t.Errorf("Offset(%#x, %#x) = %#x, %v; want ErrOutOfRange", tt.gpa, tt.n, got, err)
			}
			if s, err := m.Slice(tt.gpa, tt.n); !errors.Is(err, ErrOutOfRange) || s != nil {
				t.Errorf("Slice(%#x, %#x) = %d bytes, %v; want nil, ErrOutOfRange", tt.gpa, tt.n, len(s), err)
			}
			if err := m.MarkDirty(tt.gpa, tt.n); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("MarkDirty(%#x, %#x) = %v, want ErrOutOfRange", tt.gpa, tt.n, err)
			}
			if tt.n <= 64 {
				if err := m.Read(tt.gpa, make([]byte, tt.n)); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("Read(%#x, %d bytes) = %v, want ErrOutOfRange", tt.gpa, tt.n, err)
				}
				if err := m.Write(tt.gpa, make([]byte, tt.n)); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("Write(%#x, %d bytes) = %v, want ErrOutOfRange", tt.gpa, tt.n, err)
				}
			}
			if tt.n == 8 {
				if v, err := m.Uint64(tt.gpa); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("Uint64(%#x) = %#x, %v; want ErrOutOfRange", tt.gpa, v, err)
				}
				if err := m.PutUint64(tt.gpa, 1); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("PutUint64(%#x) = %v, want ErrOutOfRange", tt.gpa, err)
				}
			}
			continue
		}
		if err != nil || got != tt.off {
			t.Errorf("Offset(%#x, %#x) = %#x, %v; want %#x, nil", tt.gpa, tt.n, got, err, tt.off)
			continue
		}
		s, err := m.Slice(tt.gpa, tt.n)
		if err != nil || uint64(len(s)) != tt.n || uint64(cap(s)) != tt.n {
			t.Errorf("Slice(%#x, %#x) = len %d cap %d, %v; want len and cap %d", tt.gpa, tt.n, len(s), cap(s), err, tt.n)
			continue
		}
		if tt.n == 0 {
			if err := m.Write(tt.gpa, nil); err != nil {
				t.Errorf("Write(%#x, nil) = %v", tt.gpa, err)
			}
			if err := m.Read(tt.gpa, nil); err != nil {
				t.Errorf("Read(%#x, nil) = %v", tt.gpa, err)
			}
			continue
		}
		// Each access goes to the right place in the backing.
		p := make([]byte, tt.n)
		for i := range p {
			p[i] = byte(tt.gpa>>12) + byte(i) + 1
		}
		if err := m.Write(tt.gpa, p); err != nil {
			t.Errorf("Write(%#x, %d bytes) = %v", tt.gpa, len(p), err)
			continue
		}
		if b := m.Backing()[tt.off : tt.off+tt.n]; !bytes.Equal(b, p) {
			t.Errorf("after Write(%#x, % x): backing at %#x = % x", tt.gpa, p, tt.off, b)
		}
		if !bytes.Equal(s, p) {
			t.Errorf("Slice(%#x, %d) after Write = % x, want % x", tt.gpa, tt.n, s, p)
		}
		q := make([]byte, tt.n)
		if err := m.Read(tt.gpa, q); err != nil || !bytes.Equal(q, p) {
			t.Errorf("Read(%#x, %d bytes) = % x, %v; want % x", tt.gpa, tt.n, q, err, p)
		}
		if tt.n == 8 {
			const v = 0x0123_4567_89ab_cdef
			if err := m.PutUint64(tt.gpa, v); err != nil {
				t.Errorf("PutUint64(%#x) = %v", tt.gpa, err)
			}
			if got, err := m.Uint64(tt.gpa); err != nil || got != v {
				t.Errorf("Uint64(%#x) = %#x, %v; want %#x", tt.gpa, got, err, uint64(v))
			}
			// Little-endian in the backing.
			if b := m.Backing()[tt.off]; b != 0xef {
				t.Errorf("PutUint64(%#x): first byte = %#x, want 0xef", tt.gpa, b)
			}
		}
	}
	// Error messages name the address.
	_, err := m.Offset(3*gib+0x10, 1)
	if err == nil || !strings.Contains(err.Error(), "0xc0000010") {
		t.Errorf("Offset(3 GiB + 0x10, 1) = %v, want an error naming 0xc0000010", err)
	}
}

// dirtyPages returns the page numbers set in a bitmap.
func dirtyPages(bm []uint64) []uint64 {
	var pages []uint64
	for i, w := range bm {
		for w != 0 {
			b := uint64(bits.TrailingZeros64(w))
			pages = append(pages, uint64(i)*64+b)
			w &^= 1 << b
		}
	}
	return pages
}

func TestVMMDirty(t *testing.T) {
	m := newMemory(t, Config{Size: 8 * mib})
	words := (8*mib/PageSize + 63) / 64
	tests := []struct {
		name  string
		do    func() error
		pages []uint64 // dirty afterwards
	}{
		{"Write 1 byte", func() error { return m.Write(0x1000, []byte{1}) }, []uint64{1}},
		{"Write last byte of a page", func() error { return m.Write(0x1fff, []byte{1}) }, []uint64{1}},
		{"Write across a page boundary", func() error { return m.Write(0x1fff, []byte{1, 2}) }, []uint64{1, 2}},
		{"Write 3 pages", func() error { return m.Write(0x5000, make([]byte, 3*PageSize)) }, []uint64{5, 6, 7}},
		{"Write spanning 3 pages", func() error { return m.Write(0x5fff, make([]byte, PageSize+2)) }, []uint64{5, 6, 7}},
		{"Write nothing", func() error { return m.Write(0x9000, nil) }, nil},
		{"PutUint64", func() error { return m.PutUint64(0x3000, 1) }, []uint64{3}},
		{"PutUint64 across pages", func() error { return m.PutUint64(0x3ffc, 1) }, []uint64{3, 4}},
		{"MarkDirty", func() error { return m.MarkDirty(0x10000, 0x3001) }, []uint64{16, 17, 18, 19}},
		{"MarkDirty 0 bytes", func() error { return m.MarkDirty(0x10000, 0) }, nil},
		{"MarkDirty words apart", func() error { return m.MarkDirty(63*PageSize, 2*PageSize) }, []uint64{63, 64}},
		{"MarkDirty last page", func() error { return m.MarkDirty(8*mib-1, 1) }, []uint64{2047}},
		{"Read", func() error { return m.Read(0x2000, make([]byte, 100)) }, nil},
		{"Slice", func() error { _, err := m.Slice(0x2000, 100); return err }, nil},
		{"Uint64", func() error { _, err := m.Uint64(0x2000); return err }, nil},
		{"failed Write", func() error { m.Write(8*mib-1, []byte{1, 2}); return nil }, nil},
		{"failed MarkDirty", func() error { m.MarkDirty(8*mib, 1); return nil }, nil},
	}
	for _, tt := range tests {
		if err := tt.do(); err != nil {
			t.Errorf("%s = %v", tt.name, err)
			continue
		}
		dst := make([]uint64, words)
		n, err := m.TakeVMMDirty(dst)
		if got := dirtyPages(dst); err != nil || n != len(tt.pages) || !reflect.DeepEqual(got, tt.pages) {
			t.Errorf("%s: TakeVMMDirty = pages %v, count %d, %v; want %v, %d", tt.name, got, n, err, tt.pages, len(tt.pages))
		}
		// Taking cleared the bitmap.
		if n, err := m.TakeVMMDirty(dst); n != 0 || err != nil {
			t.Errorf("%s: second TakeVMMDirty = %d, %v; want 0, nil", tt.name, n, err)
		}
	}
}

func TestTakeVMMDirty(t *testing.T) {
	m := newMemory(t, Config{Size: 8 * mib})
	words := int((8*mib/PageSize + 63) / 64)
	for _, p := range []uint64{0, 5, 64, 2047} {
		if err := m.MarkDirty(p*PageSize, 1); err != nil {
			t.Fatal(err)
		}
	}
	// Too small: refused, and nothing is lost.
	small := make([]uint64, words-1)
	if n, err := m.TakeVMMDirty(small); err == nil || n != 0 {
		t.Errorf("TakeVMMDirty(%d words) = %d, %v; want 0 and an error", words-1, n, err)
	}
	if n, err := m.TakeVMMDirty(nil); err == nil || n != 0 {
		t.Errorf("TakeVMMDirty(nil) = %d, %v; want 0 and an error", n, err)
	}
	// The bits are OR-ed into dst; a longer dst is fine and its tail kept.
	dst := make([]uint64, words+2)
	dst[0] = 1<<5 | 1<<9 // page 5 already set, page 9 from elsewhere
	dst[words+1] = 0xabc
	n, err := m.TakeVMMDirty(dst)
	if want := []uint64{0, 5, 9, 64, 2047}; err != nil || n != 4 || !reflect.DeepEqual(dirtyPages(dst[:words]), want) || dst[words+1] != 0xabc {
		t.Errorf("TakeVMMDirty = %v (tail %#x), count %d, %v; want %v (tail 0xabc), 4", dirtyPages(dst[:words]), dst[words+1], n, err, want)
	}
	// A 4 GiB memory counts backing pages: GPA 4 GiB is backing page 3 GiB/4 KiB.
	big := newMemory(t, Config{Size: 4 * gib})
	if err := big.PutUint64(4*gib, 1); err != nil {
		t.Fatal(err)
	}
	bm := make([]uint64, 4*gib/PageSize/64)
	if n, err := big.TakeVMMDirty(bm); err != nil || n != 1 || !reflect.DeepEqual(dirtyPages(bm), []uint64{3 * gib / PageSize}) {
		t.Errorf("TakeVMMDirty after PutUint64(4 GiB) = %v, %d, %v; want page %d", dirtyPages(bm), n, err, 3*gib/PageSize)
	}
}

// TestVMMDirtyConcurrent writes disjoint pages from several goroutines while
// another takes the bitmap: every page is reported exactly once. The writers
// share bitmap words, and the test runs many rounds so that a take that is
// not atomic (load, then store zero) loses a bit and fails.
func TestVMMDirtyConcurrent(t *testing.T) {
	const (
		size    = 2 * mib
		pages   = size / PageSize
		writers = 8
		rounds  = 300
	)
	m := newMemory(t, Config{Size: size})
	words := pages / 64
	for round := 0; round < rounds; round++ {
		var wg sync.WaitGroup
		for g := 0; g < writers; g++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for p := uint64(g); p < pages; p += writers {
					if err := m.PutUint64(p*PageSize+uint64(g)*8, p+uint64(round)); err != nil {
						t.Errorf("PutUint64(page %d) = %v", p, err)
						return
					}
				}
			}()
		}
		done := make(chan struct{})
		acc := make([]uint64, words)
		total := 0
		taken := make(chan struct{})
		go func() {
			defer close(taken)
			dst := make([]uint64, words)
			for {
				select {
				case <-done:
					return
				default:
				}
				clear(dst)
				n, err := m.TakeVMMDirty(dst)
				if err != nil {
					t.Errorf("TakeVMMDirty = %v", err)
					return
				}
				for i, w := range dst {
					if acc[i]&w != 0 {
						t.Errorf("round %d: TakeVMMDirty reported pages in word %d (%#x) twice", round, i, acc[i]&w)
					}
					acc[i] |= w
				}
				total += n
			}
		}()
		wg.Wait()
		close(done)
		<-taken
		n, err := m.TakeVMMDirty(acc)
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if total != pages {
			t.Fatalf("round %d: TakeVMMDirty counts sum to %d, want %d", round, total, pages)
		}
		for i, w := range acc {
			if w != ^uint64(0) {
				t.Fatalf("round %d: dirty word %d = %#x after every page was written, want all ones", round, i, w)
			}
		}
	}
	for p := uint64(0); p < pages; p++ {
		if v, err := m.Uint64(p*PageSize + (p%writers)*8); err != nil || v != p+rounds-1 {
			t.Fatalf("Uint64(page %d) = %d, %v; want %d", p, v, err, p+rounds-1)
		}
	}
}

func ExampleMemory_Write() {
	m, err := New(Config{Size: 2 << 20})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	m.Write(0x1ffe, []byte{1, 2, 3}) // spans pages 1 and 2
	bitmap := make([]uint64, 8)
	n, _ := m.TakeVMMDirty(bitmap)
	fmt.Println(n, dirtyPages(bitmap))
	// Output: 2 [1 2]
}
