package wan

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The test binary doubles as the programs the tests run elsewhere, selected
// by WAN_HELPER:
//
//	server      a measurement server (see serveConn) listening on
//	            WAN_HELPER_LISTEN; it prints its address on stdout and exits
//	            when stdin closes. Tests run it inside a link's namespace.
//	new         calls New and prints the error; used to check the error a
//	            process without the needed privilege gets.
const helperEnv = "WAN_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "server":
		os.Exit(helperServer(os.Getenv("WAN_HELPER_LISTEN")))
	case "new":
		l, err := New(Config{RateMbit: 10})
		if err == nil {
			l.Close()
			fmt.Println("ok")
			os.Exit(0)
		}
		fmt.Printf("noprivilege=%v %v\n", errors.Is(err, ErrNoPrivilege), err)
		os.Exit(0)
	default:
		fmt.Fprintf(os.Stderr, "%s=%q: unknown helper\n", helperEnv, os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// Measurement protocol: the client sends one mode byte.
const (
	// modeSink: the server reads until end-of-stream, then replies
	// "N D\n": N bytes arrived after the first read, over D nanoseconds
	// between the first and the last read.
	modeSink = 'S'
	// modeEcho: the server echoes everything until end-of-stream.
	modeEcho = 'E'
	// modeSource: a 4-byte big-endian millisecond count follows; the server
	// sends bytes for that long, then closes.
	modeSource = 'G'
)

func helperServer(listen string) int {
	ln, err := net.Listen("tcp4", listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(ln.Addr().String())
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		go serveConn(c.(*net.TCPConn))
	}
}

func serveConn(c *net.TCPConn) {
	defer c.Close()
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case modeEcho:
		io.Copy(c, c)
	case modeSink:
		n, d, _ := countReads(c)
		fmt.Fprintf(c, "%d %d\n", n, d.Nanoseconds())
	case modeSource:
		var ms [4]byte
		if _, err := io.ReadFull(c, ms[:]); err != nil {
			return
		}
		writeFor(c, time.Duration(binary.BigEndian.Uint32(ms[:]))*time.Millisecond)
	}
}

// countReads reads r to its end and returns the bytes that arrived after the
// first read and the time from the first read to the last.
func countReads(r io.Reader) (int64, time.Duration, error) {
	buf := make([]byte, 256<<10)
	var first, last time.Time
	var n int64
	for {
		k, err := r.Read(buf)
		if k > 0 {
			now := time.Now()
			if first.IsZero() {
				first = now
			} else {
				n += int64(k)
			}
			last = now
		}
		if err == io.EOF {
			return n, last.Sub(first), nil
		}
		if err != nil {
			return n, last.Sub(first), err
		}
	}
}

// writeFor writes to c for d, then half-closes it.
func writeFor(c *net.TCPConn, d time.Duration) (int64, error) {
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	var n int64
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		k, err := c.Write(buf)
		n += int64(k)
		if err != nil {
			return n, err
		}
	}
	return n, c.CloseWrite()
}

// startServer runs the measurement server inside l's namespace and returns
// its address and the running command.
func startServer(t testing.TB, l *Link) (string, *exec.Cmd) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := l.Command(exe)
	cmd.Env = append(os.Environ(), helperEnv+"=server", "WAN_HELPER_LISTEN="+l.NSAddr().String()+":0")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the server in %s: %v", l.Namespace(), err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("server in %s: reading its address: %v", l.Namespace(), err)
	}
	return strings.TrimSpace(line), cmd
}

func dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp4", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c.(*net.TCPConn)
}

// sinkRate sends to a sink at addr for d and returns the rate the sink
// measured, in Mbit/s, and the bytes sent.
func sinkRate(t testing.TB, addr string, d time.Duration) (float64, int64) {
	t.Helper()
	c := dial(t, addr)
	defer c.Close()
	if _, err := c.Write([]byte{modeSink}); err != nil {
		t.Fatal(err)
	}
	sent, err := writeFor(c, d)
	if err != nil {
		t.Fatalf("sending to the sink: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	reply, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the sink's count: %v", err)
	}
	f := strings.Fields(reply)
	if len(f) != 2 {
		t.Fatalf("sink reply %q: want two numbers", reply)
	}
	n, err1 := strconv.ParseInt(f[0], 10, 64)
	ns, err2 := strconv.ParseInt(f[1], 10, 64)
	if err1 != nil || err2 != nil || ns <= 0 {
		t.Fatalf("sink reply %q: want bytes and a positive duration", reply)
	}
	return float64(n) * 8 / float64(ns) * 1e3, sent
}

// sourceRate receives from a source at addr that sends for d and returns the
// rate, in Mbit/s, between the first and the last read.
func sourceRate(t testing.TB, addr string, d time.Duration) float64 {
	t.Helper()
	c := dial(t, addr)
	defer c.Close()
	req := []byte{modeSource, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(req[1:], uint32(d.Milliseconds()))
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(d + 30*time.Second))
	n, dur, err := countReads(c)
	if err != nil || dur <= 0 {
		t.Fatalf("receiving from the source: %d bytes in %v: %v", n, dur, err)
	}
	return float64(n) * 8 / float64(dur.Nanoseconds()) * 1e3
}

// rtts times n 8-byte request/response exchanges with an echo server at
// addr, on one connection.
func rtts(t testing.TB, addr string, n int) []time.Duration {
	t.Helper()
	c := dial(t, addr)
	defer c.Close()
	if _, err := c.Write([]byte{modeEcho}); err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(time.Duration(n) * 10 * time.Second))
	out := make([]time.Duration, 0, n)
	msg, back := []byte("ping0123"), make([]byte, 8)
	for i := range n {
		msg[7] = byte(i)
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, back); err != nil {
			t.Fatalf("echo %d: %v", i, err)
		}
		out = append(out, time.Since(t0))
		if string(back) != string(msg) {
			t.Fatalf("echo %d = %q, want %q", i, back, msg)
		}
	}
	return out
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// newLink creates a link or skips the test when this process may not create
// network namespaces (not root, or root without CAP_SYS_ADMIN). Any other
// failure fails the test.
func newLink(t testing.TB, cfg Config) *Link {
	t.Helper()
	l, err := New(cfg)
	if errors.Is(err, ErrNoPrivilege) {
		t.Skipf("needs network namespaces: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return l
}
