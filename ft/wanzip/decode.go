package wanzip

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"slices"

	"github.com/klauspost/compress/zstd"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// Decoder decodes page batches. It holds one zstd decoder state and starts
// no goroutines. Concurrent DecodeBatch calls are safe; they take turns on
// that state.
type Decoder struct {
	zd *zstd.Decoder
}

// NewDecoder returns a Decoder.
func NewDecoder() (*Decoder, error) {
	zd, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(maxBatchBytes),
		zstd.WithDecoderMaxWindow(maxBatchBytes),
		zstd.WithDecodeAllCapLimit(true))
	if err != nil {
		return nil, fmt.Errorf("wanzip: zstd decoder: %w", err)
	}
	return &Decoder{zd: zd}, nil
}

// DecodeBatch decodes one encoded batch b, refusing it when it holds more
// than maxPages pages (or more than wire.MaxBatchPages), and appends its pages
// to dst. Their data live in buf, overwriting it, when its capacity is
// enough, which BufSize(n) always is for a batch of n pages; otherwise
// DecodeBatch allocates BufSize(n) bytes for them. Each page's Data has
// length and capacity wire.PageSize; zero pages get their own zeroed memory.
//
// b comes from a network peer: any defect gives an error wrapping ErrCorrupt
// and returns dst as it was (its spare capacity and buf may have been
// written). See the package documentation for what is checked, and in which
// order relative to allocation.
func (d *Decoder) DecodeBatch(b []byte, maxPages int, dst []wire.Page, buf []byte) ([]wire.Page, error) {
	limit := min(maxPages, wire.MaxBatchPages)
	r := reader{b: b}
	if len(b) < 2 {
		return dst, corrupt("%d bytes, shorter than the 2-byte header", len(b))
	}
	if v := r.byte(); v != FormatVersion {
		return dst, corrupt("format version %d (this decoder reads %d)", v, FormatVersion)
	}
	if f := r.byte(); f != 0 {
		return dst, corrupt("undefined flags %#x", f)
	}
	n64, err := r.uvarint("page count")
	if err != nil {
		return dst, err
	}
	if n64 == 0 || n64 > uint64(max(limit, 0)) {
		return dst, corrupt("%d pages (want 1..%d)", n64, limit)
	}
	n := int(n64)
	bitmapLen := (n + 7) / 8
	// Each PFN takes at least one byte: check the input can hold them and
	// the bitmap before allocating anything sized by n.
	if r.left() < n+bitmapLen {
		return dst, corrupt("%d pages need at least %d bytes of PFNs and bitmap, %d left", n, n+bitmapLen, r.left())
	}

	base := len(dst)
	out := slices.Grow(dst, n)
	pages := out[base : base+n]
	var pfn uint64
	for i := range pages {
		v, err := r.uvarint("PFN")
		if err != nil {
			return dst, err
		}
		switch {
		case i == 0 && v > wire.MaxPFN:
			return dst, corrupt("page 0: PFN %#x beyond %#x", v, uint64(wire.MaxPFN))
		case i == 0:
			pfn = v
		case pfn >= wire.MaxPFN || v > wire.MaxPFN-1-pfn:
			return dst, corrupt("page %d: PFN gap %d after %#x passes %#x", i, v, pfn, uint64(wire.MaxPFN))
		default:
			pfn += v + 1
		}
		pages[i] = wire.Page{PFN: pfn}
	}

	bitmap := r.take(bitmapLen)
	if bitmap == nil {
		return dst, corrupt("%d bytes left for a %d-byte zero-page bitmap", r.left(), bitmapLen)
	}
	if n%8 != 0 && bitmap[bitmapLen-1]>>(n%8) != 0 {
		return dst, corrupt("zero-page bitmap has bits set past page %d", n-1)
	}
	zeros := 0
	for _, c := range bitmap {
		zeros += bits.OnesCount8(c)
	}
	data := n - zeros
	want := data * wire.PageSize
	frame := r.rest()
	if data == 0 {
		if len(frame) != 0 {
			return dst, corrupt("%d trailing bytes after a batch of zero pages", len(frame))
		}
	} else if err := checkFrame(frame, want); err != nil {
		return dst, err
	}

	need := n * wire.PageSize
	if data > 0 {
		need = max(need, want+decodeSlack)
	}
	if cap(buf) < need {
		buf = make([]byte, BufSize(n))
	}
	buf = buf[:cap(buf)]
	if data > 0 {
		got, err := d.zd.DecodeAll(frame, buf[:0:want+decodeSlack])
		if err != nil {
			return dst, fmt.Errorf("%w: zstd frame: %w", ErrCorrupt, err)
		}
		if len(got) != want {
			return dst, corrupt("zstd frame decoded to %d bytes, want %d", len(got), want)
		}
		if &got[0] != &buf[0] {
			copy(buf, got) // not expected: the frame fit the capacity given
		}
	}
	zeroArea := buf[want : n*wire.PageSize]
	clear(zeroArea)
	var di, zi int
	for i := range pages {
		if bitmap[i/8]&(1<<(i%8)) != 0 {
			pages[i].Data = zeroArea[zi*wire.PageSize : (zi+1)*wire.PageSize : (zi+1)*wire.PageSize]
			zi++
			continue
		}
		p := buf[di*wire.PageSize : (di+1)*wire.PageSize : (di+1)*wire.PageSize]
		if isZero(p) {
			return dst, corrupt("page %d (PFN %#x) is all zero but not marked in the zero-page bitmap", i, pages[i].PFN)
		}
		pages[i].Data = p
		di++
	}
	return out[:base+n], nil
}

