package devices

import (
	"errors"
	"fmt"
	"io"
	"sync"
)

// A 16550A UART (8250 family) as Linux's 8250 driver expects it: eight
// registers at base..base+7, the divisor latch behind LCR.DLAB, a receive
// FIFO, interrupt identification by priority, and loopback. Transmitted
// bytes go to the console at once, so the transmitter is always empty.
// Received bytes come from an io.Reader, read by a goroutine that waits
// while the FIFO is full, so no input is lost.

// COM1, the serial console of a Linux guest.
const (
	COM1Port = 0x3f8
	COM1IRQ  = 4
)

// UART register offsets.
const (
	uartRBR = 0 // receive buffer (read), transmit holding (write); DLL with DLAB
	uartIER = 1 // interrupt enable; DLM with DLAB
	uartIIR = 2 // interrupt identification (read), FIFO control (write)
	uartLCR = 3
	uartMCR = 4
	uartLSR = 5
	uartMSR = 6
	uartSCR = 7
)

// Register bits.
const (
	ierRDI  = 0x01 // received data available
	ierTHRI = 0x02 // transmitter holding register empty
	ierRLSI = 0x04 // receiver line status
	ierMSI  = 0x08 // modem status
	ierMask = 0x0f

	iirNoInt    = 0x01
	iirMSI      = 0x00
	iirTHRI     = 0x02
	iirRDI      = 0x04
	iirFIFOs    = 0xc0 // FIFOs enabled (16550A)
	fcrEnable   = 0x01
	fcrClearRX  = 0x02
	fcrClearTX  = 0x04
	lcrDLAB     = 0x80
	mcrDTR      = 0x01
	mcrRTS      = 0x02
	mcrOUT1     = 0x04
	mcrOUT2     = 0x08
	mcrLoop     = 0x10
	mcrMask     = 0x1f
	lsrDR       = 0x01
	lsrTHRE     = 0x20
	lsrTEMT     = 0x40
	msrCTS      = 0x10
	msrDSR      = 0x20
	msrRI       = 0x40
	msrDCD      = 0x80
	msrDeltas   = 0x0f
	uartFIFOLen = 16
	// uartRXBuffer bounds the bytes the reader goroutine holds ahead of
	// the FIFO (one read's worth).
	uartRXBuffer = 256
)

// UART is a 16550A serial port (COM1 of a Linux machine; its state is in
// uart_state.go). Its registers are read and written by vCPUs (I/O exits)
// and its receive FIFO is filled by the reader goroutine.
type UART struct {
	base uint16
	// irq sets the level of the UART's interrupt line.
	irq func(level bool) error

	// consoleMu guards console (several vCPUs may write THR).
	consoleMu sync.Mutex
	console   io.Writer

	// mu guards everything below.
	mu      sync.Mutex
	regs    UARTState
	line    bool // current interrupt line level
	space   *sync.Cond
	stopped bool
	wg      sync.WaitGroup
}

// NewUART makes a UART at base whose output goes to out and whose
// interrupt line irq drives.
func NewUART(base uint16, out io.Writer, irq func(level bool) error) *UART {
	u := &UART{base: base, console: out, irq: irq}
	u.space = sync.NewCond(&u.mu)
	u.regs = initialUARTState()
	return u
}

// initialUARTState is the UART after reset: 8N1 at 115200 baud (divisor 1),
// modem lines as a connected terminal would set them.
func initialUARTState() UARTState {
	return UARTState{LCR: 0x03, DLL: 1, MSR: msrCTS | msrDSR | msrDCD}
}

// Ports, Out and In make the UART a PortDevice.
func (u *UART) Ports() (uint16, uint16) { return u.base, u.base + 7 }

// Start feeds r into the receive FIFO from a goroutine until r ends or stop
// is called.
func (u *UART) Start(r io.Reader) {
	if r == nil {
		return
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		buf := make([]byte, uartRXBuffer)
		for {
			n, err := r.Read(buf)
			if !u.receive(buf[:n]) {
				return
			}
			if err != nil {
				return
			}
		}
	}()
}

// receive puts p into the FIFO, waiting for room; it reports false once the
// UART is stopped.
func (u *UART) receive(p []byte) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, b := range p {
		for len(u.regs.RX) >= uartFIFOLen && !u.stopped {
			u.space.Wait()
		}
		if u.stopped {
			return false
		}
		u.push(b)
		u.update()
	}
	return !u.stopped
}

// stop ends the reader goroutine once its current read returns (a blocked
// read of a terminal cannot be interrupted; the goroutine then ends on the
// next input or end of file). It does not wait.
func (u *UART) Stop() {
	u.mu.Lock()
	u.stopped = true
	u.space.Broadcast()
	u.mu.Unlock()
}

// push appends b to the FIFO (the caller holds mu).
func (u *UART) push(b byte) {
	if len(u.regs.RX) < uartFIFOLen {
		u.regs.RX = append(u.regs.RX, b)
	}
}

// update recomputes the interrupt line (the caller holds mu) and changes it
// if needed. The line is high while an enabled interrupt is pending, as on
// the chip: the in-kernel PIC and IOAPIC see its rising edges.
func (u *UART) update() {
	level := u.iir()&iirNoInt == 0
	if level == u.line {
		return
	}
	u.line = level
	if u.irq != nil {
		// An interrupt line that cannot be set leaves the guest waiting;
		// the KVM ioctl fails only if the VM is gone.
		_ = u.irq(level)
	}
}

