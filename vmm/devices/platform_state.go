package devices

import (
	"fmt"
)

// PlatformState is the saved state of a Linux machine's platform devices
// besides the serial port: the ACPI PM1a enable and control registers
// (acpipm.go) and the keyboard controller's pending output-port write
// (i8042.go). The power-off and reset callbacks are not state.
type PlatformState struct {
	ACPIEnable  uint16 // PM1a enable
	ACPIControl uint16 // PM1a control (SCI_EN always reads as set)
	// KbdWriteOutput says the keyboard controller took command 0xd1 and
	// waits for the output-port value.
	KbdWriteOutput bool
}

// Encoding (the body of a state's platform section):
//
//	PM1a enable u16 | PM1a control u16 | keyboard flags u8 (bit 0: write
//	output pending) | reserved 3 bytes (0)

const platformStateLen = 8

// SavePlatform returns the state of a machine's ACPI PM and keyboard
// controller; the machine is paused.
func SavePlatform(pm *ACPIPM, kbd *I8042) PlatformState {
	pm.mu.Lock()
	s := PlatformState{ACPIEnable: pm.enable, ACPIControl: pm.control}
	pm.mu.Unlock()
	kbd.mu.Lock()
	s.KbdWriteOutput = kbd.writeOutput
	kbd.mu.Unlock()
	return s
}

// RestorePlatform puts s into devices whose guest has not run.
func RestorePlatform(pm *ACPIPM, kbd *I8042, s PlatformState) {
	pm.mu.Lock()
	pm.enable, pm.control = s.ACPIEnable, s.ACPIControl
	pm.mu.Unlock()
	kbd.mu.Lock()
	kbd.writeOutput = s.KbdWriteOutput
	kbd.mu.Unlock()
}

func (s *PlatformState) AppendBinary(b []byte) []byte {
	b = le.AppendUint16(b, s.ACPIEnable)
	b = le.AppendUint16(b, s.ACPIControl)
	var flags byte
	if s.KbdWriteOutput {
		flags = 1
	}
	return append(b, flags, 0, 0, 0)
}

// DecodePlatformState decodes a platform section body.
func DecodePlatformState(b []byte) (PlatformState, error) {
	var s PlatformState
	if len(b) != platformStateLen {
		return s, fmt.Errorf("%w: platform section is %d bytes, want %d", ErrBadState, len(b), platformStateLen)
	}
	if b[4]&^1 != 0 || b[5] != 0 || b[6] != 0 || b[7] != 0 {
		return s, fmt.Errorf("%w: platform section: unknown keyboard flags %#x or reserved bytes set", ErrBadState, b[4])
	}
	s.ACPIEnable, s.ACPIControl, s.KbdWriteOutput = le.Uint16(b), le.Uint16(b[2:]), b[4] == 1
	return s, nil
}
