package ft

import (
	"bytes"
	"errors"
	"reflect"
	"testing"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

func TestStateEnvelope(t *testing.T) {
	held := []vmm.Record{{CPU: 0, Value: 7}, {CPU: 1, Value: 8}}
	b := sealState([]byte("machine"), held)
	m, h, err := openState(b)
	if err != nil || string(m) != "machine" || !reflect.DeepEqual(h, held) {
		t.Fatalf("openState(sealState()) = %q, %v, %v", m, h, err)
	}
	if _, h, err := openState(sealState(nil, nil)); err != nil || len(h) != 0 {
		t.Errorf("empty envelope: %v, %v", h, err)
	}
	for i := 0; i < len(b); i++ {
		if _, _, err := openState(b[:i]); !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openState(truncated to %d) = %v, want ErrBadCheckpoint", i, err)
		}
	}
	if _, _, err := openState(append(bytes.Clone(b), 0)); err == nil {
		t.Errorf("openState with a trailing byte succeeded")
	}
	if _, _, err := openState(sealState(nil, []vmm.Record{{CPU: 999}})); err == nil {
		t.Errorf("openState with a record from vCPU 999 succeeded")
	}
}

func FuzzOpenState(f *testing.F) {
	f.Add(sealState([]byte("m"), []vmm.Record{{Value: 1}}))
	f.Add([]byte(envelopeMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, h, err := openState(b)
		if err != nil {
			return
		}
		if !bytes.Equal(sealState(m, h), b) {
			t.Errorf("openState(%x) does not re-seal to its input", b)
		}
	})
}

// A Linux guest's envelope carries frames and console bytes; every section
// is checked, the carried frames decoded whole.
func TestStateEnvelopeLinux(t *testing.T) {
	frames, err := virtio.AppendHeldFrames(nil, []virtio.HeldFrame{{NIC: 0, Epoch: 3, Data: []byte("frame one")}, {NIC: 1, Epoch: 4, Data: []byte("frame two")}})
	if err != nil {
		t.Fatal(err)
	}
	in := envelope{Machine: []byte("machine"), Frames: frames, Console: []byte("login: ")}
	b := in.seal()
	got, err := openEnvelope(b)
	if err != nil || string(got.Machine) != "machine" || !bytes.Equal(got.Frames, frames) || string(got.Console) != "login: " || len(got.Records) != 0 {
		t.Fatalf("openEnvelope(seal()) = %+v, %v", got, err)
	}
	if err := checkEnvelope(b); err != nil {
		t.Errorf("checkEnvelope(good) = %v", err)
	}
	for i := 0; i < len(b); i++ {
		if _, err := openEnvelope(b[:i]); !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openEnvelope(truncated to %d) = %v, want ErrBadCheckpoint", i, err)
		}
	}
	// Corrupt the carried frames' section: each byte of its header (magic,
	// version, reserved, count, total) and of its first frame's header
	// (NIC, reserved, length). (A frame's bytes have no sum of their own:
	// the checkpoint's digest covers them.)
	start := len(envelopeMagic) + 8 + len("machine") + 4 + 8
	for i := start; i < start+24+8; i++ {
		c := bytes.Clone(b)
		c[i] ^= 0x80
		_, err := openEnvelope(c)
		if !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openEnvelope with carried-frames byte %d flipped = %v, want ErrBadCheckpoint", i-start, err)
		}
		if checkEnvelope(c) == nil {
			t.Errorf("checkEnvelope with carried-frames byte %d flipped accepted it", i-start)
		}
	}
	// A version 1 envelope (records only) is still read.
	v1 := append([]byte(envelopeMagicV1), 1, 0, 0, 0, 0, 0, 0, 0, 'm', 1, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0)
	if e, err := openEnvelope(v1); err != nil || string(e.Machine) != "m" || len(e.Records) != 1 || e.Records[0] != (vmm.Record{CPU: 2, Value: 9}) {
		t.Errorf("openEnvelope(v1) = %+v, %v", e, err)
	}
	// A state that is no envelope is left to the machine state's decoder.
	if err := checkEnvelope([]byte("state")); err != nil {
		t.Errorf("checkEnvelope(opaque) = %v", err)
	}
	if err := checkEnvelope([]byte("USENV\x00\x00\x09 and more bytes")); err == nil {
		t.Errorf("checkEnvelope(unknown version) accepted it")
	}
}