// iir returns the interrupt identification (the caller holds mu).
func (u *UART) iir() uint8 {
	r := &u.regs
	var id uint8 = iirNoInt
	switch {
	case r.IER&ierRDI != 0 && len(r.RX) > 0:
		id = iirRDI
	case r.IER&ierTHRI != 0 && r.THRPending:
		id = iirTHRI
	case r.IER&ierMSI != 0 && u.msr()&msrDeltas != 0:
		id = iirMSI
	}
	if r.FCR&fcrEnable != 0 {
		id |= iirFIFOs
	}
	return id
}

// msr returns the modem status (the caller holds mu): in loopback mode the
// modem control outputs feed back to the inputs.
func (u *UART) msr() uint8 {
	r := &u.regs
	if r.MCR&mcrLoop == 0 {
		return r.MSR
	}
	var m uint8
	if r.MCR&mcrDTR != 0 {
		m |= msrDSR
	}
	if r.MCR&mcrRTS != 0 {
		m |= msrCTS
	}
	if r.MCR&mcrOUT1 != 0 {
		m |= msrRI
	}
	if r.MCR&mcrOUT2 != 0 {
		m |= msrDCD
	}
	return m
}

// out handles a write. The UART's registers are bytes (Linux's 8250 driver
// uses byte accesses only); a wider access does what an ISA bus does with
// an 8-bit device: one byte access per byte, to consecutive ports. Bytes
// past the UART's last port go nowhere.
func (u *UART) Out(cpu int, port uint16, data []byte) error {
	for i, b := range data {
		p := port + uint16(i)
		if p < u.base || p > u.base+7 {
			continue
		}
		if err := u.outByte(p, b); err != nil {
			return err
		}
	}
	return nil
}

// in handles a read, byte by byte as out does; bytes past the UART's last
// port read as all ones, as from an ISA port without a device.
func (u *UART) In(cpu int, port uint16, data []byte) error {
	for i := range data {
		p := port + uint16(i)
		if p < u.base || p > u.base+7 {
			data[i] = 0xff
			continue
		}
		data[i] = u.inByte(p)
	}
	return nil
}

// outByte writes v to the register at port.
func (u *UART) outByte(port uint16, v byte) error {
	u.mu.Lock()
	r := &u.regs
	var tx []byte
	switch port - u.base {
	case uartRBR:
		if r.LCR&lcrDLAB != 0 {
			r.DLL = v
			break
		}
		// THR: the byte leaves at once, so THR is empty again: the THRE
		// interrupt clears and is raised anew (an edge on the line).
		r.THRPending = false
		u.update()
		if r.MCR&mcrLoop != 0 {
			u.push(v)
		} else {
			tx = []byte{v}
		}
		r.THRPending = true
	case uartIER:
		if r.LCR&lcrDLAB != 0 {
			r.DLM = v
			break
		}
		old := r.IER
		r.IER = v & ierMask
		if r.IER&ierTHRI != 0 && old&ierTHRI == 0 {
			// Enabling the THRE interrupt with THR empty raises it.
			r.THRPending = true
		}
	case uartIIR: // FCR
		if (v^r.FCR)&fcrEnable != 0 || v&fcrClearRX != 0 {
			r.RX = r.RX[:0]
			u.space.Broadcast()
		}
		r.FCR = v &^ (fcrClearRX | fcrClearTX)
	case uartLCR:
		r.LCR = v
	case uartMCR:
		r.MCR = v & mcrMask
	case uartLSR, uartMSR:
		// Read-only (factory test registers): ignored, as on the chip.
	case uartSCR:
		r.SCR = v
	}
	u.update()
	u.mu.Unlock()
	if tx != nil {
		u.consoleMu.Lock()
		_, err := u.console.Write(tx)
		u.consoleMu.Unlock()
		if err != nil && !errors.Is(err, io.ErrClosedPipe) {
			return fmt.Errorf("serial console: %w", err)
		}
	}
	return nil
}

// inByte reads the register at port.
func (u *UART) inByte(port uint16) byte {
	u.mu.Lock()
	defer u.mu.Unlock()
	r := &u.regs
	var v uint8
	switch port - u.base {
	case uartRBR:
		if r.LCR&lcrDLAB != 0 {
			v = r.DLL
			break
		}
		if len(r.RX) > 0 {
			v = r.RX[0]
			r.RX = append(r.RX[:0], r.RX[1:]...)
			u.space.Broadcast()
		}
	case uartIER:
		if r.LCR&lcrDLAB != 0 {
			v = r.DLM
			break
		}
		v = r.IER
	case uartIIR:
		v = u.iir()
		if v&0x0f == iirTHRI {
			// Reading IIR while it reports THRE clears that interrupt.
			r.THRPending = false
		}
	case uartLCR:
		v = r.LCR
	case uartMCR:
		v = r.MCR
	case uartLSR:
		v = lsrTHRE | lsrTEMT
		if len(r.RX) > 0 {
			v |= lsrDR
		}
	case uartMSR:
		v = u.msr()
		r.MSR &^= msrDeltas
	case uartSCR:
		v = r.SCR
	}
	u.update()
	return v
}
