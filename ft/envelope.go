package ft

import (
	"encoding/binary"
	"fmt"

	"github.com/understudy-vmm/understudy/vmm"
)

// A checkpoint's state blob is an envelope around the machine state that
// also carries the output the primary held when it took the checkpoint:
// records covered by this or an earlier epoch that it had not yet released.
// When a backup activates at epoch e, it releases those records first (a
// client drops the ones it has already seen by their sequence), so the
// client's sequence goes on unbroken even if the primary died after the
// intermediary acknowledged e but before the acknowledgement reached it.
//
//	magic "USENV\x00\x00\x01" | machine state length u64 | machine state |
//	record count u32 | count × (vCPU u32 | value u64)
//
// Integers are little-endian; nothing may follow the last record.
const envelopeMagic = "USENV\x00\x00\x01"

// maxHeld bounds the records one envelope may carry.
const maxHeld = 1 << 22

func sealState(machine []byte, held []vmm.Record) []byte {
	b := make([]byte, 0, len(envelopeMagic)+8+len(machine)+4+12*len(held))
	b = append(b, envelopeMagic...)
	b = binary.LittleEndian.AppendUint64(b, uint64(len(machine)))
	b = append(b, machine...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(held)))
	for _, r := range held {
		b = binary.LittleEndian.AppendUint32(b, uint32(r.CPU))
		b = binary.LittleEndian.AppendUint64(b, r.Value)
	}
	return b
}

// openState splits an envelope into the machine state and the held records.
func openState(b []byte) (machine []byte, held []vmm.Record, err error) {
	if len(b) < len(envelopeMagic)+8 || string(b[:len(envelopeMagic)]) != envelopeMagic {
		return nil, nil, badf("state envelope: bad magic")
	}
	b = b[len(envelopeMagic):]
	n := binary.LittleEndian.Uint64(b)
	b = b[8:]
	if n > uint64(len(b)) || uint64(len(b))-n < 4 {
		return nil, nil, badf("state envelope: machine state of %d bytes in %d", n, len(b))
	}
	machine, b = b[:n], b[n:]
	count := binary.LittleEndian.Uint32(b)
	b = b[4:]
	if count > maxHeld || uint64(len(b)) != uint64(count)*12 {
		return nil, nil, badf("state envelope: %d held records in %d bytes", count, len(b))
	}
	held = make([]vmm.Record, count)
	for i := range held {
		held[i] = vmm.Record{CPU: int(binary.LittleEndian.Uint32(b)), Value: binary.LittleEndian.Uint64(b[4:])}
		if held[i].CPU >= vmm.MaxCPUs {
			return nil, nil, fmt.Errorf("%w: state envelope: record from vCPU %d", ErrBadCheckpoint, held[i].CPU)
		}
		b = b[12:]
	}
	return machine, held, nil
}
