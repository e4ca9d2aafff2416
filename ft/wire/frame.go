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
	// Version is the protocol version this package speaks.
	Version uint8 = 1
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
	h := dst[start : start+HeaderSize]
	copy(h, magic[:])
	h[4] = Version
	h[5] = byte(m.Type())
	binary.LittleEndian.PutUint16(h[6:], 0)
	binary.LittleEndian.PutUint32(h[8:], uint32(n))
	binary.LittleEndian.PutUint32(h[12:], crc32.Checksum(h[:12], castagnoli))
	return binary.LittleEndian.AppendUint32(dst, crc32.Checksum(dst[start:], castagnoli)), nil
}

// A Writer writes messages to an io.Writer, one frame per message and one
// Write call per frame. It is not safe for concurrent use.
type Writer struct {
	w   io.Writer
	buf []byte
}

// NewWriter returns a Writer that writes frames to w.
func NewWriter(w io.Writer) *Writer { return &Writer{w: w} }

// WriteMessage frames m and writes it.
func (w *Writer) WriteMessage(m Message) error {
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

// A Reader reads frames from an io.Reader. It allocates a payload as its
// bytes arrive, never more than MaxPayload plus the trailer, and reuses that
// memory for later frames.
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
	buf    []byte // payload and trailer, grown as bytes arrive
	bn     int    // bytes of buf read
	err    error  // sticky error
}

// NewReader returns a Reader of the frames in r.
func NewReader(r io.Reader) *Reader { return &Reader{r: r} }

// ReadFrame reads the next frame. Its Payload is valid until the next call.
// At the end of the stream between frames it returns io.EOF; inside a frame,
// an error wrapping io.ErrUnexpectedEOF.
func (r *Reader) ReadFrame() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	if err := r.readFull(r.hdr[:], &r.hn); err != nil {
		return Frame{}, r.fail(err)
	}
	if !r.parsed {
		if err := r.parseHeader(); err != nil {
			r.err = err
			return Frame{}, err
		}
		r.parsed = true
		r.buf, r.bn = r.buf[:0], 0
	}
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
	crc := crc32.Update(crc32.Checksum(r.hdr[:], castagnoli), castagnoli, payload)
	if got := binary.LittleEndian.Uint32(r.buf[r.plen:need]); got != crc {
		r.err = fmt.Errorf("%w: %v frame of %d bytes: CRC-32C %#08x, computed %#08x", ErrChecksum, r.typ, r.plen, got, crc)
		return Frame{}, r.err
	}
	r.hn, r.parsed = 0, false
	return Frame{Type: r.typ, Flags: r.flags, Payload: payload}, nil
}

// ReadMessage reads the next frame and decodes its message. The message does
// not share memory with the Reader. A message that fails to decode is an
// ErrMalformed; the stream is still in step, so it is not sticky.
func (r *Reader) ReadMessage() (Message, error) {
	f, err := r.ReadFrame()
	if err != nil {
		return nil, err
	}
	return Decode(f.Type, f.Payload)
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
		r.err = fmt.Errorf("wire: frame truncated after %d bytes: %w", r.hn+r.bn, io.ErrUnexpectedEOF)
	default:
		r.err = fmt.Errorf("wire: read frame: %w", err)
	}
	return r.err
}
