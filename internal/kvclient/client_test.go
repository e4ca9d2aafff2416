package kvclient_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/guestinit/kvstore"
	"github.com/understudy-vmm/understudy/internal/kvclient"
)

// serve runs the real service on a file of size bytes, on ln.
func serve(t *testing.T, ln net.Listener, size int64) *kvstore.Server {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	s, err := kvstore.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	srv := kvstore.NewServer(s, nil)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close(); s.Close() })
	return srv
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func TestClient(t *testing.T) {
	ln := listen(t)
	srv := serve(t, ln, 1<<20)
	c, err := kvclient.Dial(context.Background(), ln.Addr().String(), kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if h := c.Hello(); h.Instance != srv.Instance() || h.Conn != 1 {
		t.Errorf("Hello() = %+v, want instance %s, conn 1", h, srv.Instance())
	}
	if err := c.Ping(); err != nil {
		t.Fatal(err)
	}
	for i, kv := range [][2]string{{"a", "1"}, {"b", "2"}, {"a", "3"}} {
		if seq, err := c.Put(kv[0], kv[1]); err != nil || seq != uint64(i+1) {
			t.Fatalf("Put(%s, %s) = %d, %v, want %d", kv[0], kv[1], seq, err, i+1)
		}
	}
	want := map[string]kvclient.Ack{"a": {"3", 3}, "b": {"2", 2}}
	if got := c.Acked(); len(got) != 2 || got["a"] != want["a"] || got["b"] != want["b"] {
		t.Errorf("Acked() = %v, want %v", got, want)
	}
	if v, ok, err := c.Get("a"); v != "3" || !ok || err != nil {
		t.Errorf("Get(a) = %q, %v, %v", v, ok, err)
	}
	if v, ok, err := c.Get("zz"); v != "" || ok || err != nil {
		t.Errorf("Get(zz) = %q, %v, %v, want missing", v, ok, err)
	}
	if k, n, err := c.Count(); k != 2 || n != 3 || err != nil {
		t.Errorf("Count() = %d, %d, %v", k, n, err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Verify(); err != nil || !v.OK(3) || !v.Direct || v.Keys != 2 {
		t.Errorf("Verify() = %+v, %v", v, err)
	}
	for _, kv := range [][2]string{{"", "v"}, {"k", "a b"}, {strings.Repeat("k", kvclient.MaxKey+1), "v"}, {"k", strings.Repeat("v", kvclient.MaxValue+1)}} {
		if _, err := c.Put(kv[0], kv[1]); err == nil {
			t.Errorf("Put(%q, %q) succeeded", kv[0], kv[1])
		}
	}
	if !c.ConnectionSurvived() || c.Reconnects() != 0 || len(c.Instances()) != 1 {
		t.Errorf("survived=%v reconnects=%d instances=%v, want one connection", c.ConnectionSurvived(), c.Reconnects(), c.Instances())
	}
}

// TestServerError: a request the service refuses is a ServerError, and the
// connection goes on.
func TestServerError(t *testing.T) {
	ln := listen(t)
	serve(t, ln, 2*kvstore.BlockSize) // room for 15 records
	c, err := kvclient.Dial(context.Background(), ln.Addr().String(), kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for range 15 {
		if _, err := c.Put("k", "v"); err != nil {
			t.Fatal(err)
		}
	}
	var se *kvclient.ServerError
	if _, err := c.Put("k", "v"); !errors.As(err, &se) || !strings.Contains(se.Msg, "log full") {
		t.Errorf("Put into a full log = %v, want a ServerError saying log full", err)
	}
	if err := c.Ping(); err != nil || !c.ConnectionSurvived() {
		t.Errorf("after an ERR answer: Ping() = %v, survived=%v", err, c.ConnectionSurvived())
	}
}

// TestDialRetries: the service starts listening after the client began
// dialling.
func TestDialRetries(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	ln.Close()
	go func() {
		time.Sleep(300 * time.Millisecond)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Error(err)
			return
		}
		serve(t, ln, 1<<20)
	}()
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{RetryEvery: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, err := kvclient.Dial(context.Background(), "127.0.0.1:1", kvclient.Options{RetryFor: 100 * time.Millisecond, RetryEvery: 20 * time.Millisecond}); err == nil || !strings.Contains(err.Error(), "no connection after") {
		t.Errorf("Dial(nothing listening) = %v, want no connection", err)
	}
}

// silent accepts connections, greets them, and then says nothing: a
// service that stopped answering.
func silent(t *testing.T, greeting string) string {
	ln := listen(t)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, greeting)
			t.Cleanup(func() { c.Close() })
		}
	}()
	return ln.Addr().String()
}

func TestRequestTimeout(t *testing.T) {
	addr := silent(t, "HELLO understudy-kv 1 instance=ab conn=7\n")
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{RequestTimeout: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(); !errors.Is(err, kvclient.ErrBroken) {
		t.Errorf("Ping() with no answer = %v, want ErrBroken", err)
	}
	if b := c.Breaks(); len(b) != 1 || b[0].Cause != "timeout" || c.ConnectionSurvived() {
		t.Errorf("Breaks() = %v, survived=%v, want one timeout", b, c.ConnectionSurvived())
	}
	if err := c.Ping(); !errors.Is(err, kvclient.ErrBroken) {
		t.Errorf("Ping() on a broken client = %v, want ErrBroken", err)
	}
}

// TestReconnect: with Reconnect, a request whose connection broke is sent
// again on a new one, which the client counts. A proxy between the client
// and the service resets the connection, as a middlebox would.
func TestReconnect(t *testing.T) {
	ln := listen(t)
	srv := serve(t, ln, 1<<20)
	p := newProxy(t, ln.Addr().String())
	c, err := kvclient.Dial(context.Background(), p.addr, kvclient.Options{Reconnect: true, RetryEvery: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Put("a", "1"); err != nil {
		t.Fatal(err)
	}
	p.reset()
	if _, err := c.Put("b", "2"); err != nil {
		t.Fatal(err)
	}
	if c.ConnectionSurvived() || c.Reconnects() != 1 || len(c.Breaks()) != 1 || c.Breaks()[0].Cause != "reset" {
		t.Errorf("survived=%v reconnects=%d breaks=%v, want one reconnection after a reset", c.ConnectionSurvived(), c.Reconnects(), c.Breaks())
	}
	if h := c.Hello(); h.Conn != 2 || h.Instance != srv.Instance() || len(c.Instances()) != 1 {
		t.Errorf("Hello() after reconnecting = %+v, instances %v, want conn 2 of the one instance", h, c.Instances())
	}
	if v, ok, err := c.Get("a"); v != "1" || !ok || err != nil {
		t.Errorf("Get(a) after reconnecting = %q, %v, %v", v, ok, err)
	}
}

// proxy relays TCP connections to a service; reset cuts them all with a
// TCP reset towards the client.
type proxy struct {
	addr  string
	mu    sync.Mutex // guards conns
	conns []*net.TCPConn
}

func newProxy(t *testing.T, to string) *proxy {
	ln := listen(t)
	t.Cleanup(func() { ln.Close() })
	p := &proxy{addr: ln.Addr().String()}
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
			p.mu.Lock()
			p.conns = append(p.conns, c.(*net.TCPConn), s.(*net.TCPConn))
			p.mu.Unlock()
			go func() { io.Copy(s, c); s.Close() }()
			go func() { io.Copy(c, s); c.Close() }()
		}
	}()
	t.Cleanup(p.reset)
	return p
}

func (p *proxy) reset() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.SetLinger(0)
		c.Close()
	}
	p.conns = nil
}

