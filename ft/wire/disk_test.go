package wire

import (
	"bytes"
	"errors"
	"testing"
)

func TestDiskMessagesRefused(t *testing.T) {
	good := DiskWrites{Epoch: 1, Disk: 0, Disks: 1, Part: 0, Parts: 1, Data: []byte{1}}
	seed := DiskSeed{Epoch: 1, Disk: 0, Disks: 1, Size: 10, Offset: 0, Data: []byte{1}}
	for name, m := range map[string]Message{
		"writes epoch 0":       &DiskWrites{Disk: 0, Disks: 1, Parts: 1, Data: []byte{1}},
		"writes disk >= disks": &DiskWrites{Epoch: 1, Disk: 1, Disks: 1, Parts: 1, Data: []byte{1}},
		"writes no disks":      &DiskWrites{Epoch: 1, Parts: 1, Data: []byte{1}},
		"writes too many":      &DiskWrites{Epoch: 1, Disks: MaxDisks + 1, Parts: 1, Data: []byte{1}},
		"writes part >= parts": &DiskWrites{Epoch: 1, Disks: 1, Part: 1, Parts: 1, Data: []byte{1}},
		"writes no data":       &DiskWrites{Epoch: 1, Disks: 1, Parts: 1},
		"seed size 0":          &DiskSeed{Epoch: 1, Disks: 1, Data: []byte{1}},
		"seed past the end":    &DiskSeed{Epoch: 1, Disks: 1, Size: 10, Offset: 9, Data: []byte{1, 2}},
		"seed at the end":      &DiskSeed{Epoch: 1, Disks: 1, Size: 10, Offset: 10, Data: []byte{1}},
		"seed no data":         &DiskSeed{Epoch: 1, Disks: 1, Size: 10},
		"seed too large":       &DiskSeed{Epoch: 1, Disks: 1, Size: MaxDiskSize + 1, Data: []byte{1}},
	} {
		if _, err := m.MarshalBinary(); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: MarshalBinary() error = %v, want ErrMalformed", name, err)
		}
	}
	for _, m := range []Message{&good, &seed} {
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		// A body that is cut short or has a byte more is refused.
		for _, bad := range [][]byte{b[:len(b)-2], b[:20]} {
			if _, err := Decode(m.Type(), bad); err == nil && len(bad) < 24 {
				t.Errorf("%v: Decode of %d bytes succeeded", m.Type(), len(bad))
			}
		}
	}
}

// FuzzDiskMessages decodes arbitrary bodies as DiskWrites and DiskSeed:
// never a panic, every error ErrMalformed, and what decodes re-encodes to
// the same bytes.
func FuzzDiskMessages(f *testing.F) {
	for _, m := range []Message{
		&DiskWrites{Epoch: 5, Disk: 1, Disks: 2, Part: 3, Parts: 4, Data: []byte("USDW....")},
		&DiskSeed{Epoch: 5, Disk: 0, Disks: 1, Size: 8192, Offset: 4096, Fingerprint: [32]byte{1}, Data: make([]byte, 16)},
	} {
		b, err := m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(m.Type()), b)
	}
	f.Fuzz(func(t *testing.T, typ uint8, body []byte) {
		tt := TypeDiskWrites
		if typ%2 == 1 {
			tt = TypeDiskSeed
		}
		m, err := Decode(tt, body)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("Decode: %v, want ErrMalformed", err)
			}
			return
		}
		again, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		if !bytes.Equal(again, body) {
			t.Fatalf("re-encoded %x, decoded from %x", again, body)
		}
	})
}
