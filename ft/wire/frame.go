package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Frame layout constants; doc.go shows the layout.
const (
	// Version is the protocol version this package speaks. Version 2
	// carries an end-to-end sum with every page record (PageSum), a
	// CRC-32C checkpoint digest over them instead of SHA-256 over the data,
	// and a frame CRC that leaves page data to those sums.
	Version uint8 = 2
	// HeaderSize is the size of a frame header in bytes.
	HeaderSize = 16
	// TrailerSize is the size of the trailing CRC-32C in bytes.
	TrailerSize = 4
	// MaxPayload is the largest payload a frame may carry.
	MaxPayload = 64 << 20
)

// magic opens every frame.
var magic = [4]byte{'U', 'S', 'F', 'T'}

// castagnoli is the CRC-32C table (hardware-accelerated on amd64 and arm64).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// allocStep is how much of a payload a Reader allocates before the bytes
// have arrived; it grows by doubling from there.
const allocStep = 1 << 20

// A Frame is one decoded frame: a message type and its raw payload.
type Frame struct {
	Type    Type
	Flags   uint16
	Payload []byte
}

// AppendFrame appends m, framed, to dst. It fails, appending nothing, if m
// breaks the layout rules or its payload would exceed MaxPayload.
func AppendFrame(dst []byte, m Message) ([]byte, error) {
	start := len(dst)
	dst = append(dst, make([]byte, HeaderSize)...)
	dst, err := m.AppendBinary(dst)
	if err != nil {
		return dst[:start], err
	}
	n := len(dst) - start - HeaderSize
	if n > MaxPayload {
		return dst[:start], fmt.Errorf("%w: %v payload of %d bytes (limit %d)", ErrTooLarge, m.Type(), n, MaxPayload)
	}
	putHeader(dst[start:start+HeaderSize], m.Type(), n)
	covered := HeaderSize + coveredLen(m.Type(), dst[start+HeaderSize:])
	return binary.LittleEndian.AppendUint32(dst, crc32.Checksum(dst[start:start+covered], castagnoli)), nil
}

// coveredLen returns how much of a payload of type t the frame's trailing
// CRC covers: all of it, except the page data of a PageBatch, which the
// pages' own end-to-end sums cover (see PageSum).
func coveredLen(t Type, payload []byte) int {
	if t == TypePageBatch {
		return pageBatchHeadLen(payload)
	}
	return len(payload)
}

// putHeader fills the frame header h for a payload of n bytes of type t.
func putHeader(h []byte, t Type, n int) {
	copy(h, magic[:])
	h[4] = Version
	h[5] = byte(t)
	binary.LittleEndian.PutUint16(h[6:], 0)
	binary.LittleEndian.PutUint32(h[8:], uint32(n))
	binary.LittleEndian.PutUint32(h[12:], crc32.Checksum(h[:12], castagnoli))
}

// vectorMin is the page data of a PageBatch from which a Writer writes the
// pages from where they lie instead of copying them into its buffer.
const vectorMin = 64 << 10

// A Writer writes messages to an io.Writer, one frame per message. A frame
// is one Write call, except a PageBatch with at least 64 KiB of pages: its
// pages are written from where they lie (vectored: the frame's header and
// the batch's head, then each run of pages that lie next to each other in
// memory, then the trailer), not copied into a frame buffer. It is not
// safe for concurrent use.
type Writer struct {
	w   io.Writer
	buf []byte
}

// NewWriter returns a Writer that writes frames to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// WriteMessage frames m and writes it.
func (w *Writer) WriteMessage(m Message) error {
	if pb, ok := m.(*PageBatch); ok && len(pb.Pages)*PageSize >= vectorMin {
		return w.writeBatch(pb)
	}
	b, err := AppendFrame(w.buf[:0], m)
	if err != nil {
		return err
	}
	w.buf = b
	if _, err := w.w.Write(b); err != nil {
		return fmt.Errorf("wire: write %v: %w", m.Type(), err)
	}
	return nil
}

// writeBatch writes a PageBatch frame with its pages written from where
// they lie.
func (w *Writer) writeBatch(pb *PageBatch) error {
	if err := pb.check(); err != nil {
		return err
	}
	n := pageBatchHead + len(pb.Pages)*(pageRecordHead+PageSize)
	if n > MaxPayload {
		return fmt.Errorf("%w: %v payload of %d bytes (limit %d)", ErrTooLarge, pb.Type(), n, MaxPayload)
	}
	b := append(w.buf[:0], make([]byte, HeaderSize)...)
	putHeader(b, TypePageBatch, n)
	b = pb.appendHead(b)
	w.buf = b
	var trailer [TrailerSize]byte
	binary.LittleEndian.PutUint32(trailer[:], crc32.Checksum(b, castagnoli))
	fail := func(err error) error { return fmt.Errorf("wire: write %v: %w", TypePageBatch, err) }
	if _, err := w.w.Write(b); err != nil {
		return fail(err)
	}
	for i := 0; i < len(pb.Pages); {
		run := pb.Pages[i].Data
		j := i + 1
		for ; j < len(pb.Pages); j++ {
			if next, ok := extend(run, pb.Pages[j].Data); ok {
				run = next
				continue
			}
			break
		}
		if _, err := w.w.Write(run); err != nil {
			return fail(err)
		}
		i = j
	}
	if _, err := w.w.Write(trailer[:]); err != nil {
		return fail(err)
	}
	return nil
}

