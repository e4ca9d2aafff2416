package main

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"golang.org/x/sys/unix"
)

func termios(t *testing.T, f *os.File) unix.Termios {
	t.Helper()
	tio, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	return *tio
}

// isRaw reports whether the terminal settings are those of raw mode.
func isRaw(tio unix.Termios) bool {
	return tio.Lflag&(unix.ICANON|unix.ECHO|unix.ISIG|unix.IEXTEN) == 0 && tio.Iflag&(unix.ICRNL|unix.IXON) == 0 &&
		tio.Oflag&unix.OPOST != 0 && tio.Cc[unix.VMIN] == 1
}

// TestLinuxConsoleTerminal: a terminal on stdin is put in raw mode and read
// through the escape; restoring gives back its settings exactly.
func TestLinuxConsoleTerminal(t *testing.T) {
	master, slave := testutil.OpenPTY(t)
	before := termios(t, slave)
	if isRaw(before) {
		t.Fatalf("a new pseudo-terminal is already raw: %+v", before)
	}
	quits := 0
	in, restore, err := linuxConsole(slave, func() { quits++ })
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := in.(*escapeReader); !ok {
		t.Fatalf("linuxConsole(terminal) = %T, want the escape reader", in)
	}
	if tio := termios(t, slave); !isRaw(tio) {
		t.Errorf("terminal settings during the run %+v, want raw", tio)
	}
	// Ctrl-C and a carriage return reach the guest as they are in raw mode.
	if _, err := master.Write([]byte("ab\x03\r\x01\x01c\x01zq\x01xlost")); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(in)
	if err != nil || string(got) != "ab\x03\r\x01c\x01zq" || quits != 1 {
		t.Errorf("read %q, %v, %d quits; want %q and one quit", got, err, quits, "ab\x03\r\x01c\x01zq")
	}
	restore()
	restore()
	if after := termios(t, slave); after != before {
		t.Errorf("terminal settings after restore %+v, want %+v", after, before)
	}
}

// TestLinuxConsoleNotTerminal: a pipe is the guest's input as it is, and
// /dev/null gives none; neither is touched.
func TestLinuxConsoleNotTerminal(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	in, restore, err := linuxConsole(r, func() { t.Error("quit called") })
	if err != nil || in != io.Reader(r) {
		t.Errorf("linuxConsole(pipe) = %v, %v; want the pipe itself", in, err)
	}
	restore()
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	if in, _, err := linuxConsole(null, nil); in != nil || err != nil {
		t.Errorf("linuxConsole(/dev/null) = %v, %v; want no input", in, err)
	}
}

func TestEscapeReader(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"plain text", "plain text"},
		{"a\x01\x01b", "a\x01b"},
		{"a\x01b", "a\x01b"},
		{"\x01", ""},
		{"a\x01xb", "a"},
		{"a\x01Xb", "a"},
		{"\x01\x01x", "\x01x"},
		{"\x01\x01\x01x", "\x01"},
	} {
		for _, r := range []func(io.Reader) io.Reader{func(r io.Reader) io.Reader { return r }, iotest.OneByteReader, iotest.HalfReader} {
			quits := 0
			e := &escapeReader{r: r(strings.NewReader(tt.in)), quit: func() { quits++ }}
			// One byte at a time out of it too: a held Ctrl-A and a key
			// make two bytes from one.
			got, err := io.ReadAll(iotest.OneByteReader(e))
			wantQuits := 0
			if strings.Contains(strings.ReplaceAll(tt.in, "\x01\x01", ""), "\x01x") || strings.Contains(strings.ReplaceAll(tt.in, "\x01\x01", ""), "\x01X") {
				wantQuits = 1
			}
			if err != nil || string(got) != tt.want || quits != wantQuits {
				t.Errorf("escape(%q) = %q, %v, %d quits; want %q, %d quits", tt.in, got, err, quits, tt.want, wantQuits)
			}
		}
	}
}

// TestRunLinuxTerminal runs a guest that echoes its serial input, with a
// pseudo-terminal as stdin: typed keys reach the guest (Ctrl-C too: raw
// mode), Ctrl-A x ends the run with exit 130, and the terminal gets its
// settings back.
func TestRunLinuxTerminal(t *testing.T) {
	requireKVM(t)
	master, slave := testutil.OpenPTY(t)
	before := termios(t, slave)
	linuxStdin = slave
	defer func() { linuxStdin = os.Stdin }()
	// Poll LSR.DR, read RBR, write it to THR, again.
	echo := testutil.SerialEchoLoop()
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(echo), 0o644)
	var stdout, stderr testutil.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(context.Background(), []string{"run", "--kernel", k, "--mem", "64M"}, &stdout, &stderr)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(stderr.String(), "raw mode") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if tio := termios(t, slave); !isRaw(tio) {
		t.Errorf("terminal settings during the run %+v, want raw", tio)
	}
	if _, err := master.Write([]byte("hi\x03")); err != nil {
		t.Fatal(err)
	}
	for stdout.String() != "hi\x03" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := stdout.String(); got != "hi\x03" {
		t.Errorf("the guest echoed %q, want %q", got, "hi\x03")
	}
	if _, err := master.Write([]byte{escapeKey, 'x'}); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != exitInterrupted || !strings.Contains(stderr.String(), "understudy: quit (Ctrl-A x) after ") {
			t.Errorf("run after Ctrl-A x = %d, stderr %q; want %d and a quit line", code, stderr.String(), exitInterrupted)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Ctrl-A x did not end the run")
	}
	if after := termios(t, slave); after != before {
		t.Errorf("terminal settings after the run %+v, want %+v", after, before)
	}
}
