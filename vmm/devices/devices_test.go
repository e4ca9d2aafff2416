package devices

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

// irqRecorder records the levels a device drives its interrupt line to.
type irqRecorder struct {
	mu     sync.Mutex
	levels []bool
}

func (r *irqRecorder) set(level bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.levels = append(r.levels, level)
	return nil
}

func (r *irqRecorder) take() []bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.levels
	r.levels = nil
	return l
}

func (r *irqRecorder) level() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.levels) > 0 && r.levels[len(r.levels)-1]
}

func newTestUART() (*UART, *bytes.Buffer, *irqRecorder) {
	var out bytes.Buffer
	irq := &irqRecorder{}
	return NewUART(COM1Port, &out, irq.set), &out, irq
}

func uartOut(t *testing.T, u *UART, reg uint16, v byte) {
	t.Helper()
	if err := u.Out(0, COM1Port+reg, []byte{v}); err != nil {
		t.Fatalf("out %#x, %#x: %v", COM1Port+reg, v, err)
	}
}

func uartIn(t *testing.T, u *UART, reg uint16) byte {
	t.Helper()
	b := []byte{0}
	if err := u.In(0, COM1Port+reg, b); err != nil {
		t.Fatalf("in %#x: %v", COM1Port+reg, err)
	}
	return b[0]
}

// TestUARTLinuxProbe replays the checks Linux's 8250 driver makes before it
// calls a port a 16550A (drivers/tty/serial/8250/8250_port.c autoconfig).
func TestUARTLinuxProbe(t *testing.T) {
	u, _, _ := newTestUART()
	// IER scratch test: only the low four bits exist.
	uartOut(t, u, uartIER, 0)
	if v := uartIn(t, u, uartIER) & 0x0f; v != 0 {
		t.Errorf("IER after writing 0 = %#x", v)
	}
	uartOut(t, u, uartIER, 0x0f)
	if v := uartIn(t, u, uartIER); v != 0x0f {
		t.Errorf("IER after writing 0x0f = %#x", v)
	}
	uartOut(t, u, uartIER, 0xff)
	if v := uartIn(t, u, uartIER); v != 0x0f {
		t.Errorf("IER after writing 0xff = %#x, want the UUE bit and others clear (not an XScale)", v)
	}
	uartOut(t, u, uartIER, 0)
	// Loopback: MCR outputs come back as modem status.
	uartOut(t, u, uartMCR, mcrLoop|0x0a)
	if v := uartIn(t, u, uartMSR) & 0xf0; v != msrDCD|msrCTS {
		t.Errorf("MSR in loopback with RTS|OUT2 = %#x, want %#x", v, msrDCD|msrCTS)
	}
	uartOut(t, u, uartMCR, 0)
	// FIFO: IIR bits 7:6 say 16550A once FCR enables it.
	uartOut(t, u, uartIIR, fcrEnable)
	if v := uartIn(t, u, uartIIR); v>>6 != 3 || v&iirNoInt == 0 {
		t.Errorf("IIR with FIFOs on = %#x, want 0xc1", v)
	}
	// 16750 test: IIR >> 5 must not become 7 with the 64-byte bit.
	uartOut(t, u, uartIIR, fcrEnable|0x20)
	if v := uartIn(t, u, uartIIR) >> 5; v != 6 {
		t.Errorf("IIR>>5 with FCR7_64BYTE = %d, want 6 (not a 16750)", v)
	}
	// Scratch register and divisor latch.
	uartOut(t, u, uartSCR, 0xa5)
	if v := uartIn(t, u, uartSCR); v != 0xa5 {
		t.Errorf("SCR = %#x", v)
	}
	uartOut(t, u, uartLCR, lcrDLAB|3)
	uartOut(t, u, uartRBR, 0x0c)
	uartOut(t, u, uartIER, 0x00)
	if lo, hi := uartIn(t, u, uartRBR), uartIn(t, u, uartIER); lo != 0x0c || hi != 0 {
		t.Errorf("divisor latch = %#x %#x, want 0x0c 0", lo, hi)
	}
	uartOut(t, u, uartLCR, 3)
	if v := uartIn(t, u, uartIER); v != 0 {
		t.Errorf("IER after DLAB cleared = %#x", v)
	}
	if v := uartIn(t, u, uartLSR); v != lsrTHRE|lsrTEMT {
		t.Errorf("LSR idle = %#x, want THRE|TEMT", v)
	}
}

