package wanzip

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// genPages returns n pages with ascending PFNs and a guest-memory-like mix
// of contents: many zero pages, sparse pages, short repeating patterns,
// near-copies of earlier pages, text and random bytes.
func genPages(rng *rand.Rand, n int) []wire.Page {
	buf := make([]byte, n*wire.PageSize)
	pages := make([]wire.Page, n)
	// Start in the lower half with gaps small enough that the last PFN fits.
	pfn := rng.Uint64N(wire.MaxPFN / 2)
	maxGap := wire.MaxPFN / 2 / uint64(n)
	if rng.IntN(8) == 0 {
		pfn = wire.MaxPFN - uint64(n) + 1 // consecutive up to the very last PFN
	}
	zeroShare := rng.IntN(100)
	for i := range pages {
		if i > 0 && pfn < wire.MaxPFN/2 {
			switch rng.IntN(4) {
			case 0, 1:
				pfn++
			case 2:
				pfn += 1 + rng.Uint64N(min(512, maxGap))
			default:
				pfn += 1 + rng.Uint64N(maxGap)
			}
		} else if i > 0 {
			pfn++
		}
		d := buf[i*wire.PageSize : (i+1)*wire.PageSize : (i+1)*wire.PageSize]
		pages[i] = wire.Page{PFN: pfn, Data: d}
		if rng.IntN(100) < zeroShare {
			continue
		}
		switch rng.IntN(6) {
		case 0: // sparse: a few words set, maybe just one byte
			for range 1 + rng.IntN(4) {
				d[rng.IntN(wire.PageSize)] = byte(1 + rng.IntN(255))
			}
		case 1: // a short pattern repeated
			period := 1 + rng.IntN(64)
			for j := range period {
				d[j] = byte(rng.Uint32())
			}
			for j := period; j < len(d); j++ {
				d[j] = d[j-period]
			}
			if d[0] == 0 && isZero(d) {
				d[0] = 1
			}
		case 2: // an earlier page with a small edit
			if i > 0 {
				copy(d, pages[rng.IntN(i)].Data)
			}
			d[rng.IntN(wire.PageSize)] ^= byte(1 + rng.IntN(255))
		case 3: // text
			const words = "page frame number checkpoint epoch backup intermediary zstd "
			for j := range d {
				d[j] = words[(j*7+i+rng.IntN(3))%len(words)]
			}
		default: // random
			for j := 0; j < len(d); j += 8 {
				binary.LittleEndian.PutUint64(d[j:], rng.Uint64())
			}
		}
	}
	return pages
}

func equalPages(t *testing.T, got, want []wire.Page) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("decoded %d pages, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i].PFN != want[i].PFN {
			t.Fatalf("page %d: PFN %#x, want %#x", i, got[i].PFN, want[i].PFN)
		}
		if len(got[i].Data) != wire.PageSize || cap(got[i].Data) != wire.PageSize {
			t.Fatalf("page %d: Data len %d cap %d, want %d", i, len(got[i].Data), cap(got[i].Data), wire.PageSize)
		}
		if !bytes.Equal(got[i].Data, want[i].Data) {
			t.Fatalf("page %d (PFN %#x): data differs", i, want[i].PFN)
		}
	}
}

