package transport

import (
	"crypto/rand"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// strangers opens TCP connections to addr from source addresses 127.x.y.z
// other than 127.0.0.1 (all of 127/8 is loopback) and keeps them open: idle
// ones that never send a byte, and garbage ones that send random bytes
// (they are refused and reopen). It stops when stop is closed.
type strangers struct {
	mu    sync.Mutex
	conns []net.Conn
	wg    sync.WaitGroup
}

// idle opens n idle connections from source 127.0.s.k, each source holding
// per of them.
func (s *strangers) idle(t *testing.T, addr string, n, per int, s3 byte) {
	t.Helper()
	for i := 0; i < n; i++ {
		src := net.IPv4(127, 0, s3, byte(2+i/per))
		c, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: src}}).Dial("tcp", addr)
		if err != nil {
			t.Fatalf("stranger %d from %v: %v", i, src, err)
		}
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.mu.Unlock()
	}
}

// garbage keeps n sources sending random bytes on fresh connections until
// stop closes.
func (s *strangers) garbage(addr string, n int, s3 byte, stop <-chan struct{}) {
	for i := 0; i < n; i++ {
		src := net.IPv4(127, 0, s3, byte(2+i))
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			buf := make([]byte, 512)
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: src}, Timeout: time.Second}).Dial("tcp", addr)
				if err != nil {
					continue
				}
				rand.Read(buf)
				c.Write(buf)
				c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				c.Read(buf)
				c.Close()
			}
		}()
	}
}

func (s *strangers) close() {
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		c.Close()
	}
}

// pendingCount returns how many connections l holds in the handshake.
func pendingCount(l Listener) int {
	a := &l.(*listener).adm
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.pending)
}

// TestStrangersCannotLockOut: hundreds of idle and garbage connections from
// strangers that cannot authenticate, more than the listener holds in the
// handshake, never keep a valid peer out: a primary connects among them
// for the first time, and reconnects among them again, while the strangers
// keep coming. (Before, 32 idle connections filled the listener and every
// later one was dropped, the primary's too.)
func TestStrangersCannotLockOut(t *testing.T) {
	p := newPKI(t)
	var logs logBuf
	l := listen(t, &Config{Credentials: p.node("inter", wire.RoleIntermediary), Logger: logs.logger(),
		PeerRoles: []wire.Role{wire.RolePrimary}})
	addr := strings.TrimPrefix(l.Addr().String(), "tcp://")
	var s strangers
	stop := make(chan struct{})
	defer func() { close(stop); s.close() }()
	// 300 idle connections from 30 sources (more than a source may hold in
	// the handshake), and 100 from 100 sources of one each.
	s.idle(t, addr, 300, 10, 0)
	s.idle(t, addr, 100, 1, 1)
	s.garbage(addr, 50, 2, stop)
	deadline := time.Now().Add(10 * time.Second)
	for pendingCount(l) < maxPending {
		if time.Now().After(deadline) {
			t.Fatalf("the listener holds %d connections in the handshake; want the strangers to fill all %d", pendingCount(l), maxPending)
		}
		time.Sleep(time.Millisecond)
	}
	pcfg := &Config{Credentials: p.node("prim", wire.RolePrimary), PeerName: "inter"}
	for round := range 3 {
		// More strangers arrive while the primary (re)connects.
		s.idle(t, addr, 60, 1, byte(10+round))
		c := dial(t, l.Addr().String(), pcfg)
		a := accept(t, l)
		if got := a.Peer().Name; got != "prim" {
			t.Fatalf("round %d: accepted %q, want the primary", round, got)
		}
		if err := c.WriteMessage(&wire.Ack{Epoch: uint64(round + 1)}); err != nil {
			t.Fatal(err)
		}
		if m, err := a.ReadMessage(); err != nil || m.(*wire.Ack).Epoch != uint64(round+1) {
			t.Fatalf("round %d: read %v, %v", round, m, err)
		}
		c.Close()
		a.Close()
	}
	if n := pendingCount(l); n > maxPending {
		t.Errorf("%d connections in the handshake, above the bound %d", n, maxPending)
	}
	if !strings.Contains(logs.String(), "refused peer") {
		t.Errorf("garbage peers were not refused in the log:\n%.2000s", logs.String())
	}
}

// TestAdmissionPerSource: one source holds at most maxPerSource connections
// in the handshake; its newest one makes room by dropping its own oldest.
// A source that authenticated before is never dropped for a stranger's
// room, and always gets in.
func TestAdmissionPerSource(t *testing.T) {
	a := newAdmission(4, 2)
	conn := func(ip string) net.Conn { return fakeConn{ip: ip} }
	admit := func(ip string) (*pending, []*pending) {
		t.Helper()
		p, ev, ok := a.admit(conn(ip))
		if !ok {
			t.Fatalf("admit(%s) refused", ip)
		}
		return p, ev
	}
	known, _ := admit("10.0.0.1")
	a.done(known, true) // 10.0.0.1 authenticated: expected
	p1, _ := admit("10.0.0.9")
	admit("10.0.0.9")
	if _, ev := admit("10.0.0.9"); len(ev) != 1 || ev[0] != p1 {
		t.Fatalf("a third connection from one source evicted %v; want its own oldest", ev)
	}
	admit("10.0.0.8")
	e1, _ := admit("10.0.0.1")
	if fmt.Sprint(len(a.pending)) != "4" {
		t.Fatalf("%d pending, want 4", len(a.pending))
	}
	// Full: a stranger makes room by evicting the busiest stranger, never
	// the expected source's connection.
	_, ev := admit("10.0.0.7")
	if len(ev) != 1 || ev[0].src != "10.0.0.9" {
		t.Fatalf("a stranger at a full listener evicted %+v; want the busiest stranger's oldest", ev)
	}
	for _, q := range a.pending {
		if q == e1 {
			return
		}
	}
	t.Fatalf("the expected source's connection was evicted")
}

type fakeConn struct {
	net.Conn
	ip string
}

func (f fakeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.ParseIP(f.ip), Port: 1} }
func (f fakeConn) Close() error         { return nil }
