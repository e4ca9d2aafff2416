package virtio

import (
	"errors"
	"fmt"
)

// HeldFrame is one frame a checkpoint carries: transmitted by the guest
// before the checkpoint, held by the primary's output gate and not yet
// released when the checkpoint was sealed. The activated backup writes
// the carried frames to its taps before the guest transmits anything new
// (Net.SendCarried), so none is lost when the primary dies between the
// acknowledgement of the checkpoint and the release. A frame the primary
// did release in that window is sent twice, which Ethernet allows (TCP
// drops the duplicate).
//
// Why the frames travel beside the device state rather than in NetState:
// a device state is bounded (MaxTransportStateSize) and is part of every
// snapshot, while the held frames may reach the gate's bounds (16 MiB by
// default, up to MaxEgressBytes), exist only for a protected machine, and
// are output to send once, not state to restore; the checkpoint's envelope
// carries them next to the machine state, exactly as it carries a payload
// guest's held output records.
type HeldFrame struct {
	NIC   int    // which virtio-net device, in the machine's device order (0 for the first)
	Epoch uint64 // the checkpoint that covers it
	Data  []byte // the Ethernet frame, without a virtio-net header
}

// Encoding of a list of held frames (little-endian):
//
//	magic "USHELDFR" | version u16 (1) | reserved u16 (0) | frame count u32 | total frame bytes u64 |
//	per frame: NIC u16 (< MaxCarriedNICs) | reserved u16 (0) | length u32 (0..NetMaxFrame) | epoch u64 | frame
//
// Frames of one NIC come in order, their epochs never decreasing; nothing
// follows the last frame.
const (
	heldFramesMagic   = "USHELDFR"
	heldFramesVersion = 1
	heldFramesFixed   = len(heldFramesMagic) + 2 + 2 + 4 + 8
	heldFrameHeader   = 2 + 2 + 4 + 8

	// MaxCarriedNICs bounds the NIC index of a carried frame.
	MaxCarriedNICs = 64
	// MaxCarriedFrames and MaxCarriedBytes bound what one encoding may
	// carry: every NIC's gate full at its largest bounds.
	MaxCarriedFrames = MaxCarriedNICs * MaxEgressFrames
	MaxCarriedBytes  = MaxCarriedNICs * MaxEgressBytes
)

// ErrBadHeldFrames is wrapped by DecodeHeldFrames's and AppendHeldFrames's
// errors.
var ErrBadHeldFrames = errors.New("bad carried frames")

func badHeld(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadHeldFrames, fmt.Sprintf(format, args...))
}

// checkHeld validates frame i against the previous epoch of each NIC.
func checkHeld(i int, f *HeldFrame, last map[int]uint64) error {
	switch {
	case f.NIC < 0 || f.NIC >= MaxCarriedNICs:
		return badHeld("frame %d is for NIC %d, want 0 to %d", i, f.NIC, MaxCarriedNICs-1)
	case len(f.Data) > NetMaxFrame:
		return badHeld("frame %d is %d bytes, at most %d", i, len(f.Data), NetMaxFrame)
	}
	if e, ok := last[f.NIC]; ok && f.Epoch < e {
		return badHeld("frame %d of NIC %d is of epoch %d, after a frame of epoch %d", i, f.NIC, f.Epoch, e)
	}
	last[f.NIC] = f.Epoch
	return nil
}

// AppendHeldFrames appends the encoding of frames to b. Frames that break
// the encoding's rules are refused (ErrBadHeldFrames) and b returned as it
// was.
func AppendHeldFrames(b []byte, frames []HeldFrame) ([]byte, error) {
	if len(frames) > MaxCarriedFrames {
		return b, badHeld("%d frames, at most %d", len(frames), MaxCarriedFrames)
	}
	last := map[int]uint64{}
	var total uint64
	for i := range frames {
		if err := checkHeld(i, &frames[i], last); err != nil {
			return b, err
		}
		total += uint64(len(frames[i].Data))
	}
	if total > MaxCarriedBytes {
		return b, badHeld("%d frame bytes, at most %d", total, MaxCarriedBytes)
	}
	b = append(b, heldFramesMagic...)
	b = le.AppendUint16(b, heldFramesVersion)
	b = le.AppendUint16(b, 0)
	b = le.AppendUint32(b, uint32(len(frames)))
	b = le.AppendUint64(b, total)
	for _, f := range frames {
		b = le.AppendUint16(b, uint16(f.NIC))
		b = le.AppendUint16(b, 0)
		b = le.AppendUint32(b, uint32(len(f.Data)))
		b = le.AppendUint64(b, f.Epoch)
		b = append(b, f.Data...)
	}
	return b, nil
}

// DecodeHeldFrames decodes an encoding from AppendHeldFrames. Everything
// is checked (magic, version, reserved fields, counts, lengths, NIC
// indices, epoch order, the total, no trailing bytes); the first problem
// is returned wrapping ErrBadHeldFrames. The frames' Data are copies in
// one buffer, not slices of b. An empty b decodes as no frames (a
// checkpoint of a machine whose output is not held).
func DecodeHeldFrames(b []byte) ([]HeldFrame, error) {
	if len(b) == 0 {
		return nil, nil
	}
	if len(b) < heldFramesFixed || string(b[:len(heldFramesMagic)]) != heldFramesMagic {
		return nil, badHeld("no %q header", heldFramesMagic)
	}
	p := b[len(heldFramesMagic):]
	if v := le.Uint16(p); v != heldFramesVersion {
		return nil, badHeld("version %d, want %d", v, heldFramesVersion)
	}
	if r := le.Uint16(p[2:]); r != 0 {
		return nil, badHeld("reserved field %#x, want 0", r)
	}
	count := uint64(le.Uint32(p[4:]))
	total := le.Uint64(p[8:])
	rest := b[heldFramesFixed:]
	switch {
	case count > MaxCarriedFrames:
		return nil, badHeld("%d frames, at most %d", count, MaxCarriedFrames)
	case total > MaxCarriedBytes:
		return nil, badHeld("%d frame bytes, at most %d", total, MaxCarriedBytes)
	case uint64(len(rest)) != count*heldFrameHeader+total:
		return nil, badHeld("%d frames of %d bytes need %d bytes after the header, have %d",
			count, total, count*heldFrameHeader+total, len(rest))
	}
	data := make([]byte, 0, total)
	frames := make([]HeldFrame, count)
	last := map[int]uint64{}
	for i := range frames {
		if len(rest) < heldFrameHeader {
			return nil, badHeld("ends inside frame %d's header", i)
		}
		f := &frames[i]
		f.NIC = int(le.Uint16(rest))
		if r := le.Uint16(rest[2:]); r != 0 {
			return nil, badHeld("frame %d: reserved field %#x, want 0", i, r)
		}
		size := uint64(le.Uint32(rest[4:]))
		f.Epoch = le.Uint64(rest[8:])
		rest = rest[heldFrameHeader:]
		if size > NetMaxFrame || size > uint64(len(rest)) {
			return nil, badHeld("frame %d is %d bytes (%d left), at most %d", i, size, len(rest), NetMaxFrame)
		}
		start := len(data)
		data = append(data, rest[:size]...)
		f.Data = data[start:len(data):len(data)]
		rest = rest[size:]
		if err := checkHeld(i, f, last); err != nil {
			return nil, err
		}
	}
	if len(rest) != 0 || uint64(len(data)) != total {
		return nil, badHeld("%d bytes after the last frame, frames of %d bytes for a total of %d", len(rest), len(data), total)
	}
	return frames, nil
}
