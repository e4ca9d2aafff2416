package wanzip

import (
	"encoding/binary"
	"fmt"
	"slices"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/zstd"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// Encoder compresses page batches. It keeps its zstd state and a scratch
// buffer (up to 32 MiB, the data of the largest batch) between batches. It
// is for one goroutine at a time; Stats may be called from any goroutine.
type Encoder struct {
	level Level
	zw    *zstd.Encoder // nil at LevelStore
	data  []byte        // scratch: the batch's data pages, concatenated (zstd levels)

	batches, pages, zeroPages, encoded atomic.Uint64
}

// Stats counts what an Encoder has encoded since it was made.
type Stats struct {
	Batches      uint64 // AppendBatch calls that succeeded
	Pages        uint64 // pages in those batches
	ZeroPages    uint64 // of those, all-zero pages (sent as one bitmap bit)
	RawBytes     uint64 // Pages × wire.PageSize: what the batches carry uncompressed
	EncodedBytes uint64 // bytes AppendBatch appended
}

// NewEncoder returns an Encoder that compresses at level (0: DefaultLevel).
func NewEncoder(level Level) (*Encoder, error) {
	if level == 0 {
		level = DefaultLevel
	}
	if !level.Valid() {
		return nil, fmt.Errorf("wanzip: %v is not a compression level", level)
	}
	if level == LevelStore {
		return &Encoder{level: level}, nil
	}
	// Concurrency 1: EncodeAll runs on the caller's goroutine and the
	// encoder starts none of its own.
	zw, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(levelZstd[level]),
		zstd.WithEncoderConcurrency(1), zstd.WithEncoderCRC(true))
	if err != nil {
		return nil, fmt.Errorf("wanzip: zstd encoder at level %v: %w", level, err)
	}
	return &Encoder{level: level, zw: zw}, nil
}

// Level returns the Encoder's compression level.
func (e *Encoder) Level() Level { return e.level }

// Stats returns the Encoder's counters.
func (e *Encoder) Stats() Stats {
	p := e.pages.Load()
	return Stats{Batches: e.batches.Load(), Pages: p, ZeroPages: e.zeroPages.Load(),
		RawBytes: p * wire.PageSize, EncodedBytes: e.encoded.Load()}
}

// AppendBatch appends the encoding of pages (laid out as the package
// documentation says) to dst. The pages must follow wire.PageBatch's rules:
// 1..wire.MaxBatchPages of them, each wire.PageSize bytes, PFNs strictly
// ascending and at most wire.MaxPFN; otherwise it returns dst unchanged and
// an error wrapping ErrInvalidBatch.
func (e *Encoder) AppendBatch(dst []byte, pages []wire.Page) ([]byte, error) {
	if err := checkBatch(pages); err != nil {
		return dst, err
	}
	n := len(pages)
	start := len(dst)
	dst = slices.Grow(dst, 2+binary.MaxVarintLen64*2+n+(n+7)/8)
	dst = append(dst, FormatVersion, 0)
	dst = binary.AppendUvarint(dst, uint64(n))
	for i, p := range pages {
		if i == 0 {
			dst = binary.AppendUvarint(dst, p.PFN)
		} else {
			dst = binary.AppendUvarint(dst, p.PFN-pages[i-1].PFN-1)
		}
	}
	bitmap := len(dst)
	dst = append(dst, make([]byte, (n+7)/8)...)
	e.data = e.data[:0]
	zeros := 0
	for i, p := range pages {
		if isZero(p.Data) {
			dst[bitmap+i/8] |= 1 << (i % 8)
			zeros++
		} else if e.zw != nil {
			e.data = append(e.data, p.Data...) // zstd compresses one buffer
		}
	}
	switch {
	case zeros == n:
	case e.zw == nil:
		// LevelStore: the data pages go straight from where they lie.
		// The bitmap is read from dst's bytes as they are now (appending
		// may move dst; the bitmap no longer changes).
		dst = appendStored(dst, pages, dst[bitmap:bitmap+(n+7)/8], n-zeros)
	default:
		dst = e.zw.EncodeAll(e.data, dst)
	}
	e.batches.Add(1)
	e.pages.Add(uint64(n))
	e.zeroPages.Add(uint64(zeros))
	e.encoded.Add(uint64(len(dst) - start))
	return dst, nil
}

// checkBatch applies wire.PageBatch's rules to pages.
func checkBatch(pages []wire.Page) error {
	if n := len(pages); n == 0 || n > wire.MaxBatchPages {
		return fmt.Errorf("%w: %d pages (want 1..%d)", ErrInvalidBatch, n, wire.MaxBatchPages)
	}
	for i, p := range pages {
		switch {
		case len(p.Data) != wire.PageSize:
			return fmt.Errorf("%w: page %d (PFN %#x) has %d bytes of data (want %d)", ErrInvalidBatch, i, p.PFN, len(p.Data), wire.PageSize)
		case p.PFN > wire.MaxPFN:
			return fmt.Errorf("%w: page %d: PFN %#x beyond %#x", ErrInvalidBatch, i, p.PFN, uint64(wire.MaxPFN))
		case i > 0 && p.PFN <= pages[i-1].PFN:
			return fmt.Errorf("%w: page %d: PFN %#x not above the previous %#x", ErrInvalidBatch, i, p.PFN, pages[i-1].PFN)
		}
	}
	return nil
}

// The stored frame (LevelStore): a zstd frame header with a 128 KiB window,
// a 4-byte content size and the checksum flag, then the data in raw blocks
// of at most maxBlockSize bytes, then the checksum.
const (
	zstdMagic      = 0xFD2FB528
	storedFHD      = 2<<6 | 1<<2 // content size in 4 bytes, checksum, not single segment, no dictionary
	storedWindow   = 7 << 3      // window 1<<(10+7) = 128 KiB: the raw blocks need no history
	rawBlockHeader = 0 << 1      // block type 0: raw
)

// appendStored appends the data pages of pages (those whose bit in bitmap
// is clear, dataPages of them) as one zstd frame of raw blocks.
func appendStored(dst []byte, pages []wire.Page, bitmap []byte, dataPages int) []byte {
	const blockPages = maxBlockSize / wire.PageSize
	size := dataPages * wire.PageSize
	dst = slices.Grow(dst, 10+size+3*(dataPages/blockPages+1)+4)
	dst = binary.LittleEndian.AppendUint32(dst, zstdMagic)
	dst = append(dst, storedFHD, storedWindow)
	dst = binary.LittleEndian.AppendUint32(dst, uint32(size))
	sum := xxhash.New()
	left, k := size, 0 // bytes still to append; data pages appended
	for i, p := range pages {
		if bitmap[i/8]&(1<<(i%8)) != 0 {
			continue
		}
		if k%blockPages == 0 {
			block := min(left, maxBlockSize)
			h := uint32(block)<<3 | rawBlockHeader
			if block == left {
				h |= 1 // the last block
			}
			dst = append(dst, byte(h), byte(h>>8), byte(h>>16))
		}
		dst = append(dst, p.Data...)
		sum.Write(p.Data)
		left -= wire.PageSize
		k++
	}
	return binary.LittleEndian.AppendUint32(dst, uint32(sum.Sum64()))
}
