package ft

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/testutil"
)

// The intermediary's runner over real loopback mTLS links. The primary is
// the test, speaking the protocol as a primary does; the backup is a
// stand-in that commits nothing but answers as a backup does (the real
// backup's activation needs a machine).

const runMem = 4 << 20

// standInBackup accepts intermediaries on ln and answers as a backup: a
// Status first, an Ack for every verified checkpoint, and for an Activate,
// once activate lets it, Ready. Activations are reported on activated.
type standInBackup struct {
	ln        transport.Listener
	activated chan uint64
	activate  chan struct{} // closed to let activations finish
	refuse    *wire.Error   // if set, every intermediary is refused with it
}

func newStandInBackup(t *testing.T, c *cluster) *standInBackup {
	b := &standInBackup{ln: c.listen("backup", RoleBackup, wire.RoleIntermediary), activated: make(chan uint64, 4), activate: make(chan struct{})}
	return b
}

func (b *standInBackup) serve(ctx context.Context) {
	for {
		c, err := b.ln.Accept(ctx)
		if err != nil {
			return
		}
		go b.serveOne(c)
	}
}

func (b *standInBackup) serveOne(c transport.Conn) {
	defer c.Close()
	if b.refuse != nil {
		c.CloseWithError(b.refuse.Code, b.refuse.Reason)
		return
	}
	if c.WriteMessage(&wire.Status{Role: wire.RoleBackup}) != nil {
		return
	}
	maxPFN := uint64(c.Peer().Hello.MemSize / 4096)
	for {
		m, err := c.ReadMessage()
		if err != nil {
			return
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			cp, _, err := ReceiveCheckpoint(c, m, maxPFN)
			if err != nil || c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}) != nil {
				return
			}
		case *wire.Activate:
			b.activated <- m.Epoch
			<-b.activate
			c.WriteMessage(&wire.Ready{})
			lingerClose(c, activationLinger) // as RunBackup does
			return
		case *wire.Bye:
			return
		}
	}
}

// intermediaryRig runs RunIntermediary against a stand-in backup.
type intermediaryRig struct {
	c      *cluster
	b      *standInBackup
	log    *testLog
	addr   string
	done   chan error
	cancel context.CancelFunc
}

func startIntermediary(t *testing.T, setup ...func(*standInBackup)) *intermediaryRig {
	return startIntermediaryWith(t, nil, setup...)
}

// startIntermediaryWith is startIntermediary with cfg changing the
// intermediary's configuration first (nil: none).
func startIntermediaryWith(t *testing.T, cfg func(*IntermediaryRunConfig), setup ...func(*standInBackup)) *intermediaryRig {
	c := newCluster(t)
	b := newStandInBackup(t, c)
	for _, f := range setup {
		f(b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	go b.serve(ctx)
	log, tl := newTestLog()
	r := &intermediaryRig{c: c, b: b, log: tl, done: make(chan error, 1), cancel: cancel}
	rc := IntermediaryRunConfig{Listen: "tcp://127.0.0.1:0", Backup: b.ln.Addr().String(),
		Links: c.links("intermediary", RoleIntermediary, log), Log: log, BackupRetry: 50 * time.Millisecond, FailoverTimeout: 10 * time.Second}
	if cfg != nil {
		cfg(&rc)
	}
	go func() { r.done <- RunIntermediary(ctx, rc) }()
	r.addr = tl.waitFor(t, `listening on (tcp://\S+)`)[1]
	return r
}

func (r *intermediaryRig) primary(t *testing.T, name string) transport.Conn {
	return r.c.dial(name, RolePrimary, runMem, r.addr)
}

func (r *intermediaryRig) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatal("RunIntermediary did not return")
		return nil
	}
}

