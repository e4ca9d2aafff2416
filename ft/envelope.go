package ft

import (
	"encoding/binary"
	"fmt"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// A checkpoint's state blob is an envelope around the machine state that
// also carries the output the primary held when it took the checkpoint,
// covered by this or an earlier epoch and not yet released: a payload
// guest's output records, and a Linux guest's transmitted frames and
// console bytes. When a backup activates at epoch e, it releases them
// first (records to OnRecord, frames to its taps before the guest
// transmits, console bytes to its console), so the output goes on unbroken
// even if the primary died after the intermediary acknowledged e but
// before the acknowledgement reached it. Output the primary did release in
// that window comes out twice: a client drops records it has seen by their
// sequence, TCP drops a duplicate segment.
//
// Version 2 (what seal writes for a guest without carried heat):
//
//	magic "USENV\x00\x00\x02" | machine state length u64 | machine state |
//	record count u32 | count × (vCPU u32 | value u64) |
//	frames length u64 | frames (virtio.AppendHeldFrames's encoding; empty: none) |
//	console length u32 | console bytes
//
// Version 3 ("USENV\x00\x00\x03", what seal writes when the primary's
// large-page controller gave its heat) is version 2 followed by
//
//	heat length u32 (1..mmu.MaxHeatBytes) | heat (mmu.Heat's encoding)
//
// the regions' count values and which regions are mapped large, so that an
// activated backup starts its controller from them (mmu.DecodeHeat checks
// the section). Version 1 ("USENV\x00\x00\x01") ends after the records;
// versions 1 and 2 are still read. Integers are little-endian; nothing may follow the last section.
// Every section is checked when an envelope is opened (the carried frames
// are decoded whole), and the intermediary and the backup open every
// envelope they receive before they acknowledge or commit its checkpoint,
// so a corrupt one is refused there rather than found at a failover.
const (
	envelopeMagic   = "USENV\x00\x00\x02"
	envelopeMagicV1 = "USENV\x00\x00\x01"
	envelopeMagicV3 = "USENV\x00\x00\x03"
	// envelopeFamily is the prefix every version shares.
	envelopeFamily = "USENV\x00\x00"
)

// maxHeld bounds the records one envelope may carry.
const maxHeld = 1 << 22

// maxConsoleHeld bounds the console bytes one envelope may carry, and the
// console bytes a primary holds before it pauses a guest whose
// intermediary does not acknowledge (see consoleGate).
const maxConsoleHeld = 4 << 20

// envelope is what a checkpoint's state blob holds.
type envelope struct {
	Machine []byte       // the encoded vmm.MachineState
	Records []vmm.Record // held output records
	Frames  []byte       // held frames, encoded (vmm.Machine.SealNetOutput); nil: none
	Console []byte       // held console bytes
	// Heat is the primary's large-page heat (an encoded mmu.Heat) at the
	// checkpoint; nil: none (a version 2 envelope).
	Heat []byte
}

// seal encodes e (version 3 if it carries heat, else version 2).
func (e *envelope) seal() []byte {
	b := make([]byte, 0, len(envelopeMagic)+8+len(e.Machine)+4+12*len(e.Records)+8+len(e.Frames)+4+len(e.Console)+4+len(e.Heat))
	if len(e.Heat) > 0 {
		b = append(b, envelopeMagicV3...)
	} else {
		b = append(b, envelopeMagic...)
	}
	b = binary.LittleEndian.AppendUint64(b, uint64(len(e.Machine)))
	b = append(b, e.Machine...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(e.Records)))
	for _, r := range e.Records {
		b = binary.LittleEndian.AppendUint32(b, uint32(r.CPU))
		b = binary.LittleEndian.AppendUint64(b, r.Value)
	}
	b = binary.LittleEndian.AppendUint64(b, uint64(len(e.Frames)))
	b = append(b, e.Frames...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(e.Console)))
	b = append(b, e.Console...)
	if len(e.Heat) > 0 {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(e.Heat)))
		b = append(b, e.Heat...)
	}
	return b
}

// sealState is the envelope of a payload guest's checkpoint: the machine
// state and its held records.
func sealState(machine []byte, held []vmm.Record) []byte {
	e := envelope{Machine: machine, Records: held}
	return e.seal()
}

// openState splits an envelope into the machine state and the held records
// (checking every section).
func openState(b []byte) (machine []byte, held []vmm.Record, err error) {
	e, err := openEnvelope(b)
	return e.Machine, e.Records, err
}

