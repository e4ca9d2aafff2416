package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// syncBuf is a bytes.Buffer safe for two goroutines.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestSendRecv: two files (one empty, one of 3 MiB of random bytes) go
// over loopback TCP; the receiver starts first and retries until the sender
// listens; both print the same size and SHA-256 per file.
func TestSendRecv(t *testing.T) {
	src, dst := t.TempDir(), t.TempDir()
	big := make([]byte, 3<<20+17)
	rand.Read(big)
	if err := os.WriteFile(filepath.Join(src, "snap.bin"), big, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "empty.img"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	var recvOut syncBuf
	done := make(chan int)
	go func() {
		done <- run([]string{"recv", "-from", addr, "-dir", filepath.Join(dst, "in"), "-retry-for", "20s"}, &recvOut)
	}()
	time.Sleep(700 * time.Millisecond) // the receiver's first attempts fail
	var sendOut syncBuf
	if code := run([]string{"send", "-listen", addr, filepath.Join(src, "snap.bin"), filepath.Join(src, "empty.img")}, &sendOut); code != 0 {
		t.Fatalf("send: %d:\n%s", code, sendOut.String())
	}
	if code := <-done; code != 0 {
		t.Fatalf("recv: %d:\n%s", code, recvOut.String())
	}
	got, err := os.ReadFile(filepath.Join(dst, "in", "snap.bin"))
	if err != nil || !bytes.Equal(got, big) {
		t.Fatalf("received snap.bin: %d bytes, %v; want the %d sent", len(got), err, len(big))
	}
	if fi, err := os.Stat(filepath.Join(dst, "in", "empty.img")); err != nil || fi.Size() != 0 {
		t.Fatalf("received empty.img: %v, %v", fi, err)
	}
	for _, name := range []string{"snap.bin", "empty.img"} {
		var sent, recvd string
		for _, l := range strings.Split(sendOut.String(), "\n") {
			if s, ok := strings.CutPrefix(l, "nodefile: sending "+name+" "); ok {
				sent = s
			}
		}
		for _, l := range strings.Split(recvOut.String(), "\n") {
			if s, ok := strings.CutPrefix(l, "nodefile: received "+name+" "); ok {
				recvd = s
			}
		}
		if sent == "" || sent != recvd {
			t.Errorf("%s: sent %q, received %q", name, sent, recvd)
		}
	}
	if !strings.Contains(recvOut.String(), "nodefile: OK\n") || !strings.Contains(sendOut.String(), "nodefile: OK\n") {
		t.Errorf("no OK:\n%s\n%s", sendOut.String(), recvOut.String())
	}
}

// TestRecvRefuses: a sender whose bytes do not match its SHA-256, one that
// stops early and one that names a path are refused, and no file (partial
// or whole) is left.
func TestRecvRefuses(t *testing.T) {
	for _, tt := range []struct{ stream, want string }{
		{"FILE a.img 4 " + strings.Repeat("0", 64) + "\nabcdEND\n", "SHA-256"},
		{"FILE a.img 40 " + strings.Repeat("0", 64) + "\nabcd", "stopped after 4 of 40 bytes"},
		{"FILE ../a.img 4 " + strings.Repeat("0", 64) + "\nabcdEND\n", "bad file name"},
		{"FILE a.img 4\n", "bad header"},
		{strings.Repeat("x", 600), "longer than 512"},
	} {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(tt.stream))
			c.Close()
		}()
		dir := t.TempDir()
		var out syncBuf
		code := run([]string{"recv", "-from", ln.Addr().String(), "-dir", dir, "-retry-for", "5s"}, &out)
		ln.Close()
		if code == 0 || !strings.Contains(out.String(), tt.want) {
			t.Errorf("stream %.40q: recv %d, %q; want a failure with %q", tt.stream, code, out.String(), tt.want)
		}
		if left, _ := os.ReadDir(dir); len(left) != 0 {
			t.Errorf("stream %.40q left %v", tt.stream, left)
		}
	}
}

func TestParseHeader(t *testing.T) {
	sum := strings.Repeat("ab", 32)
	h, err := parseHeader("FILE snap-1.bin 1234 " + sum)
	if err != nil || h.name != "snap-1.bin" || h.size != 1234 || h.sum != sum {
		t.Fatalf("parseHeader = %+v, %v", h, err)
	}
	for _, bad := range []string{
		"", "FILE", "FILE a 1", "FILE a 1 " + sum + " x", "FILES a 1 " + sum,
		"FILE .a 1 " + sum, "FILE a/b 1 " + sum, "FILE .. 1 " + sum, "FILE " + strings.Repeat("a", 129) + " 1 " + sum,
		"FILE a -1 " + sum, "FILE a +1 " + sum, "FILE a 01 " + sum, fmt.Sprintf("FILE a %d %s", int64(MaxSize)+1, sum),
		"FILE a 1 " + strings.ToUpper(sum), "FILE a 1 " + sum[:63], "FILE  a 1 " + sum,
	} {
		if h, err := parseHeader(bad); err == nil {
			t.Errorf("parseHeader(%q) = %+v, want an error", bad, h)
		}
	}
}

func FuzzParseHeader(f *testing.F) {
	f.Add("FILE snap.bin 1234 " + strings.Repeat("ab", 32))
	f.Add("FILE ../x 1 0")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := parseHeader(s)
		if err != nil {
			return
		}
		if checkName(h.name) != nil || filepath.Base(h.name) != h.name || h.name == ".." || h.size < 0 || h.size > MaxSize || len(h.sum) != 64 {
			t.Fatalf("parseHeader(%q) accepted %+v", s, h)
		}
		if back := fmt.Sprintf("FILE %s %d %s", h.name, h.size, h.sum); back != s {
			t.Fatalf("parseHeader(%q) = %+v, which prints as %q", s, h, back)
		}
	})
}

// TestRead: read reports each file's size; a missing file fails the run.
func TestRead(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.snap")
	if err := os.WriteFile(a, make([]byte, 3<<20+5), 0o644); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	if code := run([]string{"read", a}, &out); code != 0 || !regexp.MustCompile(`(?m)^nodefile: read a\.snap 3145733 bytes in \d+\.\d ms$`).MatchString(out.String()) || !strings.HasSuffix(out.String(), "nodefile: OK\n") {
		t.Errorf("read = %d, %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"read", filepath.Join(dir, "none")}, &out); code != 1 || !strings.Contains(out.String(), "FAILED") {
		t.Errorf("read of a missing file = %d, %q", code, out.String())
	}
	out.Reset()
	if code := run([]string{"read"}, &out); code != 2 {
		t.Errorf("read without files = %d, %q", code, out.String())
	}
}
