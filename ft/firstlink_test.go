package ft

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// The first link of RunPrimary (firstlink.go): waited for while nothing
// answers, refused at once when the peer refuses, over real loopback TCP
// and TLS.

const firstLinkMem = 8 << 20

// primaryRun is a RunPrimary in its goroutine.
type primaryRun struct {
	log  *testLog
	m    atomic.Pointer[vmm.Machine] // set before the first dial
	done chan struct{}
	err  error // read after done

	mu       sync.Mutex // guards released
	released []uint64
}

// startFirstLinkPrimary runs a primary of c protecting a counter guest of
// iterations records (0: for ever) through the intermediary at addr
// (tcp://host:port).
func startFirstLinkPrimary(t *testing.T, ctx context.Context, c *cluster, addr string, connectTimeout time.Duration, iterations int) *primaryRun {
	t.Helper()
	log, tl := newTestLog()
	r := &primaryRun{log: tl, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		_, r.err = RunPrimary(ctx, PrimaryRunConfig{
			Machine: vmm.Config{MemSize: firstLinkMem, Payload: &vmm.PayloadConfig{Name: "counter",
				Options: map[string]string{"pages": "16", "iterations": fmt.Sprint(iterations), "report": "0"}}},
			Epochs: PrimaryConfig{Interval: 10 * time.Millisecond, Redial: 20 * time.Millisecond, OnRelease: func(rec vmm.Record) {
				r.mu.Lock()
				r.released = append(r.released, rec.Value)
				r.mu.Unlock()
			}},
			Intermediary: addr, ConnectTimeout: connectTimeout,
			Links: c.links("primary", RolePrimary, log), Log: log,
			OnStart: func(m *vmm.Machine) (func(), error) { r.m.Store(m); return nil, nil },
		})
	}()
	t.Cleanup(func() { <-r.done })
	return r
}

// wait waits for RunPrimary to return (a guard against a hang: 2 minutes).
func (r *primaryRun) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(2 * time.Minute):
		r.log.mu.Lock()
		defer r.log.mu.Unlock()
		t.Fatalf("RunPrimary has not returned; its log:\n%s", strings.Join(*r.log.lines, "\n"))
		return nil
	}
}

// waits counts the reports of a wait for the intermediary.
func (r *primaryRun) waits() int {
	r.log.mu.Lock()
	defer r.log.mu.Unlock()
	n := 0
	for _, l := range *r.log.lines {
		if strings.HasPrefix(l, "waiting for the intermediary at ") {
			n++
		}
	}
	return n
}

// ackAll is a stand-in intermediary on ln: it acknowledges every
// checkpoint of the one primary that connects, until the link ends.
func ackAll(ctx context.Context, ln transport.Listener) {
	pc, err := ln.Accept(ctx)
	if err != nil {
		return
	}
	defer pc.Close()
	for {
		m, err := pc.ReadMessage()
		if err != nil {
			return
		}
		begin, ok := m.(*wire.CheckpointBegin)
		if !ok {
			continue
		}
		cp, _, err := ReceiveCheckpoint(pc, begin, firstLinkMem/4096)
		if err != nil || pc.WriteMessage(&wire.Ack{Epoch: cp.Epoch}) != nil {
			return
		}
	}
}

// TestRunPrimaryWaitsForIntermediary: a primary started before its
// intermediary listens waits, reporting why, with its guest not started;
// once the intermediary listens the first link comes up and the guest runs
// to its end with every record released in order.
func TestRunPrimaryWaitsForIntermediary(t *testing.T) {
	kvmtest.Require(t)
	c := newCluster(t)
	addr := freeAddr(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const iterations = 3000
	r := startFirstLinkPrimary(t, ctx, c, addr, 10*time.Minute, iterations)
	m := r.log.waitFor(t, `^waiting for the intermediary at `+regexp.QuoteMeta(addr)+` \((\d+)s\): .*connection refused`)
	if m[1] != "0" {
		t.Errorf("the first report of the wait says %ss, want 0s: it comes at the first failure", m[1])
	}
	if pm := r.m.Load(); pm == nil {
		t.Errorf("the machine is not built while the primary waits for its first link")
	} else if st, err := pm.Stats(); err != nil || st.Exits != 0 {
		t.Errorf("while the primary waits for its first link the guest has run: %+v, %v", st, err)
	}

	l := c.links("intermediary", RoleIntermediary, nil)
	ln, err := transport.Listen(addr, l.transport(wire.RoleIntermediary, 0, wire.RolePrimary))
	if err != nil {
		t.Fatalf("listening at %s after the primary started: %v", addr, err)
	}
	defer ln.Close()
	go ackAll(ctx, ln)
	if err := r.wait(t); err != nil {
		t.Fatalf("RunPrimary = %v, want the guest run to its end once the intermediary listens", err)
	}
	r.log.waitFor(t, `^reached the intermediary at `+regexp.QuoteMeta(addr)+` after `)
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.released) != iterations {
		t.Errorf("released %d records, want the guest's %d", len(r.released), iterations)
	}
	for i, v := range r.released {
		if v != uint64(i+1) {
			t.Fatalf("released records %v...: not the guest's sequence from 1", r.released[:i+1])
		}
	}
}

// TestRunPrimaryConnectTimeoutZero: with no wait, an intermediary that
// is not there fails the primary at its first attempt, as it always did.
func TestRunPrimaryConnectTimeoutZero(t *testing.T) {
	kvmtest.Require(t)
	c := newCluster(t)
	addr := freeAddr(t)
	r := startFirstLinkPrimary(t, context.Background(), c, addr, 0, 0)
	err := r.wait(t)
	if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), strings.TrimPrefix(addr, "tcp://")) {
		t.Errorf("RunPrimary with ConnectTimeout 0 and nothing at %s = %v, want connection refused", addr, err)
	}
	if n := r.waits(); n != 0 {
		t.Errorf("with ConnectTimeout 0 the primary reported %d waits, want none", n)
	}
}

