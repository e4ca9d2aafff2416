package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// Helpers for the role runners' tests: a cluster of real credentials,
// links over loopback mutual TLS, and a log that a test can wait on.

// cluster issues real node credentials of one test CA.
type cluster struct {
	t  testing.TB
	ca *transport.CA
}

func newCluster(t testing.TB) *cluster {
	t.Helper()
	ca, err := transport.NewCA("test-cluster", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{t: t, ca: ca}
}

// links returns the link configuration of node name, restricted to role,
// whose detail goes to log.
func (c *cluster) links(name string, role Role, log *slog.Logger) LinkConfig {
	c.t.Helper()
	crt, key, err := c.ca.IssueNode(transport.NodeSpec{Name: name, Role: role.Wire()})
	if err != nil {
		c.t.Fatal(err)
	}
	creds, err := transport.NewCredentials(c.ca.CertPEM(), crt, key)
	if err != nil {
		c.t.Fatal(err)
	}
	return LinkConfig{Credentials: creds, Heartbeat: 50 * time.Millisecond, PeerTimeout: 5 * time.Second, Log: log}
}

// dial connects to addr as node name of role, announcing memSize.
func (c *cluster) dial(name string, role Role, memSize uint64, addr string) transport.Conn {
	c.t.Helper()
	l := c.links(name, role, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := transport.Dial(ctx, addr, l.transport(role.Wire(), memSize))
	if err != nil {
		c.t.Fatalf("Dial(%s as %v %q) = %v", addr, role, name, err)
	}
	c.t.Cleanup(func() { conn.Close() })
	return conn
}

// listen listens on loopback as node name of role, accepting peers.
func (c *cluster) listen(name string, role Role, peers ...wire.Role) transport.Listener {
	c.t.Helper()
	l := c.links(name, role, nil)
	ln, err := transport.Listen("tcp://127.0.0.1:0", l.transport(role.Wire(), 0, peers...))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { ln.Close() })
	return ln
}

// testLog is a slog.Handler that keeps every record's line (message and
// attributes) for a test to wait on.
type testLog struct {
	mu    *sync.Mutex
	lines *[]string
	added *sync.Cond
	attrs string
}

func newTestLog() (*slog.Logger, *testLog) {
	mu := new(sync.Mutex)
	h := &testLog{mu: mu, lines: new([]string), added: sync.NewCond(mu)}
	return slog.New(h), h
}

func (h *testLog) Enabled(context.Context, slog.Level) bool { return true }
func (h *testLog) Handle(_ context.Context, r slog.Record) error {
	line := r.Message + h.attrs
	r.Attrs(func(a slog.Attr) bool { line += fmt.Sprintf(" %s=%v", a.Key, a.Value); return true })
	h.mu.Lock()
	*h.lines = append(*h.lines, line)
	h.added.Broadcast()
	h.mu.Unlock()
	return nil
}
func (h *testLog) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	for _, a := range as {
		c.attrs += fmt.Sprintf(" %s=%v", a.Key, a.Value)
	}
	return &c
}
func (h *testLog) WithGroup(string) slog.Handler { return h }

// waitFor waits up to 20 s for a line matching re and returns its
// submatches.
func (h *testLog) waitFor(t testing.TB, re string) []string {
	t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(20 * time.Second)
	stop := time.AfterFunc(20*time.Second, func() { h.mu.Lock(); h.added.Broadcast(); h.mu.Unlock() })
	defer stop.Stop()
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		for _, l := range *h.lines {
			if m := rx.FindStringSubmatch(l); m != nil {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line matches %q; the log:\n%s", re, strings.Join(*h.lines, "\n"))
		}
		h.added.Wait()
	}
}

// has reports whether a line contains s.
func (h *testLog) has(s string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, l := range *h.lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

// readError reads from c until an Error arrives (skipping Status) and
// returns it.
func readError(t testing.TB, c MessageConn) *wire.Error {
	t.Helper()
	for {
		m, err := c.ReadMessage()
		var we *wire.Error
		if errors.As(err, &we) {
			return we
		}
		if err != nil {
			t.Fatalf("reading for an Error: %v", err)
		}
		switch m := m.(type) {
		case *wire.Error:
			return m
		case *wire.Status:
		default:
			t.Fatalf("read %v, want an Error", m.Type())
		}
	}
}

// sendFull sends a full image of epoch e, as a primary does first on every
// link, and waits for its acknowledgement.
func sendFull(t *testing.T, c MessageConn, e uint64) {
	t.Helper()
	sendAcked(t, c, testCheckpoint(e, true, 0, 1, 2, 3), 0)
}