// TestRunIntermediaryReconnectAfterRefusal: a primary whose message the
// intermediary refused is alive; it reconnects within the peer timeout and
// is served again from a full image, without a failover. Another primary
// that connects meanwhile is refused.
func TestRunIntermediaryReconnectAfterRefusal(t *testing.T) {
	r := startIntermediary(t)
	p := r.primary(t, "primary")
	sendEpoch(t, p, 1)
	sendEpoch(t, p, 2)

	// Out of protocol: refused, the link ends, nothing changes.
	if err := p.WriteMessage(&wire.Ack{Epoch: 7}); err != nil {
		t.Fatal(err)
	}
	if e := readError(t, p); e.Code != wire.CodeProtocol {
		t.Errorf("refusal = %v, want CodeProtocol", e)
	}
	r.log.waitFor(t, `refused the primary's message: .*; waiting .* for the primary to reconnect`)

	// Another primary is refused while the intermediary waits for its own.
	other := r.primary(t, "other")
	if e := readError(t, other); e.Code != wire.CodeRefused || !strings.Contains(e.Reason, `protects primary "primary" (guest memory 4 MiB) already`) {
		t.Errorf("another primary's refusal = %v, want CodeRefused naming the protected primary", e)
	}
	r.log.waitFor(t, `refused primary "other": this intermediary protects primary "primary" \(guest memory 4 MiB\) already`)

	// The same primary comes back with a full image and is served.
	p = r.primary(t, "primary")
	sendFull(t, p, 3)
	r.log.waitFor(t, `primary "primary" reconnected`)
	sendEpoch(t, p, 4)
	if err := p.WriteMessage(&wire.Bye{Reason: "guest exited"}); err != nil {
		t.Fatal(err)
	}
	if err := r.wait(t); err != nil {
		t.Errorf("RunIntermediary after the guest exited = %v, want nil", err)
	}
	r.log.waitFor(t, `primary finished at epoch 4`)
	if r.log.has("failing over") || len(r.b.activated) != 0 {
		t.Errorf("a refusal led to a failover")
	}
}

// TestRunIntermediaryRefusesSecondPrimary: a second authenticated primary
// is refused with a reason and logged while the first is served, which goes
// on undisturbed.
func TestRunIntermediaryRefusesSecondPrimary(t *testing.T) {
	r := startIntermediary(t)
	p := r.primary(t, "primary")
	sendEpoch(t, p, 1)
	second := r.primary(t, "primary2")
	if e := readError(t, second); e.Code != wire.CodeRefused || !strings.Contains(e.Reason, `protects primary "primary" (guest memory 4 MiB) already`) {
		t.Errorf("second primary's refusal = %v, want CodeRefused naming the primary served", e)
	}
	r.log.waitFor(t, `refused primary "primary2": this intermediary protects primary "primary" \(guest memory 4 MiB\) already`)
	sendEpoch(t, p, 2)
	if err := p.WriteMessage(&wire.Bye{Reason: "guest exited"}); err != nil {
		t.Fatal(err)
	}
	if err := r.wait(t); err != nil {
		t.Errorf("RunIntermediary = %v, want nil", err)
	}
}

// TestRunIntermediaryFencesOnFailover: a primary lost without a goodbye is
// failed over to the backup at the last acknowledged epoch, and a primary
// that reaches the intermediary after it was fenced is told so (CodeFenced),
// never served. The intermediary exits once the backup has activated.
func TestRunIntermediaryFencesOnFailover(t *testing.T) {
	r := startIntermediary(t)
	p := r.primary(t, "primary")
	sendEpoch(t, p, 1)
	sendEpoch(t, p, 2)
	p.Close() // the primary's host is lost

	var epoch uint64
	select {
	case epoch = <-r.b.activated:
	case <-time.After(20 * time.Second):
		t.Fatal("the backup was never asked to activate")
	}
	if epoch != 2 {
		t.Errorf("Activate{%d}, want the last acknowledged epoch 2", epoch)
	}
	// Fenced now: the primary, back again, must stop its guest.
	back := r.primary(t, "primary")
	if e := readError(t, back); e.Code != wire.CodeFenced {
		t.Errorf("a fenced primary reconnecting got %v, want CodeFenced", e)
	}
	r.log.waitFor(t, `refused primary "primary": this intermediary has failed over`)
	close(r.b.activate)
	if err := r.wait(t); err != nil {
		t.Errorf("RunIntermediary after the failover = %v, want nil", err)
	}
	r.log.waitFor(t, `primary lost at epoch 2 .*: failing over`)
	r.log.waitFor(t, `backup activated at epoch 2`)
}