// TestRunPrimaryRefusedAtOnce: a peer that answers and refuses ends the
// wait at once, however long it may be: an intermediary whose certificate
// is of another CA, and a node of the cluster that does not take primaries
// (a backup's port).
func TestRunPrimaryRefusedAtOnce(t *testing.T) {
	kvmtest.Require(t)
	c := newCluster(t)
	foreign := newCluster(t).listen("intermediary", RoleIntermediary, wire.RolePrimary)
	backup := c.listen("backup", RoleBackup, wire.RoleIntermediary)
	for _, tt := range []struct {
		name string
		ln   transport.Listener
		want string
	}{
		{"another CA", foreign, "certificate signed by unknown authority"},
		{"a backup", backup, "refused"},
	} {
		r := startFirstLinkPrimary(t, context.Background(), c, tt.ln.Addr().String(), 10*time.Minute, 0)
		err := r.wait(t)
		if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: RunPrimary = %v, want one line with %q", tt.name, err, tt.want)
		}
		if n := r.waits(); n != 0 {
			t.Errorf("%s: the primary reported %d waits, want none: the refusal is final", tt.name, n)
		}
	}
}

// TestRunPrimaryWaitCanceled: a wait ends when its context does, with the
// context's error. The address accepts TCP and closes at once (an end of
// the stream, or a reset, before the handshake: transient), so the attempts can be
// counted; the wait is reported at most once per progressEvery however
// many attempts fail.
func TestRunPrimaryWaitCanceled(t *testing.T) {
	kvmtest.Require(t)
	c := newCluster(t)
	raw, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	var attempts atomic.Int64
	go func() {
		for {
			conn, err := raw.Accept()
			if err != nil {
				return
			}
			attempts.Add(1)
			conn.Close()
		}
	}()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	addr := "tcp://" + raw.Addr().String()
	r := startFirstLinkPrimary(t, ctx, c, addr, 10*time.Minute, 0)
	r.log.waitFor(t, `^waiting for the intermediary at `+regexp.QuoteMeta(addr)+` \(0s\): .*(EOF|connection reset by peer)$`)
	for attempts.Load() < 10 {
		select {
		case <-r.done:
			t.Fatalf("RunPrimary returned while waiting: %v", r.err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	err = r.wait(t)
	elapsed := time.Since(start)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("RunPrimary canceled while waiting = %v, want context.Canceled", err)
	}
	if n, most := r.waits(), 1+int(elapsed/progressEvery); n < 1 || n > most {
		t.Errorf("%d attempts over %v reported %d times, want 1 to %d (at most once per %v)", attempts.Load(), elapsed, n, most, progressEvery)
	}
	if r.log.has("reached the intermediary") {
		t.Errorf("a canceled wait reports the intermediary reached")
	}
	if r.log.has("handshake with peer failed") {
		t.Errorf("the wait's attempts were logged one by one by the link, not only by the wait's reports")
	}
}

// TestMutedUntilUp: the first link's logger says nothing while muted, and
// everything (attributes added meanwhile too) once unmuted.
func TestMutedUntilUp(t *testing.T) {
	log, tl := newTestLog()
	quiet, unmute := mutedUntilUp(&transport.Config{Logger: log})
	l := quiet.Logger.With("peer", "i")
	l.Warn("while muted")
	quiet.Logger.Error("while muted too")
	unmute()
	l.Warn("once up")
	tl.mu.Lock()
	defer tl.mu.Unlock()
	if got := strings.Join(*tl.lines, "|"); got != "once up peer=i" {
		t.Errorf("logged %q, want only %q", got, "once up peer=i")
	}
}

// TestTransientDialError: which dial errors a wait retries.
func TestTransientDialError(t *testing.T) {
	op := func(err error) error {
		return fmt.Errorf("transport: dial tcp://192.0.2.1:1: %w", &net.OpError{Op: "dial", Net: "tcp", Err: err})
	}
	for _, tt := range []struct {
		err  error
		want bool
	}{
		{op(syscall.ECONNREFUSED), true},
		{op(syscall.EHOSTUNREACH), true},
		{op(syscall.ENETUNREACH), true},
		{op(syscall.ECONNRESET), true},
		{op(syscall.ETIMEDOUT), true},
		{fmt.Errorf("TLS handshake: %w", io.EOF), true},
		{fmt.Errorf("read Hello: %w", io.ErrUnexpectedEOF), true},
		{fmt.Errorf("dial: %w", context.DeadlineExceeded), true},
		{&net.DNSError{Err: "server misbehaving", Name: "intermediary", IsTemporary: true}, true},
		{&net.DNSError{Err: "no such host", Name: "intermediary", IsNotFound: true}, false},
		{fmt.Errorf("peer %q refused: %w", "i", &wire.Error{Code: wire.CodeRefused, Reason: "no"}), false},
		{fmt.Errorf("read Hello: %w", tls.AlertError(42)), false}, // bad_certificate
		{errors.New("TLS handshake: peer certificate \"i\": x509: certificate signed by unknown authority"), false},
		{fmt.Errorf("transport: dial: %w", errors.New(`"tcp://x": bad address`)), false},
		{fmt.Errorf("canceled: %w", context.Canceled), false},
	} {
		if got := transientDialError(tt.err); got != tt.want {
			t.Errorf("transientDialError(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}