// openEnvelope decodes and checks an envelope of any version. Machine,
// Frames, Console and Heat alias b.
func openEnvelope(b []byte) (envelope, error) {
	var e envelope
	if len(b) < len(envelopeMagic)+8 {
		return e, badf("state envelope: bad magic")
	}
	magic := string(b[:len(envelopeMagic)])
	v3 := magic == envelopeMagicV3
	v2 := magic == envelopeMagic || v3 // version 3 is version 2 and heat
	if !v2 && magic != envelopeMagicV1 {
		return e, badf("state envelope: bad magic")
	}
	b = b[len(envelopeMagic):]
	n := binary.LittleEndian.Uint64(b)
	b = b[8:]
	if n > uint64(len(b)) || uint64(len(b))-n < 4 {
		return e, badf("state envelope: machine state of %d bytes in %d", n, len(b))
	}
	e.Machine, b = b[:n], b[n:]
	count := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if count > maxHeld || uint64(len(b)) < uint64(count)*12 || !v2 && uint64(len(b)) != uint64(count)*12 {
		return e, badf("state envelope: %d held records in %d bytes", count, len(b))
	}
	e.Records = make([]vmm.Record, count)
	for i := range e.Records {
		e.Records[i] = vmm.Record{CPU: int(binary.LittleEndian.Uint32(b)), Value: binary.LittleEndian.Uint64(b[4:])}
		if e.Records[i].CPU >= vmm.MaxCPUs {
			return e, fmt.Errorf("%w: state envelope: record from vCPU %d", ErrBadCheckpoint, e.Records[i].CPU)
		}
		b = b[12:]
	}
	if !v2 {
		return e, nil
	}
	if len(b) < 8 {
		return e, badf("state envelope: ends before the carried frames")
	}
	n = binary.LittleEndian.Uint64(b)
	b = b[8:]
	if n > uint64(len(b)) || uint64(len(b))-n < 4 {
		return e, badf("state envelope: carried frames of %d bytes in %d", n, len(b))
	}
	if n > 0 {
		e.Frames = b[:n]
		if _, err := virtio.DecodeHeldFrames(e.Frames); err != nil {
			return e, fmt.Errorf("%w: state envelope: %w", ErrBadCheckpoint, err)
		}
	}
	b = b[n:]
	c := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if c > maxConsoleHeld || uint64(len(b)) < uint64(c) || !v3 && uint64(len(b)) != uint64(c) {
		return e, badf("state envelope: %d held console bytes in %d", c, len(b))
	}
	if c > 0 {
		e.Console = b[:c]
	}
	b = b[c:]
	if !v3 {
		return e, nil
	}
	if len(b) < 4 {
		return e, badf("state envelope: ends before the carried heat")
	}
	n = uint64(binary.LittleEndian.Uint32(b))
	b = b[4:]
	if n == 0 || n > uint64(mmu.MaxHeatBytes) || uint64(len(b)) != n {
		return e, badf("state envelope: carried heat of %d bytes in %d", n, len(b))
	}
	if _, err := mmu.DecodeHeat(b); err != nil {
		return e, fmt.Errorf("%w: state envelope: %w", ErrBadCheckpoint, err)
	}
	e.Heat = b
	return e, nil
}

// checkEnvelope checks a received checkpoint's state: a state that is an
// envelope (every primary seals one) must open whole, carried frames and
// all, and the machine state it holds must pass vmm.ValidateState: it
// decodes, and each virtio transport's queues lie in the state's guest
// memory and agree with their sizes, so that the backup could restore it.
// Bytes of another form, and an envelope's machine bytes that do not begin
// as an encoded machine state does (vmm.IsEncodedState), are left to the
// machine state's own decoding at activation (the protocol's tests send
// opaque states); every primary sends an envelope around an encoded state.
func checkEnvelope(state []byte) error {
	if len(state) < len(envelopeFamily) || string(state[:len(envelopeFamily)]) != envelopeFamily {
		return nil
	}
	e, err := openEnvelope(state)
	if err != nil {
		return err
	}
	if vmm.IsEncodedState(e.Machine) {
		if err := vmm.ValidateState(e.Machine); err != nil {
			return fmt.Errorf("%w: state envelope: machine state: %w", ErrBadCheckpoint, err)
		}
	}
	return nil
}