// checkFrame checks, without decompressing, that frame is exactly one zstd
// frame as the format requires (content size want, a checksum, no
// dictionary) whose blocks could produce want bytes.
func checkFrame(frame []byte, want int) error {
	var h zstd.Header
	err := h.Decode(frame)
	switch {
	case err != nil:
		return corrupt("zstd frame header: %v", err)
	case h.Skippable:
		return corrupt("a skippable zstd frame where the data frame belongs")
	case !h.HasFCS:
		return corrupt("zstd frame does not declare its content size")
	case h.FrameContentSize != uint64(want):
		return corrupt("zstd frame declares %d bytes, the bitmap %d", h.FrameContentSize, want)
	case h.DictionaryID != 0:
		return corrupt("zstd frame wants dictionary %d", h.DictionaryID)
	case !h.HasCheckSum:
		return corrupt("zstd frame has no content checksum")
	case !h.SingleSegment && h.WindowSize > maxBatchBytes:
		return corrupt("zstd frame window %d bytes exceeds %d", h.WindowSize, maxBatchBytes)
	}
	rest := frame[h.HeaderSize:]
	var most uint64 // the most the blocks can decode to
	for {
		if len(rest) < 3 {
			return corrupt("zstd frame ends inside a block header")
		}
		bh := uint32(rest[0]) | uint32(rest[1])<<8 | uint32(rest[2])<<16
		rest = rest[3:]
		last, typ, size := bh&1 != 0, (bh>>1)&3, int(bh>>3)
		if size > maxBlockSize {
			return corrupt("zstd block of %d bytes exceeds %d", size, maxBlockSize)
		}
		in := size
		switch typ {
		case 0: // raw
		case 1: // RLE: one byte, repeated size times
			in = 1
		case 2: // compressed
			if size == 0 {
				return corrupt("empty compressed zstd block")
			}
			size = maxBlockSize
		default:
			return corrupt("reserved zstd block type")
		}
		if len(rest) < in {
			return corrupt("zstd frame ends inside a block")
		}
		rest = rest[in:]
		most += uint64(size)
		if last {
			break
		}
	}
	if most < uint64(want) {
		return corrupt("zstd blocks decode to at most %d bytes, want %d", most, want)
	}
	if len(rest) != 4 {
		return corrupt("%d bytes after the zstd frame's last block, want its 4-byte checksum", len(rest))
	}
	return nil
}

// reader takes bytes off the front of an encoding.
type reader struct {
	b   []byte
	off int
}

func (r *reader) left() int { return len(r.b) - r.off }

func (r *reader) byte() byte {
	c := r.b[r.off]
	r.off++
	return c
}

// take returns the next n bytes, or nil if fewer are left.
func (r *reader) take(n int) []byte {
	if r.left() < n {
		return nil
	}
	s := r.b[r.off : r.off+n]
	r.off += n
	return s
}

func (r *reader) rest() []byte { s := r.b[r.off:]; r.off = len(r.b); return s }

// uvarint reads a varint in its shortest form.
func (r *reader) uvarint(what string) (uint64, error) {
	v, k := binary.Uvarint(r.b[r.off:])
	switch {
	case k == 0:
		return 0, corrupt("%s: input ends inside a varint", what)
	case k < 0:
		return 0, corrupt("%s: varint overflows 64 bits", what)
	case k != varintLen(v):
		return 0, corrupt("%s: %d-byte varint for %d (not the shortest form)", what, k, v)
	}
	r.off += k
	return v, nil
}

func varintLen(v uint64) int {
	k := 1
	for ; v >= 0x80; v >>= 7 {
		k++
	}
	return k
}