func mustEncoder(t testing.TB, l Level) *Encoder {
	t.Helper()
	e, err := NewEncoder(l)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func mustDecoder(t testing.TB) *Decoder {
	t.Helper()
	d, err := NewDecoder()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestRoundTrip encodes random batches at every level and decodes them, into
// a reused (dirty) buffer and into none, appending to existing pages.
func TestRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dec := mustDecoder(t)
	buf := make([]byte, BufSize(wire.MaxBatchPages))
	for i := range buf {
		buf[i] = 0xa5 // decoded zero pages must not show old contents
	}
	sizes := []int{1, 2, 7, 8, 9, 31, 64, 255, 256, 1000, 4096, wire.MaxBatchPages}
	rounds := 40
	if raceEnabled || testing.Short() {
		rounds = len(sizes) + 1 // every size once, and one reuse of the buffer
	}
	for l := LevelFastest; l <= LevelStore; l++ {
		enc := mustEncoder(t, l)
		var want Stats
		for round := range rounds {
			n := sizes[round%len(sizes)]
			if (l == LevelBetter || l == LevelBest) && n > 1000 {
				n = 1 + rng.IntN(1000) // the slow levels get smaller batches
			}
			pages := genPages(rng, n)
			prefix := []byte("hdr")
			b, err := enc.AppendBatch(prefix, pages)
			if err != nil {
				t.Fatalf("level %v round %d: AppendBatch = %v", l, round, err)
			}
			if !bytes.Equal(b[:3], prefix) {
				t.Fatalf("AppendBatch overwrote dst's bytes")
			}
			enc2 := b[3:]
			zeros := 0
			for _, p := range pages {
				if isZero(p.Data) {
					zeros++
				}
			}
			want.Batches++
			want.Pages += uint64(n)
			want.ZeroPages += uint64(zeros)
			want.RawBytes += uint64(n * wire.PageSize)
			want.EncodedBytes += uint64(len(enc2))
			if got := enc.Stats(); got != want {
				t.Fatalf("Stats() = %+v, want %+v", got, want)
			}

			useBuf := buf
			if round%3 == 2 {
				useBuf = nil
			}
			old := []wire.Page{{PFN: 99, Data: make([]byte, wire.PageSize)}}
			got, err := dec.DecodeBatch(enc2, n+round%2, old, useBuf)
			if err != nil {
				t.Fatalf("level %v round %d (%d pages, %d zero): DecodeBatch = %v", l, round, n, zeros, err)
			}
			if got[0].PFN != 99 {
				t.Fatalf("DecodeBatch changed the pages already in dst")
			}
			equalPages(t, got[1:], pages)
			if useBuf != nil && &got[1].Data[0] != &buf[0] && &got[1].Data[0] != &buf[(n-zeros)*wire.PageSize] {
				t.Fatalf("DecodeBatch did not decode into the buffer given")
			}
		}
	}
}

// TestZeroPagesCarryNoData: a batch of zero pages is a header and a bitmap.
func TestZeroPagesCarryNoData(t *testing.T) {
	pages := make([]wire.Page, wire.MaxBatchPages)
	for i := range pages {
		pages[i] = wire.Page{PFN: uint64(i), Data: zeroPage[:]}
	}
	b, err := mustEncoder(t, 0).AppendBatch(nil, pages)
	if err != nil {
		t.Fatal(err)
	}
	if want := 2 + 2 + wire.MaxBatchPages + wire.MaxBatchPages/8; len(b) != want {
		t.Fatalf("all-zero batch of %d pages encodes to %d bytes, want %d", len(pages), len(b), want)
	}
	got, err := mustDecoder(t).DecodeBatch(b, wire.MaxBatchPages, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	equalPages(t, got, pages)
}

func TestEncodeRefusesInvalidBatches(t *testing.T) {
	page := func(pfn uint64) wire.Page { return wire.Page{PFN: pfn, Data: make([]byte, wire.PageSize)} }
	many := make([]wire.Page, wire.MaxBatchPages+1)
	for i := range many {
		many[i] = page(uint64(i))
	}
	for _, tc := range []struct {
		name  string
		pages []wire.Page
	}{
		{"none", nil},
		{"too many", many},
		{"short data", []wire.Page{{PFN: 1, Data: make([]byte, wire.PageSize-1)}}},
		{"long data", []wire.Page{{PFN: 1, Data: make([]byte, wire.PageSize+1)}}},
		{"equal PFNs", []wire.Page{page(5), page(5)}},
		{"descending PFNs", []wire.Page{page(5), page(4)}},
		{"PFN beyond MaxPFN", []wire.Page{page(wire.MaxPFN + 1)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := mustEncoder(t, 0).AppendBatch([]byte{1}, tc.pages)
			if !errors.Is(err, ErrInvalidBatch) {
				t.Fatalf("AppendBatch = %v, want ErrInvalidBatch", err)
			}
			if len(b) != 1 {
				t.Fatalf("AppendBatch changed dst on error: %x", b)
			}
		})
	}
}

// zframe compresses data into one zstd frame with the given options.
func zframe(t testing.TB, data []byte, opts ...zstd.EOption) []byte {
	t.Helper()
	w, err := zstd.NewWriter(nil, append([]zstd.EOption{zstd.WithEncoderConcurrency(1)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return w.EncodeAll(data, nil)
}

// header builds the encoding's header by hand: version, flags, count, PFNs
// (given as the raw varint values) and bitmap.
func header(version, flags byte, n uint64, pfnVals []uint64, bitmap ...byte) []byte {
	b := []byte{version, flags}
	b = binary.AppendUvarint(b, n)
	for _, v := range pfnVals {
		b = binary.AppendUvarint(b, v)
	}
	return append(b, bitmap...)
}

func cat(bs ...[]byte) []byte { return bytes.Join(bs, nil) }

// handFrame builds a zstd frame by hand, as a hostile peer would: a header
// declaring fcs bytes of content and a checksum (single segment, or with an
// 8 MiB window), the blocks given (see rle and raw; the last one gets the
// last-block bit), then a 4-byte checksum field.
func handFrame(fcs uint32, window bool, blocks ...[]byte) []byte {
	b := []byte{0x28, 0xb5, 0x2f, 0xfd, 0xa4} // magic; FHD: 4-byte FCS, single segment, checksum
	if window {
		b[4] = 0x84
		b = append(b, 13<<3) // window 2^(10+13) = 8 MiB
	}
	b = binary.LittleEndian.AppendUint32(b, fcs)
	for i, blk := range blocks {
		b = append(b, blk...)
		if i == len(blocks)-1 {
			b[len(b)-len(blk)] |= 1
		}
	}
	return append(b, 0, 0, 0, 0)
}

// rle is an RLE block header and byte: size copies of 0x5a.
func rle(size int) []byte {
	bh := uint32(size)<<3 | 1<<1
	return []byte{byte(bh), byte(bh >> 8), byte(bh >> 16), 0x5a}
}

// raw is a raw block header and size bytes of content.
func raw(size int) []byte {
	bh := uint32(size) << 3
	return append([]byte{byte(bh), byte(bh >> 8), byte(bh >> 16)}, bytes.Repeat([]byte{0x33}, size)...)
}

func repeat(n int, b []byte) [][]byte {
	s := make([][]byte, n)
	for i := range s {
		s[i] = b
	}
	return s
}

func TestDecodeRefusesCorruptInput(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	data := genPages(rng, 1)[0].Data
	for isZero(data) {
		data = genPages(rng, 1)[0].Data
	}
	// page holds fixed, recognisable data so each case below builds a
	// frame whose only defect is the one it names.
	page := bytes.Repeat([]byte("wanzip!!"), wire.PageSize/8)
	good := cat(header(1, 0, 2, []uint64{7, 0}, 0b10), zframe(t, page))
	if _, err := mustDecoder(t).DecodeBatch(good, 2, nil, nil); err != nil {
		t.Fatalf("the well-formed base case fails: %v", err)
	}
	twoData := zframe(t, append(append([]byte(nil), page...), data...))
	noCRC := zframe(t, page, zstd.WithEncoderCRC(false))
	withDict := zframe(t, page, zstd.WithEncoderDictRaw(5, []byte("a dictionary of some length, anyway")))
	// A frame without content size: FHD with only the checksum flag, an 8
	// MiB window, one raw last block.
	noFCS := cat([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x04, 13 << 3}, raw(wire.PageSize), []byte{0, 0, 0, 0})
	noFCS[6] |= 1
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)-8] ^= 0x40 // inside the frame's last block or its checksum
	zeroAsData := cat(header(1, 0, 1, []uint64{7}, 0), zframe(t, make([]byte, wire.PageSize)))
	skippable := []byte{0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4}

	for _, tc := range []struct {
		name     string
		b        []byte
		maxPages int
	}{
		{"empty", nil, 8},
		{"one byte", []byte{1}, 8},
		{"version 0", cat(header(0, 0, 1, []uint64{7}, 1)), 8},
		{"version 2", cat(header(2, 0, 1, []uint64{7}, 1)), 8},
		{"flags", cat(header(1, 1, 1, []uint64{7}, 1)), 8},
		{"no count", []byte{1, 0}, 8},
		{"count 0", cat(header(1, 0, 0, nil)), 8},
		{"count over maxPages", cat(header(1, 0, 3, []uint64{1, 0, 0}, 0b111)), 2},
		{"count over MaxBatchPages", cat(header(1, 0, wire.MaxBatchPages+1, nil), make([]byte, 3*wire.MaxBatchPages)), 1 << 20},
		{"maxPages 0", cat(header(1, 0, 1, []uint64{7}, 1)), 0},
		{"count claims more PFNs than bytes", cat(header(1, 0, 8192, []uint64{1}, 0)), wire.MaxBatchPages},
		{"count not shortest form", []byte{1, 0, 0x81, 0x00, 7, 1}, 8},
		{"varint overflow", cat([]byte{1, 0}, bytes.Repeat([]byte{0xff}, 10), []byte{1, 7, 1}), 8},
		{"PFN not shortest form", []byte{1, 0, 1, 0x87, 0x00, 1}, 8},
		{"first PFN beyond MaxPFN", cat(header(1, 0, 1, []uint64{wire.MaxPFN + 1}, 1)), 8},
		{"gap beyond MaxPFN", cat(header(1, 0, 2, []uint64{wire.MaxPFN - 1, 1}, 0b11)), 8},
		{"gap after MaxPFN", cat(header(1, 0, 2, []uint64{wire.MaxPFN, 0}, 0b11)), 8},
		{"huge gap wraps", cat(header(1, 0, 2, []uint64{5, 1<<64 - 6}, 0b11)), 8},
		{"truncated PFNs", cat(header(1, 0, 3, []uint64{1, 0})), 8},
		{"truncated bitmap", cat(header(1, 0, 9, []uint64{1, 0, 0, 0, 0, 0, 0, 0, 0}, 0xff)), 16},
		{"bitmap bits past the last page", cat(header(1, 0, 2, []uint64{7, 0}, 0b111)), 8},
		{"all zero with trailing bytes", cat(header(1, 0, 1, []uint64{7}, 1), []byte{0}), 8},
		{"data page without frame", cat(header(1, 0, 2, []uint64{7, 0}, 0b10)), 8},
		{"frame too short", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), good[6:9]), 8},
		{"trailing byte after frame", cat(good, []byte{0}), 8},
		{"second frame", cat(good, zframe(t, []byte("more"))), 8},
		{"truncated frame", good[:len(good)-1], 8},
		{"frame cut after its header", good[:7+6], 8},
		{"skippable frame first", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), skippable, good[6:]), 8},
		{"frame holds two pages, bitmap one", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), twoData), 8},
		{"frame holds one page, bitmap two", cat(header(1, 0, 2, []uint64{7, 0}, 0), zframe(t, page)), 8},
		{"frame without checksum", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), noCRC), 8},
		{"frame with dictionary", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), withDict), 8},
		{"frame without content size", cat(header(1, 0, 2, []uint64{7, 0}, 0b10), noFCS), 8},
		{"frame bit flip", flipped, 8},
		{"zero page marked as data", zeroAsData, 8},
		{"bomb: RLE blocks far past the declared size", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, false, repeat(256, rle(128<<10))...)), 8},
		{"bomb in a windowed frame", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, repeat(256, rle(128<<10))...)), 8},
		{"last block overshoots", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, rle(wire.PageSize+1))), 8},
		{"raw block overshoots", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, raw(wire.PageSize), raw(1))), 8},
		{"blocks too short for the declared size", cat(header(1, 0, 2, []uint64{7, 0}, 0), handFrame(2*wire.PageSize, false, rle(wire.PageSize))), 8},
		{"block over 128 KiB", cat(header(1, 0, 64, make([]uint64, 64), make([]byte, 8)...), handFrame(64*wire.PageSize, true, rle(128<<10+1))), 64},
		{"reserved block type", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, []byte{3 << 1, 0, 0})), 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := []wire.Page{{PFN: 1}}
			got, err := mustDecoder(t).DecodeBatch(tc.b, tc.maxPages, dst, make([]byte, BufSize(64)))
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("DecodeBatch(%x...) = %d pages, %v; want ErrCorrupt", tc.b[:min(len(tc.b), 24)], len(got), err)
			}
			if len(got) != 1 || got[0].PFN != 1 {
				t.Fatalf("DecodeBatch changed dst on error: %+v", got)
			}
			t.Log(err)
		})
	}
}