func FuzzOpenEnvelope(f *testing.F) {
	frames, _ := virtio.AppendHeldFrames(nil, []virtio.HeldFrame{{Epoch: 1, Data: []byte("f")}})
	e := envelope{Machine: []byte("m"), Records: []vmm.Record{{Value: 1}}, Frames: frames, Console: []byte("c")}
	f.Add(e.seal())
	f.Add(sealState(nil, nil))
	e.Heat = testHeat(f)
	f.Add(e.seal())
	f.Add((&envelope{Heat: e.Heat}).seal())
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := openEnvelope(b)
		if err != nil {
			if checkEnvelope(b) == nil && len(b) >= len(envelopeFamily) && string(b[:len(envelopeFamily)]) == envelopeFamily {
				t.Errorf("checkEnvelope accepts %x, which openEnvelope refuses", b)
			}
			return
		}
		if _, err := virtio.DecodeHeldFrames(e.Frames); err != nil {
			t.Errorf("openEnvelope(%x) accepted carried frames that do not decode: %v", b, err)
		}
		if e.Heat != nil {
			if _, err := mmu.DecodeHeat(e.Heat); err != nil {
				t.Errorf("openEnvelope(%x) accepted carried heat that does not decode: %v", b, err)
			}
		}
		if magic := string(b[:len(envelopeMagic)]); (magic == envelopeMagic || magic == envelopeMagicV3) && !bytes.Equal(e.seal(), b) {
			t.Errorf("openEnvelope(%x) does not re-seal to its input", b)
		}
	})
}

// testHeat is an encoded mmu.Heat: three regions, one of them large.
func testHeat(tb testing.TB) []byte {
	h, err := mmu.Heat{Counts: []mmu.RegionHeat{{Region: 3, Count: 200}, {Region: 5, Count: 12.5}, {Region: 40, Count: 1}}, Large: []uint64{3}}.MarshalBinary()
	if err != nil {
		tb.Fatal(err)
	}
	return h
}

// A checkpoint of a primary whose large-page controller gave its heat
// carries it in a version 3 envelope, checked whole; without heat the
// envelope stays version 2.
func TestStateEnvelopeHeat(t *testing.T) {
	heat := testHeat(t)
	in := envelope{Machine: []byte("machine"), Records: []vmm.Record{{CPU: 1, Value: 4}}, Console: []byte("ok"), Heat: heat}
	b := in.seal()
	if string(b[:len(envelopeMagicV3)]) != envelopeMagicV3 {
		t.Fatalf("an envelope with heat sealed as %q, want version 3", b[:len(envelopeMagicV3)])
	}
	got, err := openEnvelope(b)
	if err != nil || string(got.Machine) != "machine" || string(got.Console) != "ok" || !bytes.Equal(got.Heat, heat) || len(got.Records) != 1 {
		t.Fatalf("openEnvelope(seal()) = %+v, %v", got, err)
	}
	if err := checkEnvelope(b); err != nil {
		t.Errorf("checkEnvelope(good) = %v", err)
	}
	if h, err := mmu.DecodeHeat(got.Heat); err != nil || len(h.Counts) != 3 || len(h.Large) != 1 {
		t.Errorf("carried heat decodes to %+v, %v", h, err)
	}
	for i := 0; i < len(b); i++ {
		if _, err := openEnvelope(b[:i]); !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openEnvelope(truncated to %d) = %v, want ErrBadCheckpoint", i, err)
		}
	}
	if _, err := openEnvelope(append(bytes.Clone(b), 0)); !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("openEnvelope with a trailing byte = %v", err)
	}
	// Every byte of the heat's header (magic, version, reserved, count)
	// and its first entry's count bits that make it out of range.
	start := len(b) - len(heat)
	for i := start; i < start+12; i++ {
		c := bytes.Clone(b)
		c[i] ^= 0x80
		if _, err := openEnvelope(c); !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("openEnvelope with heat byte %d flipped = %v, want ErrBadCheckpoint", i-start, err)
		}
		if checkEnvelope(c) == nil {
			t.Errorf("checkEnvelope with heat byte %d flipped accepted it", i-start)
		}
	}
	// A version 3 envelope always carries heat; the heat's length is
	// bounded.
	empty := append(bytes.Clone((&envelope{Machine: []byte("m")}).seal()), 0, 0, 0, 0)
	copy(empty, envelopeMagicV3)
	if _, err := openEnvelope(empty); !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("openEnvelope(version 3 with no heat) = %v, want ErrBadCheckpoint", err)
	}
	// Without heat: version 2, as before.
	in.Heat = nil
	if b := in.seal(); string(b[:len(envelopeMagic)]) != envelopeMagic {
		t.Errorf("an envelope without heat sealed as %q, want version 2", b[:len(envelopeMagic)])
	}
}
