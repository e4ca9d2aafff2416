package vmm

import (
	"fmt"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// What a machine state can be checked for without a machine. Decoding
// (UnmarshalBinary) checks the encoding's own rules; a restore checks the
// state against the machine it builds (KVM, the devices' backends). In
// between, CheckVirtio checks what needs only the state itself: each virtio
// transport against the state's own memory layout and against what any
// device of its type offers. A fault-tolerance intermediary applies
// ValidateState to every checkpoint before it acknowledges it, so a state
// that would fail at restore on the backup is refused while the primary
// still runs, rather than found at a failover.

// IsEncodedState reports whether b begins as an encoded MachineState does
// (its magic). It says nothing about the rest of b.
func IsEncodedState(b []byte) bool {
	return len(b) >= len(stateMagic) && [4]byte(b[:len(stateMagic)]) == stateMagic
}

// ValidateState decodes an encoded machine state as UnmarshalBinary does
// and checks it with CheckVirtio. A state it accepts has no virtio
// transport that a restore into a machine of the state's configuration
// would refuse, except for a reason of the device's own backend (another
// disk, another MAC). Errors wrap ErrBadState. It needs no KVM; a payload
// machine's state (no virtio devices) passes once it decodes.
func ValidateState(b []byte) error {
	var st MachineState
	if err := st.UnmarshalBinary(b); err != nil {
		return err
	}
	return st.CheckVirtio()
}

// CheckVirtio checks each virtio transport of st against st's own
// configuration, with the checks Transport.LoadState applies at a restore
// (virtio.CheckTransportState): the queue count and the negotiated
// features are what a device of its type has and may offer; every ready
// queue's size is a power of 2 within the device's maximum, its descriptor
// table, available ring and used ring (with their lengths) are aligned and
// each inside one memory region of st.Config, and its next available index
// is at most its size ahead of its next used index (mod 2^16). Errors wrap
// ErrBadState and virtio.ErrBadState and name the device.
func (st *MachineState) CheckVirtio() error {
	regions := st.Config.Regions
	inRAM := func(gpa, n uint64) error {
		_, err := mmu.LayoutOffset(regions, gpa, n)
		return err
	}
	for i, v := range st.Devices.Virtio {
		if err := virtio.CheckTransportState(v, inRAM); err != nil {
			return fmt.Errorf("%w: virtio device %d: %w", ErrBadState, i, err)
		}
	}
	return nil
}