// TestUARTTransmitInterrupt checks the THRE interrupt the way Linux's
// startup test does, and that every transmitted byte is a new edge.
func TestUARTTransmitInterrupt(t *testing.T) {
	u, out, irq := newTestUART()
	uartOut(t, u, uartIER, ierTHRI)
	iir1 := uartIn(t, u, uartIIR)
	uartOut(t, u, uartIER, 0)
	uartOut(t, u, uartIER, ierTHRI)
	iir2 := uartIn(t, u, uartIIR)
	if iir1&0x0f != iirTHRI || iir2&0x0f != iirTHRI {
		t.Errorf("IIR after enabling THRI = %#x, then %#x; want THRE both times (no UART_BUG_THRE)", iir1, iir2)
	}
	if v := uartIn(t, u, uartIIR); v&iirNoInt == 0 {
		t.Errorf("IIR after the THRE interrupt was read = %#x, want none pending", v)
	}
	irq.take()
	uartOut(t, u, uartRBR, 'x')
	if got := irq.take(); !reflect.DeepEqual(got, []bool{true}) {
		t.Errorf("line after a THR write (THRE already read): %v, want a rising edge", got)
	}
	uartOut(t, u, uartRBR, 'y')
	if got := irq.take(); !reflect.DeepEqual(got, []bool{false, true}) {
		t.Errorf("line after a THR write with THRE pending: %v, want low then high", got)
	}
	if out.String() != "xy" {
		t.Errorf("console %q", out.String())
	}
	uartOut(t, u, uartIER, 0)
	if irq.level() {
		t.Errorf("line high with interrupts disabled")
	}
}

func TestUARTReceive(t *testing.T) {
	u, out, irq := newTestUART()
	uartOut(t, u, uartIER, ierRDI)
	pr, pw := io.Pipe()
	u.Start(pr)
	defer u.Stop()
	input := strings.Repeat("0123456789", 5) // more than the FIFO holds
	go pw.Write([]byte(input))
	var got []byte
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < len(input) && time.Now().Before(deadline) {
		if uartIn(t, u, uartLSR)&lsrDR == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		if !irq.level() {
			t.Fatalf("data ready but the line is low")
		}
		if id := uartIn(t, u, uartIIR) & 0x0f; id != iirRDI {
			t.Fatalf("IIR with data = %#x, want RDI", id)
		}
		got = append(got, uartIn(t, u, uartRBR))
	}
	if string(got) != input {
		t.Errorf("received %q, want %q", got, input)
	}
	if uartIn(t, u, uartLSR)&lsrDR != 0 || irq.level() {
		t.Errorf("FIFO drained but DR or the line still set")
	}
	// Loopback: transmitted bytes are received, not sent.
	uartOut(t, u, uartMCR, mcrLoop)
	uartOut(t, u, uartRBR, 'L')
	if v := uartIn(t, u, uartRBR); v != 'L' || out.Len() != 0 {
		t.Errorf("loopback read %q, console %q", v, out.String())
	}
	// FCR clears the receive FIFO.
	uartOut(t, u, uartRBR, 'M')
	uartOut(t, u, uartIIR, fcrEnable|fcrClearRX)
	if uartIn(t, u, uartLSR)&lsrDR != 0 {
		t.Errorf("FIFO not cleared by FCR")
	}
	pw.Close()
}

// TestUARTStopUnblocksReader checks that stop ends a reader goroutine that
// waits for FIFO room, and that it never drives the line afterwards.
func TestUARTStopUnblocksReader(t *testing.T) {
	u, _, irq := newTestUART()
	uartOut(t, u, uartIER, ierRDI)
	u.Start(bytes.NewReader(bytes.Repeat([]byte{'z'}, 100)))
	for i := 0; uartIn(t, u, uartLSR)&lsrDR == 0; i++ {
		if i > 5000 {
			t.Fatal("no input arrived")
		}
		time.Sleep(time.Millisecond)
	}
	u.Stop()
	done := make(chan struct{})
	go func() { u.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("reader goroutine still running after stop")
	}
	irq.take()
	if got := u.receive([]byte("late")); got || len(irq.take()) != 0 {
		t.Errorf("receive after stop = %v and drove the line", got)
	}
}

