package wire

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzReadFrame feeds arbitrary bytes to a Reader, with and without page
// batches read into placed memory. It must never panic;
// every error must be one of the documented kinds; and every message it
// returns must re-encode to exactly the bytes it was read from.
func FuzzReadFrame(f *testing.F) {
	var all []byte
	for _, m := range samples() {
		b, err := AppendFrame(nil, m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		all = append(all, b...)
	}
	f.Add(all)
	f.Add([]byte("USFT"))
	f.Add(encodeRaw(1, TypeAck, 0, make([]byte, 8)))
	big := &PageBatch{Epoch: 1, Pages: make([]Page, 17)}
	for i := range big.Pages {
		big.Pages[i] = Page{PFN: uint64(i), Sum: uint32(i), Data: page(byte(i))}
	}
	if b, err := AppendFrame(nil, big); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		readAll(t, data, false)
		readAll(t, data, true) // page batches read into placed memory
	})
}

// readAll reads every message of data (placing page batches' data if
// placed) and checks the error kinds and that messages re-encode to the
// bytes they were read from.
func readAll(t *testing.T, data []byte, placed bool) {
	{
		src := bytes.NewReader(data)
		r := NewReader(src)
		if placed {
			r.SetPagePlace(func(n int) []byte { return make([]byte, n*PageSize) })
		}
		for off := 0; ; {
			m, err := r.ReadMessage()
			next := len(data) - src.Len()
			if errors.Is(err, ErrMalformed) && r.err == nil {
				off = next // a bad body; the stream is still in step
				continue
			}
			if err != nil {
				for _, known := range []error{io.EOF, io.ErrUnexpectedEOF, ErrBadMagic, ErrVersion, ErrUnknownType, ErrTooLarge, ErrChecksum, ErrMalformed} {
					if errors.Is(err, known) {
						return
					}
				}
				t.Fatalf("ReadMessage() = %v, not a documented error", err)
			}
			back, err := AppendFrame(nil, m)
			if err != nil {
				t.Fatalf("AppendFrame(ReadMessage()) = %v for %+v", err, m)
			}
			if !bytes.Equal(back, data[off:next]) {
				t.Fatalf("AppendFrame(ReadMessage()) = %x, want the bytes read %x", back, data[off:next])
			}
			off = next
		}
	}
}

// FuzzDecodeMessage feeds arbitrary bodies to every message decoder. A body
// that decodes must re-encode to itself (the encoding is canonical), and a
// rejected one must be an ErrMalformed or ErrUnknownType.
func FuzzDecodeMessage(f *testing.F) {
	for _, m := range samples() {
		b, err := m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(m.Type()), b)
	}
	f.Add(uint8(TypePageBatch), []byte{1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Add(uint8(TypeCompressedBatch), []byte{1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, typ uint8, body []byte) {
		m, err := Decode(Type(typ), body)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrUnknownType) {
				t.Fatalf("Decode(%v, %x) = %v, want ErrMalformed or ErrUnknownType", Type(typ), body, err)
			}
			return
		}
		if m.Type() != Type(typ) {
			t.Fatalf("Decode(%v).Type() = %v", Type(typ), m.Type())
		}
		back, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("MarshalBinary(Decode(%v, %x)) = %v", Type(typ), body, err)
		}
		if !bytes.Equal(back, body) {
			t.Fatalf("MarshalBinary(Decode(%v, %x)) = %x, want the input back", Type(typ), body, back)
		}
	})
}
