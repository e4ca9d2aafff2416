package devices

import (
	"fmt"
)

// UARTState is the saved state of the serial port: its registers and the
// bytes in its receive FIFO. The line status and the interrupt line follow
// from these. Input not yet in the FIFO stays with the console reader.
type UARTState struct {
	IER, FCR, LCR, MCR, MSR, SCR uint8
	DLL, DLM                     uint8 // divisor latch
	// THRPending says the transmitter-empty interrupt is pending (it is
	// cleared by reading IIR or writing THR).
	THRPending bool
	// RX is the receive FIFO, oldest byte first (at most 16 bytes).
	RX []byte
}

// Encoding (the body of a state's UART section):
//
//	IER u8 | FCR u8 | LCR u8 | MCR u8 | MSR u8 | SCR u8 | DLL u8 | DLM u8 |
//	THR pending u8 (0 or 1) | FIFO length u8 (0..16) | reserved u16 (0) |
//	FIFO bytes

const uartStateFixed = 12

// save returns the UART's state. The machine is paused, so no vCPU touches
// the registers; the reader goroutine may still be waiting to add input.
func (u *UART) Save() UARTState {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := u.regs
	s.RX = append([]byte(nil), u.regs.RX...)
	return s
}

// restore puts s into a UART whose guest has not run, and sets the
// interrupt line to match.
func (u *UART) Restore(s UARTState) error {
	if err := s.Validate(); err != nil {
		return fmt.Errorf("serial port: %w", err)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.regs = s
	u.regs.RX = append(make([]byte, 0, uartFIFOLen), s.RX...)
	u.line = u.iir()&iirNoInt == 0
	if u.irq != nil {
		if err := u.irq(u.line); err != nil {
			return fmt.Errorf("serial port: set interrupt line: %w", err)
		}
	}
	return nil
}

func (s *UARTState) Validate() error {
	switch {
	case s.IER&^ierMask != 0:
		return fmt.Errorf("IER %#x has bits beyond %#x", s.IER, ierMask)
	case s.MCR&^mcrMask != 0:
		return fmt.Errorf("MCR %#x has bits beyond %#x", s.MCR, mcrMask)
	case s.FCR&(fcrClearRX|fcrClearTX) != 0:
		return fmt.Errorf("FCR %#x has self-clearing bits set", s.FCR)
	case len(s.RX) > uartFIFOLen:
		return fmt.Errorf("receive FIFO holds %d bytes, at most %d", len(s.RX), uartFIFOLen)
	}
	return nil
}

func (s *UARTState) AppendBinary(b []byte) []byte {
	var thr uint8
	if s.THRPending {
		thr = 1
	}
	b = append(b, s.IER, s.FCR, s.LCR, s.MCR, s.MSR, s.SCR, s.DLL, s.DLM, thr, uint8(len(s.RX)))
	b = le.AppendUint16(b, 0)
	return append(b, s.RX...)
}

// DecodeUARTState decodes a UART section body.
func DecodeUARTState(b []byte) (UARTState, error) {
	var s UARTState
	if len(b) < uartStateFixed {
		return s, fmt.Errorf("%w: UART section is %d bytes, at least %d", ErrBadState, len(b), uartStateFixed)
	}
	n := int(b[9])
	switch {
	case b[8] > 1:
		return s, fmt.Errorf("%w: UART section: THR pending is %d, want 0 or 1", ErrBadState, b[8])
	case le.Uint16(b[10:]) != 0:
		return s, fmt.Errorf("%w: UART section: reserved field is %#x, want 0", ErrBadState, le.Uint16(b[10:]))
	case len(b) != uartStateFixed+n:
		return s, fmt.Errorf("%w: UART section is %d bytes, want %d for a %d-byte FIFO", ErrBadState, len(b), uartStateFixed+n, n)
	}
	s = UARTState{IER: b[0], FCR: b[1], LCR: b[2], MCR: b[3], MSR: b[4], SCR: b[5], DLL: b[6], DLM: b[7], THRPending: b[8] == 1}
	s.RX = append([]byte{}, b[uartStateFixed:]...)
	if err := s.Validate(); err != nil {
		return s, fmt.Errorf("%w: UART section: %v", ErrBadState, err)
	}
	return s, nil
}
