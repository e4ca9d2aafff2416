package devices

import (
	"fmt"
)

// DebugPortState is the saved state of the debug-port device. Its console
// and callbacks are not state: a restored machine gets them from its
// RestoreConfig.
type DebugPortState struct {
	// Records is the number of output records emitted so far.
	Records uint64
	// RecordHigh holds, per vCPU, the high half last written to the record
	// port, which the device combines with each low half.
	RecordHigh []uint32
}

// Encoding (the body of the state's debug port section):
//
//	records u64 | vCPUs u32 | reserved u32 (0) | record high half u32 × vCPUs

const debugPortStateFixed = 16

// save returns the device's state. The machine is paused, so no vCPU
// touches it.
func (d *DebugPort) Save() DebugPortState {
	return DebugPortState{Records: d.records.Load(), RecordHigh: append([]uint32(nil), d.recHi...)}
}

// restore puts s into a device that has not run.
func (d *DebugPort) Restore(s DebugPortState) error {
	if err := s.Validate(len(d.recHi)); err != nil {
		return fmt.Errorf("debug port: %w", err)
	}
	d.records.Store(s.Records)
	copy(d.recHi, s.RecordHigh)
	return nil
}

func (s *DebugPortState) Validate(ncpus int) error {
	if len(s.RecordHigh) != ncpus {
		return fmt.Errorf("record high halves for %d vCPUs, the machine has %d", len(s.RecordHigh), ncpus)
	}
	return nil
}

func (s *DebugPortState) AppendBinary(b []byte) []byte {
	b = le.AppendUint64(b, s.Records)
	b = le.AppendUint32(b, uint32(len(s.RecordHigh)))
	b = le.AppendUint32(b, 0)
	for _, h := range s.RecordHigh {
		b = le.AppendUint32(b, h)
	}
	return b
}

// DecodeDebugPortState decodes the section body b of a machine with ncpus
// vCPUs.
func DecodeDebugPortState(b []byte, ncpus int) (DebugPortState, error) {
	var s DebugPortState
	if len(b) < debugPortStateFixed {
		return s, fmt.Errorf("%w: debug port section is %d bytes, at least %d", ErrBadState, len(b), debugPortStateFixed)
	}
	n, res := le.Uint32(b[8:]), le.Uint32(b[12:])
	switch {
	case res != 0:
		return s, fmt.Errorf("%w: debug port section: reserved field is %#x, want 0", ErrBadState, res)
	case n != uint32(ncpus):
		return s, fmt.Errorf("%w: debug port section has %d vCPUs, the machine %d", ErrBadState, n, ncpus)
	case len(b) != debugPortStateFixed+4*ncpus:
		return s, fmt.Errorf("%w: debug port section is %d bytes, want %d for %d vCPUs", ErrBadState, len(b), debugPortStateFixed+4*ncpus, ncpus)
	}
	s.Records = le.Uint64(b)
	s.RecordHigh = make([]uint32, ncpus)
	for i := range s.RecordHigh {
		s.RecordHigh[i] = le.Uint32(b[debugPortStateFixed+4*i:])
	}
	return s, nil
}
