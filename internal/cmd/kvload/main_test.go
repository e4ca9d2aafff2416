package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/guestinit/kvstore"
)

// service is the real key-value service on a file, on loopback, in this
// process.
type service struct {
	t    *testing.T
	addr string
	disk string
	mu   sync.Mutex // guards store and srv
	st   *kvstore.Store
	srv  *kvstore.Server
}

func newDisk(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 4<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

func startService(t *testing.T) *service {
	s := &service{t: t, disk: newDisk(t)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	s.start(ln)
	t.Cleanup(s.stop)
	return s
}

func (s *service) start(ln net.Listener) {
	st, err := kvstore.Open(s.disk)
	if err != nil {
		s.t.Fatal(err)
	}
	srv := kvstore.NewServer(st, nil)
	s.mu.Lock()
	s.st, s.srv = st, srv
	s.mu.Unlock()
	go srv.Serve(ln)
}

func (s *service) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.srv != nil {
		s.srv.Close()
		s.st.Close()
		s.srv, s.st = nil, nil
	}
}

// restart stops the service, closing its connections, and starts it again
// on the same address, on its disk or (with a fresh disk) on a new one.
func (s *service) restart(fresh bool) {
	s.stop()
	if fresh {
		s.disk = newDisk(s.t)
	}
	ln, err := net.Listen("tcp", s.addr)
	if err != nil {
		s.t.Fatal(err)
	}
	s.start(ln)
}

// waitRecords waits until the service has n records.
func (s *service) waitRecords(n uint64) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		s.mu.Lock()
		_, got := s.st.Count()
		s.mu.Unlock()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("the service has %d records, waited for %d", got, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// kvload runs the command with args and returns its exit status and output.
func kvload(stop <-chan struct{}, args ...string) (int, string) {
	var out, errs strings.Builder
	code := run(args, &out, &errs, stop)
	return code, out.String() + errs.String()
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func TestCount(t *testing.T) {
	s := startService(t)
	code, out := kvload(nil, "-addr", s.addr, "-n", "150", "-progress", "1ms", "-prefix", "t1")
	if code != 0 || lastLine(out) != "kvload: OK" {
		t.Fatalf("kvload = %d:\n%s", code, out)
	}
	for _, want := range []string{
		"kvload: writes stopped (count) acked=150 ",
		"kvload: disk records=150 keys=150 matched=150 mismatched=0 direct=true\n",
		"kvload: result acked=150 verified=150 missing=0 wrong=0 disk=ok connection_survived=true reconnects=0 instances=1 breaks=none rtt_ms_p50=",
		"kvload: progress acked=",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// Progress reports the writes: none after they stopped, and the last
	// before it has them all (even when they took less than an interval).
	before, after, _ := strings.Cut(out, "kvload: writes stopped")
	if strings.Contains(after, "kvload: progress ") {
		t.Errorf("a progress line after the writes stopped:\n%s", out)
	}
	if i := strings.LastIndex(before, "kvload: progress "); i < 0 || !strings.HasPrefix(before[i:], "kvload: progress acked=150 ") {
		t.Errorf("the last progress line before the writes stopped does not count all 150:\n%s", out)
	}
	// Writes done within one interval: the one progress line is the last.
	code, out = kvload(nil, "-addr", s.addr, "-n", "5", "-progress", "1h", "-prefix", "t2")
	if code != 0 || strings.Count(out, "kvload: progress ") != 1 || !strings.Contains(out, "kvload: progress acked=5 ") {
		t.Errorf("kvload -progress 1h = %d; want one progress line, acked=5:\n%s", code, out)
	}
	if v, ok := s.st.Get("t1-149"); !ok || v.Value != value("t1", 149, 64) || len(v.Value) != 64 {
		t.Errorf("t1-149 = %+v, %v, want %q", v, ok, value("t1", 149, 64))
	}
}

// TestStops: a closed stop channel (a signal) and a stop file end the
// writes; the read-back follows.
func TestStops(t *testing.T) {
	s := startService(t)
	stop := make(chan struct{})
	go func() {
		s.waitRecords(30)
		close(stop)
	}()
	code, out := kvload(stop, "-addr", s.addr, "-progress", "0")
	if code != 0 || !strings.Contains(out, "writes stopped (signal)") || strings.Contains(out, "progress") {
		t.Errorf("kvload stopped by a signal = %d:\n%s", code, out)
	}

	file := filepath.Join(t.TempDir(), "stop")
	s.mu.Lock()
	_, n := s.st.Count()
	s.mu.Unlock()
	go func() {
		s.waitRecords(n + 30)
		os.WriteFile(file, nil, 0o644)
	}()
	code, out = kvload(nil, "-addr", s.addr, "-stop-file", file, "-interval", "1ms")
	if code != 0 || !strings.Contains(out, "writes stopped (stop file)") {
		t.Errorf("kvload stopped by a file = %d:\n%s", code, out)
	}
	code, out = kvload(nil, "-addr", s.addr, "-duration", "50ms")
	if code != 0 || !strings.Contains(out, "writes stopped (duration)") {
		t.Errorf("kvload -duration = %d:\n%s", code, out)
	}
}

// result returns the fields of kvload's result line.
func result(t *testing.T, out string) map[string]string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(line, "kvload: result "); ok {
			m := map[string]string{}
			for _, f := range strings.Fields(rest) {
				k, v, _ := strings.Cut(f, "=")
				m[k] = v
			}
			return m
		}
	}
	t.Fatalf("no result line in:\n%s", out)
	return nil
}

// restartDuring restarts s once kvload wrote 50 values, and stops kvload
// once it wrote 50 more after the restart.
func restartDuring(s *service, fresh bool) <-chan struct{} {
	stop := make(chan struct{})
	go func() {
		s.waitRecords(50)
		s.restart(fresh)
		s.mu.Lock()
		_, n := s.st.Count()
		s.mu.Unlock()
		s.waitRecords(n + 50)
		close(stop)
	}()
	return stop
}

// TestRestart: the service restarts on its disk in mid-stream; kvload
// reconnects, to another instance, and everything acknowledged is there.
// With -want-survived that is a failure.
func TestRestart(t *testing.T) {
	for _, wantSurvived := range []bool{false, true} {
		s := startService(t)
		code, out := kvload(restartDuring(s, false), "-addr", s.addr, "-want-survived="+fmt.Sprint(wantSurvived))
		r := result(t, out)
		if r["acked"] != r["verified"] || r["missing"] != "0" || r["wrong"] != "0" || r["disk"] != "ok" ||
			r["connection_survived"] != "false" || r["reconnects"] != "1" || r["instances"] != "2" {
			t.Errorf("kvload across a restart:\n%s", out)
		}
		if wantSurvived {
			if code != 1 || lastLine(out) != "kvload: FAILED: the connection did not survive" {
				t.Errorf("kvload -want-survived across a restart = %d:\n%s", code, out)
			}
		} else if code != 0 {
			t.Errorf("kvload across a restart = %d:\n%s", code, out)
		}
	}
}

// TestLost: the service comes back on an empty disk; kvload finds the
// acknowledged writes missing and fails.
func TestLost(t *testing.T) {
	s := startService(t)
	code, out := kvload(restartDuring(s, true), "-addr", s.addr)
	if r := result(t, out); code != 1 || r["missing"] == "0" || !strings.Contains(lastLine(out), "acknowledged writes missing") {
		t.Errorf("kvload with the disk lost = %d:\n%s", code, out)
	}
}

// pausingProxy relays TCP connections to a service and can stop relaying
// for a while, as a paused guest (a snapshot, a restore, a failover) stops
// answering without closing anything.
type pausingProxy struct {
	addr  string
	mu    sync.RWMutex // held for writing while paused; relays take it for reading
	cmu   sync.Mutex   // guards conns
	conns []net.Conn
}

func newPausingProxy(t *testing.T, to string) *pausingProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &pausingProxy{addr: ln.Addr().String()}
	t.Cleanup(func() {
		ln.Close()
		p.cmu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.cmu.Unlock()
	})
	relay := func(dst, src net.Conn) {
		defer dst.Close()
		buf := make([]byte, 4096)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.RLock()
				_, werr := dst.Write(buf[:n])
				p.mu.RUnlock()
				if werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", to)
			if err != nil {
				c.Close()
				continue
			}
			p.cmu.Lock()
			p.conns = append(p.conns, c, s)
			p.cmu.Unlock()
			go relay(s, c)
			go relay(c, s)
		}
	}()
	return p
}