// allocated returns the bytes fn allocates.
func allocated(fn func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	fn()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// TestDecodeBombAllocatesNothing: hostile frames that decode far past what
// they declare fail without allocating beyond the buffer given, and so do
// counts the input cannot back.
func TestDecodeBombAllocatesNothing(t *testing.T) {
	dec := mustDecoder(t)
	buf := make([]byte, BufSize(wire.MaxBatchPages))
	// Warm the zstd decoder's own block buffers with a valid batch.
	pages := genPages(rand.New(rand.NewPCG(5, 6)), 512)
	b, err := mustEncoder(t, 0).AppendBatch(nil, pages)
	if err != nil {
		t.Fatal(err)
	}
	dst := make([]wire.Page, 0, wire.MaxBatchPages)
	if _, err := dec.DecodeBatch(b, wire.MaxBatchPages, dst, buf); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		// 32 MiB of RLE blocks behind a frame that declares one page.
		{"RLE bomb", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, repeat(256, rle(128<<10))...))},
		{"single-segment RLE bomb", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, false, repeat(256, rle(128<<10))...))},
		{"raw overshoot", cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, raw(wire.PageSize), raw(128<<10)))},
		// The largest count, backed by 2 bytes of input.
		{"count without PFNs", cat(header(1, 0, wire.MaxBatchPages, []uint64{1}, 0))},
	} {
		var err error
		n := allocated(func() { _, err = dec.DecodeBatch(tc.b, wire.MaxBatchPages, dst, buf) })
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: DecodeBatch = %v, want ErrCorrupt", tc.name, err)
		}
		if n > 64<<10 {
			t.Errorf("%s: DecodeBatch allocated %d bytes before refusing, want under 64 KiB", tc.name, n)
		}
		t.Logf("%s: %v (%d bytes allocated)", tc.name, err, n)
	}
	// A valid batch decodes into the buffers given without allocating.
	if raceEnabled {
		return
	}
	if n := testing.AllocsPerRun(5, func() {
		if _, err := dec.DecodeBatch(b, wire.MaxBatchPages, dst, buf); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Errorf("DecodeBatch into a large enough buf and dst: %v allocations, want 0", n)
	}
}