// TestRunIntermediaryFailoverOutlastsTimeout: FailoverTimeout bounds the
// wait for a backup to attach, not the failover itself: an attached backup
// that takes longer than it to catch up and activate (one lagging far
// behind on a slow link) is waited for, and the intermediary reports the
// activation, not a failure.
func TestRunIntermediaryFailoverOutlastsTimeout(t *testing.T) {
	r := startIntermediaryWith(t, func(c *IntermediaryRunConfig) { c.FailoverTimeout = 100 * time.Millisecond })
	p := r.primary(t, "primary")
	sendEpoch(t, p, 1)
	p.Close()
	select {
	case <-r.b.activated:
	case <-time.After(20 * time.Second):
		t.Fatal("the backup was never asked to activate")
	}
	time.Sleep(time.Second) // ten times the failover timeout
	close(r.b.activate)
	if err := r.wait(t); err != nil {
		t.Errorf("RunIntermediary after a failover longer than its timeout = %v, want nil", err)
	}
	r.log.waitFor(t, `backup activated at epoch 1`)
}

// TestRunIntermediaryFencedByActiveBackup: a backup that runs the guest
// already (an earlier failover) refuses the intermediary; the intermediary
// fences its primary, which must stop, and ends with ErrBackupActive.
func TestRunIntermediaryFencedByActiveBackup(t *testing.T) {
	r := startIntermediary(t, func(b *standInBackup) {
		b.refuse = &wire.Error{Code: wire.CodeFenced, Reason: "this backup runs the guest (activated at epoch 9)"}
	})
	p := r.primary(t, "primary")
	if e := readError(t, p); e.Code != wire.CodeFenced {
		t.Errorf("the primary got %v, want CodeFenced", e)
	}
	if err := r.wait(t); !errors.Is(err, ErrBackupActive) {
		t.Errorf("RunIntermediary = %v, want ErrBackupActive", err)
	}
	r.log.waitFor(t, `runs the guest already.*the primary is fenced and must stop its guest`)
}

// TestGateHoldsKeptPeer: a peer the role will want, arriving while the role
// does not wait (a primary reconnecting at once after a refusal), is held
// for the role's next call of next, one at a time; any other peer, and a
// kept one while another is held, is refused; Close refuses the one held.
func TestGateHoldsKeptPeer(t *testing.T) {
	c := newCluster(t)
	log, tl := newTestLog()
	ln, err := transport.Listen("tcp://127.0.0.1:0", c.links("intermediary", RoleIntermediary, log).transport(wire.RoleIntermediary, 0, wire.RolePrimary))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	g := newGate(ctx, ln, log, func(transport.Peer) (wire.Code, string) { return wire.CodeRefused, "not now" },
		func(p transport.Peer) bool { return p.Name == "kept" })
	defer g.Close()
	addr := ln.Addr().String()

	if e := readError(t, c.dial("other", RolePrimary, runMem, addr)); e.Code != wire.CodeRefused || e.Reason != "not now" {
		t.Errorf("a peer not kept: %v, want refused", e)
	}
	kept := c.dial("kept", RolePrimary, runMem, addr)
	testutil.WaitFor(t, "the kept peer held", func() bool { return len(g.held) == 1 })
	tl.waitFor(t, `primary "kept" connected again; held until it can be served`)
	if e := readError(t, c.dial("kept", RolePrimary, runMem, addr)); e.Code != wire.CodeRefused {
		t.Errorf("a second kept peer while one is held: %v, want refused", e)
	}
	got, err := g.next(ctx)
	if err != nil || got.Peer().Name != "kept" || got.RemoteAddr().String() != kept.LocalAddr().String() {
		t.Fatalf("next = %v, %v; want the held peer", got, err)
	}
	if err := got.WriteMessage(&wire.Ack{Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if m, err := kept.ReadMessage(); err != nil || m.Type() != wire.TypeAck {
		t.Errorf("the held peer's link: %v, %v; want it served", m, err)
	}
	held := c.dial("kept", RolePrimary, runMem, addr)
	testutil.WaitFor(t, "the kept peer held again", func() bool { return len(g.held) == 1 })
	g.Close()
	if e := readError(t, held); e.Code != wire.CodeRefused {
		t.Errorf("the peer held at Close: %v, want refused", e)
	}
}