func FuzzParseHello(f *testing.F) {
	f.Add("HELLO understudy-kv 1 instance=00ff conn=3")
	f.Add("HELLO understudy-kv 2 instance=00ff conn=3")
	f.Add("ERR too many connections")
	f.Fuzz(func(t *testing.T, s string) {
		h, err := kvclient.ParseHello(s)
		if err == nil && (h.Instance == "" || !strings.HasPrefix(s, "HELLO")) {
			t.Fatalf("ParseHello(%q) = %+v", s, h)
		}
	})
}

// TestAnswers: answers the client does not expect are errors, never a
// success or a panic.
func TestAnswers(t *testing.T) {
	for _, tt := range []struct {
		answer string
		do     func(c *kvclient.Client) error
	}{
		{"OK x", func(c *kvclient.Client) error { _, err := c.Put("k", "v"); return err }},
		{"OK 0", func(c *kvclient.Client) error { _, err := c.Put("k", "v"); return err }},
		{"VALUE a b", func(c *kvclient.Client) error { _, _, err := c.Get("k"); return err }},
		{"COUNT keys=1", func(c *kvclient.Client) error { _, _, err := c.Count(); return err }},
		{"VERIFIED records=1 keys=1 matched=1 mismatched=0 direct=maybe", func(c *kvclient.Client) error { _, err := c.Verify(); return err }},
		{"PONG!", func(c *kvclient.Client) error { return c.Ping() }},
		{strings.Repeat("x", 5000), func(c *kvclient.Client) error { return c.Ping() }},
	} {
		ln := listen(t)
		go func() {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close()
			io.WriteString(conn, "HELLO understudy-kv 1 instance=ab conn=1\n")
			r := bufio.NewReader(conn)
			r.ReadString('\n')
			io.WriteString(conn, tt.answer+"\n")
			if line, _ := r.ReadString('\n'); line == "QUIT\n" {
				io.WriteString(conn, "BYE\n")
			}
		}()
		c, err := kvclient.Dial(context.Background(), ln.Addr().String(), kvclient.Options{RequestTimeout: 10 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if err := tt.do(c); err == nil {
			t.Errorf("answer %.40q taken as a success", tt.answer)
		}
		c.Close()
		ln.Close()
	}
}