// TestConcurrentUse: one shared Decoder, an Encoder per goroutine, Stats read
// while encoding (run with -race).
func TestConcurrentUse(t *testing.T) {
	dec := mustDecoder(t)
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			enc := mustEncoder(t, 0)
			done := make(chan struct{})
			go func() {
				defer close(done)
				for range 100 {
					_ = enc.Stats()
				}
			}()
			for range 10 {
				pages := genPages(rng, 1+rng.IntN(300))
				b, err := enc.AppendBatch(nil, pages)
				if err != nil {
					errs <- err
					return
				}
				got, err := dec.DecodeBatch(b, wire.MaxBatchPages, nil, nil)
				if err != nil {
					errs <- err
					return
				}
				for i := range pages {
					if got[i].PFN != pages[i].PFN || !bytes.Equal(got[i].Data, pages[i].Data) {
						errs <- fmt.Errorf("goroutine %d: page %d differs", g, i)
						return
					}
				}
			}
			<-done
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestLevels(t *testing.T) {
	for l := LevelFastest; l <= LevelStore; l++ {
		p, err := ParseLevel(l.String())
		if err != nil || p != l {
			t.Errorf("ParseLevel(%q) = %v, %v; want %v", l.String(), p, err, l)
		}
	}
	if _, err := ParseLevel("fast"); err == nil {
		t.Errorf("ParseLevel(fast) = nil error, want one")
	}
	if e := mustEncoder(t, 0); e.Level() != DefaultLevel {
		t.Errorf("NewEncoder(0).Level() = %v, want %v", e.Level(), DefaultLevel)
	}
	if _, err := NewEncoder(LevelStore + 1); err == nil {
		t.Errorf("NewEncoder(%d) = nil error, want one", LevelStore+1)
	}
}

// TestStoredFrame: LevelStore's data pages go as raw blocks, whole, after
// the bitmap, in a frame that zstd's own decoder reads and checks (its
// checksum); a flipped data byte fails that check.
func TestStoredFrame(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	// 40 data pages (160 KiB, two raw blocks) between zero pages.
	pages := genPages(rng, 64)
	data := 0
	for i := range pages {
		if i%8 == 0 {
			pages[i].Data = make([]byte, wire.PageSize)
			continue
		}
		if isZero(pages[i].Data) {
			pages[i].Data[0] = 1
		}
		if data++; data > 40 {
			pages[i].Data = make([]byte, wire.PageSize)
		}
	}
	b, err := mustEncoder(t, LevelStore).AppendBatch(nil, pages)
	if err != nil {
		t.Fatal(err)
	}
	frame := b[headerLen(pages):]
	var want []byte
	for _, p := range pages {
		if !isZero(p.Data) {
			want = append(want, p.Data...)
		}
	}
	if len(want) != 40*wire.PageSize {
		t.Fatalf("%d data bytes, want 40 pages", len(want))
	}
	// Header (4 magic, 1 descriptor, 1 window, 4 size), two block headers,
	// the data, the checksum.
	if got := 10 + 2*3 + len(want) + 4; len(frame) != got {
		t.Fatalf("stored frame of %d bytes, want %d", len(frame), got)
	}
	if !bytes.Equal(frame[10+3:10+3+maxBlockSize], want[:maxBlockSize]) {
		t.Errorf("the first block is not the data, raw")
	}
	zd, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer zd.Close()
	got, err := zd.DecodeAll(frame, nil)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("zstd decodes the stored frame to %d bytes, %v; want the %d data bytes", len(got), err, len(want))
	}
	dec, err := mustDecoder(t).DecodeBatch(b, len(pages), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	equalPages(t, dec, pages)
	b[len(b)-100] ^= 1
	if _, err := mustDecoder(t).DecodeBatch(b, len(pages), nil, nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("DecodeBatch of a stored batch with a flipped data byte = %v, want ErrCorrupt", err)
	}
}