// TestUARTWideAccess: 2- and 4-byte accesses work as on an ISA bus, one
// byte per port; bytes past the last port read as all ones and writes to
// them go nowhere.
func TestUARTWideAccess(t *testing.T) {
	u, out, _ := newTestUART()
	// THR 'A' and IER 0x02 at once.
	if err := u.Out(0, COM1Port, []byte{'A', ierTHRI}); err != nil {
		t.Fatal(err)
	}
	if out.String() != "A" || u.regs.IER != ierTHRI {
		t.Errorf("2-byte write: console %q, IER %#x; want %q, %#x", out.String(), u.regs.IER, "A", ierTHRI)
	}
	// SCR, then three bytes past the UART.
	if err := u.Out(0, COM1Port+uartSCR, []byte{0x5a, 1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if u.regs.SCR != 0x5a {
		t.Errorf("4-byte write at SCR: SCR %#x, want 0x5a", u.regs.SCR)
	}
	got := make([]byte, 4)
	if err := u.In(0, COM1Port+uartMCR, got); err != nil {
		t.Fatal(err)
	}
	// MCR 0, LSR (transmitter empty), MSR (the lines a terminal sets), SCR.
	if want := []byte{0, lsrTHRE | lsrTEMT, msrCTS | msrDSR | msrDCD, 0x5a}; !bytes.Equal(got, want) {
		t.Errorf("4-byte read at MCR = % x, want % x", got, want)
	}
	got = got[:2]
	if err := u.In(0, COM1Port+uartSCR, got); err != nil {
		t.Fatal(err)
	}
	if want := []byte{0x5a, 0xff}; !bytes.Equal(got, want) {
		t.Errorf("2-byte read at SCR = % x, want % x", got, want)
	}
	// A received byte comes out of a wide read of RBR once, in its low byte.
	u.receive([]byte("z"))
	if err := u.In(0, COM1Port, got); err != nil || got[0] != 'z' || got[1] != ierTHRI {
		t.Errorf("2-byte read at RBR = % x, %v; want 'z' and IER", got, err)
	}
	if len(u.regs.RX) != 0 {
		t.Errorf("FIFO after the read: %q", u.regs.RX)
	}
}

func TestUARTConsoleError(t *testing.T) {
	u2 := NewUART(COM1Port, failWriter{}, nil)
	if err := u2.Out(0, COM1Port, []byte{'x'}); err == nil || !strings.Contains(err.Error(), "serial console") {
		t.Errorf("console write error = %v", err)
	}
}

type failWriter struct{}

func (failWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

func TestUARTStateEncoding(t *testing.T) {
	s := UARTState{IER: 0x05, FCR: 0xc1, LCR: 0x03, MCR: 0x0b, MSR: 0xb0, SCR: 7, DLL: 1, DLM: 0, THRPending: true, RX: []byte("abc")}
	b := s.AppendBinary(nil)
	got, err := DecodeUARTState(b)
	if err != nil || !reflect.DeepEqual(got, s) {
		t.Fatalf("decode(encode(%+v)) = %+v, %v", s, got, err)
	}
	bad := []struct {
		name   string
		mutate func([]byte) []byte
		errSub string
	}{
		{"short", func(b []byte) []byte { return b[:5] }, "at least"},
		{"thr", func(b []byte) []byte { b[8] = 2; return b }, "THR pending"},
		{"reserved", func(b []byte) []byte { b[10] = 1; return b }, "reserved"},
		{"length", func(b []byte) []byte { b[9] = 4; return b }, "want 16"},
		{"fifo", func(b []byte) []byte { b[9] = 17; return append(b, make([]byte, 14)...) }, "at most 16"},
		{"ier", func(b []byte) []byte { b[0] = 0x40; return b }, "IER"},
		{"mcr", func(b []byte) []byte { b[3] = 0x20; return b }, "MCR"},
	}
	for _, tc := range bad {
		_, err := DecodeUARTState(tc.mutate(append([]byte(nil), b...)))
		if err == nil || !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), tc.errSub) {
			t.Errorf("%s: decode = %v, want ErrBadState about %q", tc.name, err, tc.errSub)
		}
	}
	u, _, irq := newTestUART()
	if err := u.Restore(s); err != nil {
		t.Fatal(err)
	}
	if !irq.level() {
		t.Errorf("restored UART with data and RDI enabled: line low")
	}
	if saved := u.Save(); !reflect.DeepEqual(saved, s) {
		t.Errorf("save after restore = %+v, want %+v", saved, s)
	}
}

func TestI8042(t *testing.T) {
	var resets []string
	k := &I8042{OnReset: func(d string) { resets = append(resets, d) }}
	st := []byte{0xff}
	k.In(0, i8042Command, st)
	if st[0]&0x02 != 0 {
		t.Errorf("status %#x: input buffer full, Linux would wait", st[0])
	}
	k.Out(0, i8042Command, []byte{0xad}) // disable keyboard: ignored
	k.Out(0, i8042Data, []byte{0x00})
	if len(resets) != 0 {
		t.Fatalf("reset on ordinary commands: %v", resets)
	}
	k.Out(0, i8042Command, []byte{i8042CmdPulseReset})
	k.Out(0, i8042Command, []byte{i8042CmdWriteOutput})
	k.Out(0, i8042Data, []byte{0x01}) // reset line released: no reset
	k.Out(0, i8042Command, []byte{i8042CmdWriteOutput})
	k.Out(0, i8042Data, []byte{0xfe}) // bit 0 clear: reset
	if len(resets) != 2 || !strings.Contains(resets[0], "0xfe") || !strings.Contains(resets[1], "output port") {
		t.Errorf("resets = %q, want the 0xfe command and the output port write", resets)
	}
	b := []byte{0}
	k.In(0, 0x62, b)
	if b[0] != 0xff {
		t.Errorf("port 0x62 reads %#x, want 0xff (nothing there)", b[0])
	}
}

func TestACPIPM(t *testing.T) {
	var off, reset []string
	p := &ACPIPM{OnPowerOff: func(d string) { off = append(off, d) }, OnReset: func(d string) { reset = append(reset, d) }}
	ctl := []byte{0, 0}
	p.In(0, ACPIPM1ControlPort, ctl)
	if ctl[0]&arch.PM1CntSCIEnable == 0 {
		t.Errorf("PM1a control reads %#x: SCI_EN clear, Linux would try to enable ACPI", ctl)
	}
	// Enable register keeps what is written; status reads zero.
	p.Out(0, ACPIPM1EventPort, []byte{0xff, 0xff, 0x21, 0x01})
	ev := make([]byte, 4)
	p.In(0, ACPIPM1EventPort, ev)
	if !bytes.Equal(ev, []byte{0, 0, 0x21, 0x01}) {
		t.Errorf("PM1a event block reads % x, want status 0, enable 0x0121", ev)
	}
	// ACPICA writes SLP_TYP first, then SLP_EN.
	p.Out(0, ACPIPM1ControlPort, []byte{0x00, 0x14})
	if len(off) != 0 {
		t.Fatalf("powered off without SLP_EN")
	}
	p.Out(0, ACPIPM1ControlPort, []byte{0x00, 0x34})
	if len(off) != 1 || !strings.Contains(off[0], "S5") {
		t.Errorf("power-off calls %q", off)
	}
	// Another sleep type with SLP_EN does not power off; byte writes work.
	p.Out(0, ACPIPM1ControlPort, []byte{0x00})
	p.Out(0, ACPIPM1ControlPort+1, []byte{0x2c}) // SLP_TYP 3 | SLP_EN
	if len(off) != 1 {
		t.Errorf("S3 request powered off")
	}
	p.Out(0, ACPIResetPort, []byte{0x02})
	p.Out(0, ACPIResetPort, []byte{ACPIResetValue})
	if len(reset) != 1 {
		t.Errorf("resets %q, want one", reset)
	}
}