// extend returns run grown over next if next lies right after run in the
// same array.
func extend(run, next []byte) ([]byte, bool) {
	if cap(run)-len(run) < len(next) || len(next) == 0 {
		return nil, false
	}
	grown := run[:len(run)+len(next)]
	if &grown[len(run)] != &next[0] {
		return nil, false
	}
	return grown, true
}

// A Reader reads frames from an io.Reader. It allocates a payload as its
// bytes arrive, never more than MaxPayload plus the trailer, and reuses that
// memory for later frames.
//
// With SetPagePlace, ReadMessage reads the page data of a PageBatch straight
// into the memory the caller places it in (where the pages are to stay),
// without a copy.
//
// An error other than a timeout is sticky: the stream has lost its framing
// and every later call returns the same error. A timeout (an error with a
// Timeout method that reports true, such as os.ErrDeadlineExceeded) keeps
// the bytes read so far, so a later call continues the same frame.
type Reader struct {
	r io.Reader

	hdr    [HeaderSize]byte
	hn     int  // header bytes read
	parsed bool // hdr is complete and valid
	typ    Type
	flags  uint16
	plen   int    // payload length from the header
	buf    []byte // payload and trailer, grown as bytes arrive (placed: the batch's head)
	bn     int    // bytes of buf read
	err    error  // sticky error

	// A PageBatch read into placed memory: dst holds its page data (dn
	// bytes read), tail its trailer (tn bytes read).
	place func(pages int) []byte
	dst   []byte
	dn    int
	tail  [TrailerSize]byte
	tn    int
}

// NewReader returns a Reader of the frames in r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// SetPagePlace makes ReadMessage read the page data of a well-formed
// PageBatch of n pages into place(n), which must return exactly n pages of
// memory (or nil: the batch is then read and copied as without a place).
// The pages of the returned PageBatch then lie in that memory. nil ends
// placing. After a timeout, call again with the same place.
func (r *Reader) SetPagePlace(place func(pages int) []byte) { r.place = place }

// ReadFrame reads the next frame. Its Payload is valid until the next call.
// At the end of the stream between frames it returns io.EOF; inside a frame,
// an error wrapping io.ErrUnexpectedEOF.
func (r *Reader) ReadFrame() (Frame, error) {
	if err := r.header(); err != nil {
		return Frame{}, err
	}
	return r.payload()
}

// header reads and checks the next frame's header, if not done yet.
func (r *Reader) header() error {
	if r.err != nil {
		return r.err
	}
	if err := r.readFull(r.hdr[:], &r.hn); err != nil {
		return r.fail(err)
	}
	if !r.parsed {
		if err := r.parseHeader(); err != nil {
			r.err = err
			return err
		}
		r.parsed = true
		r.buf, r.bn = r.buf[:0], 0
		r.dst, r.dn, r.tn = nil, 0, 0
	}
	return nil
}

// payload reads the rest of the frame into buf and checks its trailer.
func (r *Reader) payload() (Frame, error) {
	need := r.plen + TrailerSize
	for r.bn < need {
		if r.bn == len(r.buf) {
			r.grow(min(need, max(2*r.bn, allocStep)))
		}
		if err := r.readFull(r.buf[:len(r.buf)], &r.bn); err != nil {
			return Frame{}, r.fail(err)
		}
	}
	payload := r.buf[:r.plen]
	covered := payload[:coveredLen(r.typ, payload)]
	crc := crc32.Update(crc32.Checksum(r.hdr[:], castagnoli), castagnoli, covered)
	if got := binary.LittleEndian.Uint32(r.buf[r.plen:need]); got != crc {
		r.err = fmt.Errorf("%w: %v frame of %d bytes: CRC-32C %#08x, computed %#08x", ErrChecksum, r.typ, r.plen, got, crc)
		return Frame{}, r.err
	}
	r.hn, r.parsed = 0, false
	return Frame{Type: r.typ, Flags: r.flags, Payload: payload}, nil
}

// ReadMessage reads the next frame and decodes its message. The message does
// not share memory with the Reader (a placed PageBatch's pages lie where
// they were placed). A message that fails to decode is an ErrMalformed; the
// stream is still in step, so it is not sticky.
func (r *Reader) ReadMessage() (Message, error) {
	if err := r.header(); err != nil {
		return nil, err
	}
	if r.place != nil && r.typ == TypePageBatch {
		if m, placed, err := r.placedBatch(); placed || err != nil {
			return m, err
		}
	}
	f, err := r.payload()
	if err != nil {
		return nil, err
	}
	return Decode(f.Type, f.Payload)
}

