package wanzip

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"testing"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// headerLen is the length of an encoding's header (everything before the
// zstd frame) for pages.
func headerLen(pages []wire.Page) int {
	n := 2 + varintLen(uint64(len(pages))) + (len(pages)+7)/8
	for i, p := range pages {
		if i == 0 {
			n += varintLen(p.PFN)
		} else {
			n += varintLen(p.PFN - pages[i-1].PFN - 1)
		}
	}
	return n
}

// FuzzDecodeBatch feeds arbitrary bytes and page limits (0..256) to DecodeBatch. It
// must never panic; every error must wrap ErrCorrupt; and a batch it accepts
// must obey the batch rules and re-encode to the same header (the header is
// canonical) and the same pages.
func FuzzDecodeBatch(f *testing.F) {
	rng := rand.New(rand.NewPCG(7, 8))
	encs := []*Encoder{mustEncoder(f, 0), mustEncoder(f, LevelStore)}
	for i, n := range []int{1, 2, 3, 9, 40, 1, 3, 40} {
		b, err := encs[i/5].AppendBatch(nil, genPages(rng, n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint16(n))
		f.Add(b, uint16(n-1))
		f.Add(b[:len(b)-1], uint16(n))
		f.Add(append(b[:len(b):len(b)], 0), uint16(n))
		flip := append([]byte(nil), b...)
		flip[len(flip)/2] ^= 1
		f.Add(flip, uint16(n))
	}
	f.Add(cat(header(1, 0, 1, []uint64{7}, 0), handFrame(wire.PageSize, true, repeat(4, rle(128<<10))...)), uint16(8))
	f.Add(cat(header(1, 0, 2, []uint64{7, 0}, 0), handFrame(2*wire.PageSize, true, raw(wire.PageSize), rle(wire.PageSize))), uint16(8))
	f.Add(cat(header(1, 0, 8, make([]uint64, 8), 0xff)), uint16(8))
	f.Add([]byte{1, 0, 0x81, 0x00, 7, 1}, uint16(8))

	dec := mustDecoder(f)
	buf := make([]byte, BufSize(wire.MaxBatchPages))
	f.Fuzz(func(t *testing.T, b []byte, maxPages uint16) {
		// Batches of up to 256 pages: a 32 MiB batch (a few hundred bytes of
		// RLE blocks can be one) takes seconds to decode and re-encode under
		// coverage instrumentation, which stalls the fuzzer. The limit
		// checks themselves are exercised at any size.
		maxPages %= 257
		use := buf
		if len(b)%2 == 1 {
			use = nil
		}
		pages, err := dec.DecodeBatch(b, int(maxPages), nil, use)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("DecodeBatch = %v, not an ErrCorrupt", err)
			}
			if pages != nil {
				t.Fatalf("DecodeBatch returned %d pages with error %v", len(pages), err)
			}
			return
		}
		if len(pages) == 0 || len(pages) > int(maxPages) || len(pages) > wire.MaxBatchPages {
			t.Fatalf("DecodeBatch accepted %d pages with limit %d", len(pages), maxPages)
		}
		// The pages must form a valid batch: re-encoding checks that.
		again, err := encs[0].AppendBatch(nil, pages)
		if err != nil {
			t.Fatalf("AppendBatch(DecodeBatch()) = %v", err)
		}
		h := headerLen(pages)
		if !bytes.Equal(again[:h], b[:h]) {
			t.Fatalf("re-encoded header %x, want the decoded %x", again[:h], b[:h])
		}
		back, err := dec.DecodeBatch(again, wire.MaxBatchPages, nil, nil)
		if err != nil {
			t.Fatalf("DecodeBatch(AppendBatch(DecodeBatch())) = %v", err)
		}
		equalPages(t, back, pages)
	})
}

// FuzzRoundTrip builds a batch from arbitrary bytes (PFN gaps and page
// contents, sparse and repetitive) and checks it survives encoding.
func FuzzRoundTrip(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3}, uint16(1))
	f.Add(bytes.Repeat([]byte{0xff, 0, 0x10}, 100), uint16(300))
	f.Add([]byte("zero pages, repeated patterns and random data"), uint16(9))
	encs := []*Encoder{mustEncoder(f, 0), mustEncoder(f, LevelStore)}
	dec := mustDecoder(f)
	f.Fuzz(func(t *testing.T, seed []byte, n16 uint16) {
		enc := encs[n16%2]
		n := 1 + int(n16)%512
		pages := make([]wire.Page, n)
		data := make([]byte, n*wire.PageSize)
		var pfn uint64
		for i := range pages {
			var s byte
			if len(seed) > 0 {
				s = seed[i%len(seed)]
			}
			if i > 0 {
				pfn += 1 + uint64(s>>6)*uint64(s) // mostly consecutive, some gaps
			}
			d := data[i*wire.PageSize : (i+1)*wire.PageSize]
			switch s % 4 {
			case 0: // zero
			case 1: // the seed, repeated
				for j := 0; len(seed) > 0 && j < len(d); j += len(seed) {
					copy(d[j:], seed)
				}
			case 2: // one byte at a seed-chosen place
				d[(int(s)*37+i)%len(d)] = s | 1
			default: // pseudo-random from the seed
				r := rand.New(rand.NewPCG(uint64(s), uint64(i)))
				for j := 0; j < len(d); j += 8 {
					binary.LittleEndian.PutUint64(d[j:], r.Uint64())
				}
			}
			pages[i] = wire.Page{PFN: pfn, Data: d}
		}
		b, err := enc.AppendBatch(nil, pages)
		if err != nil {
			t.Fatalf("AppendBatch = %v", err)
		}
		got, err := dec.DecodeBatch(b, n, nil, nil)
		if err != nil {
			t.Fatalf("DecodeBatch(AppendBatch()) = %v", err)
		}
		equalPages(t, got, pages)
	})
}
