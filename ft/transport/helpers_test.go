package transport

import (
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/testutil"
)

// pki is a test cluster: a CA and helpers to issue credentials from it.
type pki struct {
	t  testing.TB
	ca *CA
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	// Backdated, so tests can issue certificates that expired already.
	ca, err := newCA("test cluster", time.Now().Add(-72*time.Hour), 0)
	if err != nil {
		t.Fatalf("newCA() = %v", err)
	}
	return &pki{t: t, ca: ca}
}

// creds issues credentials for spec, checked at time now (time.Now() if zero).
func (p *pki) creds(spec NodeSpec, now time.Time) *Credentials {
	p.t.Helper()
	crt, key, err := p.ca.IssueNode(spec)
	if err != nil {
		p.t.Fatalf("IssueNode(%+v) = %v", spec, err)
	}
	if now.IsZero() {
		now = time.Now()
	}
	c, err := newCredentials(p.ca.CertPEM(), crt, key, now)
	if err != nil {
		p.t.Fatalf("newCredentials(%s) = %v", spec.Name, err)
	}
	return c
}

func (p *pki) node(name string, role wire.Role) *Credentials {
	return p.creds(NodeSpec{Name: name, Role: role}, time.Time{})
}

// logBuf collects log output from several goroutines.
type logBuf struct{ testutil.Buffer }

func (l *logBuf) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// waitFor polls until the log contains every one of subs, or fails.
func (l *logBuf) waitFor(t *testing.T, subs ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := l.String()
		missing := ""
		for _, sub := range subs {
			if !strings.Contains(s, sub) {
				missing = sub
				break
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("log lacks %q after 5s; log:\n%s", missing, s)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// listen starts a listener on loopback TCP, closed when the test ends.
func listen(t *testing.T, cfg *Config) Listener {
	t.Helper()
	l, err := Listen("tcp://127.0.0.1:0", cfg)
	if err != nil {
		t.Fatalf("Listen(tcp://127.0.0.1:0) = %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// accept accepts one link within a few seconds, closed when the test ends.
func accept(t *testing.T, l Listener) Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := l.Accept(ctx)
	if err != nil {
		t.Fatalf("Accept() = %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// dial dials addr, failing the test on error.
func dial(t *testing.T, addr string, cfg *Config) Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, cfg)
	if err != nil {
		t.Fatalf("Dial(%s) = %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// expectNoAccept checks nothing is waiting to be accepted.
func expectNoAccept(t *testing.T, l Listener) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if c, err := l.Accept(ctx); err == nil {
		t.Fatalf("Accept() = link from %q, want none (a refused peer got through)", c.Peer().Name)
	}
}

// TestMain keeps links that tests do not watch from logging to stderr.
func TestMain(m *testing.M) {
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	os.Exit(m.Run())
}