// placedBatch reads a PageBatch with its page data in placed memory. It
// reports placed false, having read only part of the payload into buf,
// when the batch is not one to place (its head is malformed, or place
// gave no memory): payload then reads the rest as usual.
func (r *Reader) placedBatch() (m Message, placed bool, err error) {
	if r.dst == nil {
		if r.plen < pageBatchHead {
			return nil, false, nil
		}
		if err := r.fill(pageBatchHead); err != nil {
			return nil, false, err
		}
		n := int(binary.LittleEndian.Uint32(r.buf[8:]))
		head := pageBatchHead + n*pageRecordHead
		if n == 0 || n > MaxBatchPages || r.plen != head+n*PageSize {
			return nil, false, nil // malformed: decoded (and refused) as usual
		}
		if err := r.fill(head); err != nil {
			return nil, false, err
		}
		dst := r.place(n)
		if len(dst) != n*PageSize {
			return nil, false, nil
		}
		r.dst = dst
	}
	if err := r.readFull(r.dst, &r.dn); err != nil {
		return nil, true, r.fail(err)
	}
	if err := r.readFull(r.tail[:], &r.tn); err != nil {
		return nil, true, r.fail(err)
	}
	head := r.buf[:r.bn]
	crc := crc32.Update(crc32.Checksum(r.hdr[:], castagnoli), castagnoli, head)
	if got := binary.LittleEndian.Uint32(r.tail[:]); got != crc {
		r.err = fmt.Errorf("%w: %v frame of %d bytes: CRC-32C %#08x, computed %#08x", ErrChecksum, r.typ, r.plen, got, crc)
		return nil, true, r.err
	}
	dst := r.dst
	r.hn, r.parsed, r.dst = 0, false, nil
	b, err := decodeBatchHead(head, r.plen)
	if err != nil {
		return nil, true, err
	}
	b.place(dst)
	return &b, true, nil
}

// fill reads the payload into buf until it holds n bytes.
func (r *Reader) fill(n int) error {
	if r.bn >= n {
		return nil
	}
	if len(r.buf) < n {
		r.grow(n)
	}
	if err := r.readFull(r.buf[:n], &r.bn); err != nil {
		return r.fail(err)
	}
	return nil
}

// parseHeader validates the complete header in r.hdr.
func (r *Reader) parseHeader() error {
	h := r.hdr[:]
	if [4]byte(h[:4]) != magic {
		return fmt.Errorf("%w: got % x", ErrBadMagic, h[:4])
	}
	if got, want := binary.LittleEndian.Uint32(h[12:]), crc32.Checksum(h[:12], castagnoli); got != want {
		return fmt.Errorf("%w: frame header CRC-32C %#08x, computed %#08x", ErrChecksum, got, want)
	}
	if h[4] != Version {
		return &VersionError{Got: h[4]}
	}
	r.typ = Type(h[5])
	if !r.typ.Known() {
		return fmt.Errorf("%w: %v", ErrUnknownType, r.typ)
	}
	r.flags = binary.LittleEndian.Uint16(h[6:])
	if r.flags != 0 {
		return fmt.Errorf("%w: %v frame has undefined flags %#04x", ErrMalformed, r.typ, r.flags)
	}
	n := binary.LittleEndian.Uint32(h[8:])
	if n > MaxPayload {
		return fmt.Errorf("%w: %v frame claims %d payload bytes (limit %d)", ErrTooLarge, r.typ, n, MaxPayload)
	}
	r.plen = int(n)
	return nil
}

// grow makes len(r.buf) == n, keeping the r.bn bytes read so far.
func (r *Reader) grow(n int) {
	if n <= cap(r.buf) {
		r.buf = r.buf[:n]
		return
	}
	b := make([]byte, n)
	copy(b, r.buf[:r.bn])
	r.buf = b
}

// readFull reads into b[*n:] until b is full, advancing *n as bytes arrive.
func (r *Reader) readFull(b []byte, n *int) error {
	for empty := 0; *n < len(b); {
		m, err := r.r.Read(b[*n:])
		*n += m
		if *n == len(b) {
			return nil
		}
		if err != nil {
			return err
		}
		if m == 0 {
			if empty++; empty >= 100 {
				return io.ErrNoProgress
			}
		}
	}
	return nil
}

// fail classifies a read error: a timeout is returned as it is and keeps
// the partial frame; anything else becomes sticky.
func (r *Reader) fail(err error) error {
	var te interface{ Timeout() bool }
	if errors.As(err, &te) && te.Timeout() {
		return err
	}
	started := r.hn > 0
	switch {
	case errors.Is(err, io.EOF) && !started:
		r.err = io.EOF
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		r.err = fmt.Errorf("wire: frame truncated after %d bytes: %w", r.hn+r.bn+r.dn+r.tn, io.ErrUnexpectedEOF)
	default:
		r.err = fmt.Errorf("wire: read frame: %w", err)
	}
	return r.err
}