// TestPause: the service stops answering for a while in mid-stream and
// goes on; kvload reports the slow write and that its connection survived.
func TestPause(t *testing.T) {
	s := startService(t)
	p := newPausingProxy(t, s.addr)
	stop := make(chan struct{})
	go func() {
		s.waitRecords(50)
		p.mu.Lock()
		time.Sleep(time.Second) // nothing relayed: the write in flight waits
		p.mu.Unlock()
		s.mu.Lock()
		_, n := s.st.Count()
		s.mu.Unlock()
		s.waitRecords(n + 50)
		close(stop)
	}()
	code, out := kvload(stop, "-addr", p.addr, "-slow", "300ms", "-want-survived")
	r := result(t, out)
	if code != 0 || r["acked"] != r["verified"] || r["connection_survived"] != "true" || r["reconnects"] != "0" || r["breaks"] != "none" ||
		!strings.Contains(out, "kvload: slow write ") || !strings.Contains(out, "(connection kept, acked=") {
		t.Errorf("kvload across a pause = %d:\n%s", code, out)
	}
}

func TestNoService(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	code, out := kvload(nil, "-addr", addr, "-retry-for", "100ms")
	if code != 1 || !strings.HasPrefix(lastLine(out), "kvload: FAILED: dial ") {
		t.Errorf("kvload with no service = %d:\n%s", code, out)
	}
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"-addr", "x:1", "extra"},
		{"-addr", "x:1", "-n", "-1"},
		{"-addr", "x:1", "-value-size", "10"},
		{"-addr", "x:1", "-value-size", "417"},
		{"-addr", "x:1", "-prefix", "a b"},
		{"-addr", "x:1", "-prefix", strings.Repeat("p", 41)},
		{"-addr", "x:1", "-timeout", "0s"},
		{"-nosuch"},
	} {
		if code, out := kvload(nil, args...); code != 2 {
			t.Errorf("kvload %q = %d, want 2:\n%s", args, code, out)
		}
	}
	c, err := parseFlags([]string{"-addr", "x:1"}, io.Discard)
	if err != nil || len(c.prefix) != 9 || !c.reconnect || !c.verifyDisk {
		t.Errorf("parseFlags(defaults) = %+v, %v", c, err)
	}
}
