package ft

import (
	"context"
	"encoding/binary"
	"errors"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
)

// link returns a connected primary→intermediary pair over mutual TLS on
// loopback TCP.
func link(t testing.TB, memSize uint64) (primary, intermediary transport.Conn) {
	t.Helper()
	return roleLink(t, memSize, wire.RolePrimary, wire.RoleIntermediary)
}

// roleLink returns a connected pair over mutual TLS on loopback TCP: the
// dialer, of role from, and the listener's end, of role to.
func roleLink(t testing.TB, memSize uint64, from, to wire.Role) (dialer, listener transport.Conn) {
	t.Helper()
	return roleLinkVia(t, memSize, from, to, "tcp://127.0.0.1:0", nil)
}

// roleLinkVia is roleLink with the listener at listenAddr, created by
// listen (nil: directly; a WAN test creates it inside a network
// namespace), and the dialer connecting to via(the listener's address)
// (nil: directly; a WAN test goes through a delaying relay).
func roleLinkVia(t testing.TB, memSize uint64, from, to wire.Role, listenAddr string, listen func(fn func() error) error,
	via ...func(string) string) (dialer, listener transport.Conn) {
	t.Helper()
	ca, err := transport.NewCA("test-cluster", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	creds := func(name string, role wire.Role) *transport.Credentials {
		crt, key, err := ca.IssueNode(transport.NodeSpec{Name: name, Role: role})
		if err != nil {
			t.Fatal(err)
		}
		c, err := transport.NewCredentials(ca.CertPEM(), crt, key)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	lcfg := &transport.Config{Credentials: creds("server", to), Hello: wire.Hello{Role: to, MemSize: memSize}, PeerRoles: []wire.Role{from}}
	var ln transport.Listener
	if listen == nil {
		listen = func(fn func() error) error { return fn() }
	}
	err = listen(func() (err error) { ln, err = transport.Listen(listenAddr, lcfg); return err })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	accepted := make(chan transport.Conn, 1)
	go func() {
		c, err := ln.Accept(ctx)
		if err != nil {
			t.Error(err)
		}
		accepted <- c
	}()
	addr := ln.Addr().String()
	for _, v := range via {
		addr = v(addr)
	}
	d, err := transport.Dial(ctx, addr, &transport.Config{Credentials: creds("client", from),
		Hello: wire.Hello{Role: from, MemSize: memSize}, PeerName: "server"})
	if err != nil {
		t.Fatal(err)
	}
	l := <-accepted
	if l == nil {
		t.FailNow()
	}
	t.Cleanup(func() { d.Close(); l.Close() })
	return d, l
}

// counterSeq returns the sequence number a counter guest's image holds: hot
// page 0 at dataBase has that of the last iteration.
func counterSeq(img *Image, dataBase uint64) (seq uint64) {
	img.Read(func(mem, _ []byte, _ uint64) { seq = binary.LittleEndian.Uint64(mem[dataBase:]) })
	return seq
}

// TestOutputCommit runs counter under a primary that streams checkpoints to
// an intermediary over mTLS. Every record the client receives must already
// be covered by a checkpoint the intermediary holds: the intermediary's
// image shows the counter at that sequence number or later. The released
// sequence is gap-free, and the intermediary's final image equals the guest
// memory of the last checkpoint.
//
// With --compress (PrimaryConfig.Compression) the same holds, and the page
// batches went compressed: at LevelStore, the zero pages of the counter
// guest's first image (most of its 32 MiB) took no room on the link.
func TestOutputCommit(t *testing.T) {
	kvmtest.Require(t)
	for _, level := range []wanzip.Level{0, wanzip.LevelStore} {
		name := "off"
		if level != 0 {
			name = level.String()
		}
		t.Run("compress="+name, func(t *testing.T) { outputCommit(t, level) })
	}
}

func outputCommit(t *testing.T, level wanzip.Level) {
	const memSize = 32 << 20
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- in.ServePrimary(ic) }()

	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "256", "hot": "16", "cold_every": "2", "iterations": "30000", "spin": "30000", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	dataBase := m.DataRegions()[0] * mmu.RegionSize
	var (
		mu       sync.Mutex
		released []uint64
		bad      int
	)
	p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 10 * time.Millisecond, Compression: level, OnRelease: func(r vmm.Record) {
		// The intermediary's image must already show this iteration:
		// hot page 0 holds the sequence number of the last iteration.
		seq := counterSeq(in.Image(), dataBase)
		mu.Lock()
		if seq < r.Value {
			bad++
		}
		released = append(released, r.Value)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	runProtected(t, m, p)
	mu.Lock()
	defer mu.Unlock()
	if bad != 0 {
		t.Errorf("%d records released before the intermediary held their checkpoint", bad)
	}
	if len(released) != 30000 {
		t.Fatalf("%d records released, want 30000 (acked epoch %d of %d sent)", len(released), p.Acked(), p.Epochs())
	}
	for i, v := range released {
		if v != uint64(i+1) {
			t.Fatalf("released record %d = %d, want %d", i, v, i+1)
		}
	}
	// The run spans several checkpoints (about 140 epochs of 10 ms on an
	// idle host; under the race detector on a loaded one it has been seen
	// to fit in two), so output was released epoch by epoch.
	if p.Epochs() < 2 {
		t.Errorf("only %d checkpoints", p.Epochs())
	}
	// The guest stopped after the last checkpoint was taken: the image
	// must equal guest memory.
	var same bool
	in.Image().Read(func(img, state []byte, epoch uint64) {
		same = string(img) == string(m.Memory().Backing()) && len(state) > 0 && epoch == p.Epochs()
	})
	if !same {
		t.Errorf("intermediary image at epoch %d differs from the stopped guest's memory", in.Image().Epoch())
	}
	raw, sent := p.zipRaw.Load(), p.zipWire.Load()
	switch {
	case level == 0 && raw != 0:
		t.Errorf("without compression %d page bytes were compressed", raw)
	case level != 0 && (raw < memSize || raw-sent < memSize/2):
		// The full image alone has more than 16 MiB of zero pages.
		t.Errorf("compressed %d page bytes into %d; want at least the full image's %d, and half of that elided", raw, sent, memSize)
	}
	pc.Close()
	if err := <-served; err != nil && !errors.Is(err, context.Canceled) {
		t.Logf("intermediary: %v", err)
	}
}

// TestOutputCommitShortGuest: a guest that exits before the first full image
// is complete still has all its output released, from a full image of the
// stopped machine.
func TestOutputCommitShortGuest(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 8 << 20
	in, pc := servingIntermediary(t, memSize)
	var p *Primary
	var released []uint64
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "8", "hot": "8", "iterations": "3", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	p, err = NewPrimary(m, pc, PrimaryConfig{OnRelease: func(r vmm.Record) { released = append(released, r.Value) }})
	if err != nil {
		t.Fatal(err)
	}
	// The guest runs to its end before the primary starts.
	if _, err := m.Run(context.Background()); err != nil {
		t.Fatal(err)
	}
	p.Halted()
	if err := p.Run(context.Background()); err != nil {
		t.Fatalf("Primary.Run = %v", err)
	}
	if len(released) != 3 || released[2] != 3 || p.Epochs() != 1 {
		t.Errorf("released %v in %d epochs, want [1 2 3] in 1", released, p.Epochs())
	}
	if in.Image().Epoch() != 1 {
		t.Errorf("intermediary at epoch %d, want 1", in.Image().Epoch())
	}
}

// TestProtectWithLargePages protects a guest while large-page management
// runs on it with the refault sampler: once dirty logging is on the
// sampler revokes nothing (checkpoints copy guest memory through the VMM's
// mapping) and nothing is promoted; the run completes and the
// intermediary's image is the stopped guest's memory.
func TestProtectWithLargePages(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 32 << 20
	in, pc := servingIntermediary(t, memSize)
	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "2048", "hot": "64", "cold_every": "1", "iterations": "4000", "spin": "100000", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	lp, err := largepage.Start(m, largepage.Config{Budget: 2, Period: 4 * time.Millisecond, Window: 3 * time.Millisecond, Warmup: 1, Source: largepage.SourceRefault})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // sampling windows before protection starts
	if p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 5 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	runProtected(t, m, p)
	st := lp.Stop()
	if st.Err != "" || st.Unsampled == 0 {
		t.Errorf("large pages under protection: %s (unsampled %d); want windows skipped and no error", st, st.Unsampled)
	}
	var same bool
	in.Image().Read(func(img, _ []byte, epoch uint64) {
		same = string(img) == string(m.Memory().Backing()) && epoch == p.Epochs()
	})
	if !same {
		t.Errorf("intermediary image at epoch %d differs from the stopped guest's memory", in.Image().Epoch())
	}
}

// runProtected runs m under p until the guest exits (a minute at most).
func runProtected(t *testing.T, m *vmm.Machine, p *Primary) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { _, err := m.Run(ctx); p.Halted(); runErr <- err }()
	if err := p.Run(ctx); err != nil {
		t.Fatalf("Primary.Run = %v", err)
	}
	if err := <-runErr; err != nil {
		t.Fatalf("machine Run = %v", err)
	}
}

// servingIntermediary returns an intermediary serving the far end of a
// primary link (mTLS, loopback), and the primary's end.
func servingIntermediary(t testing.TB, memSize uint64) (*Intermediary, MessageConn) {
	t.Helper()
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	go in.ServePrimary(ic)
	return in, pc
}

// beginCounter is a primary's link that records the page count of every
// delta checkpoint it sends.
type beginCounter struct {
	MessageConn
	mu    sync.Mutex
	pages []uint64
}

func (b *beginCounter) WriteMessage(m wire.Message) error {
	if begin, ok := m.(*wire.CheckpointBegin); ok && begin.Flags&wire.FlagFullImage == 0 {
		b.mu.Lock()
		b.pages = append(b.pages, begin.Pages)
		b.mu.Unlock()
	}
	return b.MessageConn.WriteMessage(m)
}

// TestDirtyBudget: with an interval far longer than the run, the dirty
// budget alone ends the epochs, each once the guest has written about the
// budget's worth of pages; output commit still releases every record in
// order. The guest runs until the budget has ended budgetEpochs epochs.
func TestDirtyBudget(t *testing.T) {
	kvmtest.Require(t)
	const (
		memSize = 32 << 20
		budget  = 1 << 20 // 256 pages: the 64 hot ones at once, then cold ones one an iteration
		// budgetEpochs is how many epochs the budget ends before the
		// guest is stopped. How long they take is the host's speed (on a
		// loaded host the guest writes a few dozen pages a second).
		budgetEpochs = 12
	)
	in, ic := servingIntermediary(t, memSize)
	conn := &beginCounter{MessageConn: ic}
	var (
		p       *Primary
		emitted atomic.Uint64
	)
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "4096", "hot": "64", "cold_every": "1", "iterations": "0", "report": "0"},
		OnRecord: func(r vmm.Record) { emitted.Store(r.Value); p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var (
		mu       sync.Mutex
		released uint64
		gaps     int
	)
	p, err = NewPrimary(m, conn, PrimaryConfig{Interval: time.Minute, DirtyBudget: budget, OnRelease: func(r vmm.Record) {
		mu.Lock()
		if r.Value != released+1 {
			gaps++
		}
		released = r.Value
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	// The guest runs until the budget has ended budgetEpochs epochs (or,
	// telling a hang from progress, 3*testutil.Patience passed: the checks
	// below then say what went wrong).
	go func() {
		deadline := time.Now().Add(3 * testutil.Patience)
		for p.BudgetEpochs() < budgetEpochs && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		m.Stop(0)
	}()
	start := time.Now()
	runProtected(t, m, p)
	mu.Lock()
	defer mu.Unlock()
	if gaps != 0 || released != emitted.Load() {
		t.Fatalf("released up to %d with %d gaps, want 1..%d", released, gaps, emitted.Load())
	}
	conn.mu.Lock()
	defer conn.mu.Unlock()
	// The last delta is the stopped guest's; every other one ended on the
	// budget (the minute-long interval never ran out).
	deltas := conn.pages[:len(conn.pages)-1]
	t.Logf("%d delta checkpoints in %v, %d ended by the budget; pages %v", len(deltas), time.Since(start).Round(time.Millisecond), p.BudgetEpochs(), deltas)
	// The last wait the budget ended may be the one whose checkpoint found
	// the guest stopped (the last, which deltas leaves out).
	if len(deltas) < budgetEpochs-1 {
		t.Fatalf("%d delta checkpoints with a %d KiB budget, want at least %d", len(deltas), budget>>10, budgetEpochs-1)
	}
	// The wait before the stopped guest's checkpoint may have ended on the
	// budget too.
	if got := p.BudgetEpochs(); got != uint64(len(deltas)) && got != uint64(len(deltas)+1) {
		t.Errorf("BudgetEpochs = %d, want %d or %d (every delta but the stopped guest's, or all)", got, len(deltas), len(deltas)+1)
	}
	// An epoch the budget ended holds at least the budget. By how much it
	// overshoots is what the guest writes between two polls of the budget
	// (a millisecond apart; tens of pages on an idle host, far more when
	// the host is loaded or under the race detector, where a checkpoint
	// streams for longer than the guest takes to write all its pages): a
	// figure of the host's speed, not a behaviour. The first delta also
	// holds what the guest wrote while the full image was sent.
	sorted := slices.Sorted(slices.Values(deltas[1:]))
	if med := sorted[len(sorted)/2]; med < budget/mmu.PageSize {
		t.Errorf("median delta checkpoint of %d pages, want at least the budget's %d", med, budget/mmu.PageSize)
	}
	if in.Image().Epoch() != p.Epochs() {
		t.Errorf("intermediary at epoch %d, primary sent %d", in.Image().Epoch(), p.Epochs())
	}
}

// TestDirtyBudgetConfig: a budget smaller than a page is refused.
func TestDirtyBudgetConfig(t *testing.T) {
	kvmtest.Require(t)
	m, err := vmm.New(vmm.Config{MemSize: 8 << 20, Payload: &vmm.PayloadConfig{Name: "hello"}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := NewPrimary(m, nil, PrimaryConfig{DirtyBudget: 100}); err == nil || !strings.Contains(err.Error(), "less than one page") {
		t.Errorf("NewPrimary(DirtyBudget: 100) = %v, want an error saying it is less than one page", err)
	}
}

// failingAcks is a backup's side of a link whose acknowledgements fail, as
// when the primary dies while the backup writes one.
type failingAcks struct{ MessageConn }

func (f failingAcks) WriteMessage(m wire.Message) error {
	if _, ok := m.(*wire.Ack); ok {
		return errors.New("write: connection reset by peer")
	}
	return f.MessageConn.WriteMessage(m)
}

// TestDirectAckFails: a primary's direct link that fails under the backup's
// acknowledgement is a lost primary, as one that fails under a read: no
// error (the caller activates the committed epoch, which holds the
// checkpoint just committed), not an intermediary's loss to wait out.
func TestDirectAckFails(t *testing.T) {
	const memSize = 4 << 20
	pc, bc := roleLink(t, memSize, wire.RolePrimary, wire.RoleBackup)
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	served := make(chan error, 1)
	go func() {
		m, err := bk.ServeDirect(failingAcks{bc})
		if m != nil {
			m.Close()
			err = errors.New("a machine from a failed link")
		}
		served <- err
	}()
	if err := SendCheckpoint(pc, testCheckpoint(1, true, 0, 1, 2, 3), 0); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-served:
		if err != nil {
			t.Errorf("ServeDirect after the acknowledgement failed = %v, want nil (the primary is lost)", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("ServeDirect did not return")
	}
	if bk.Committed() != 1 {
		t.Errorf("committed epoch %d, want 1", bk.Committed())
	}
}

// TestDirectToBackup: a primary replicating straight to the backup (its
// policy for a lost intermediary) has its output released on the backup's
// acknowledgements; its guest's exit ends protection there
// (ErrProtectionEnded), with the committed image equal to the stopped
// guest's memory. The backup refuses anything an intermediary would send.
func TestDirectToBackup(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 32 << 20
	pc, bc := roleLink(t, memSize, wire.RolePrimary, wire.RoleBackup)
	bk, err := NewBackup(memSize, BackupConfig{Policy: "pull-every=1s"}) // not sent to a primary
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	served := make(chan error, 1)
	go func() {
		m, err := bk.ServeDirect(bc)
		if m != nil {
			m.Close()
		}
		served <- err
	}()
	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "256", "hot": "16", "cold_every": "2", "iterations": "5000", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	dataBase := m.DataRegions()[0] * mmu.RegionSize
	var (
		released []uint64
		early    int
	)
	p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 10 * time.Millisecond, OnRelease: func(r vmm.Record) {
		// The backup's committed image must show this iteration already.
		if counterSeq(bk.Image(), dataBase) < r.Value {
			early++
		}
		released = append(released, r.Value)
	}})
	if err != nil {
		t.Fatal(err)
	}
	runProtected(t, m, p)
	if err := <-served; !errors.Is(err, ErrProtectionEnded) {
		t.Errorf("ServeDirect = %v, want ErrProtectionEnded", err)
	}
	if early != 0 {
		t.Errorf("%d records released before the backup committed their checkpoint", early)
	}
	if len(released) != 5000 || released[0] != 1 || released[4999] != 5000 {
		t.Fatalf("released %d records, want 1..5000", len(released))
	}
	if bk.Committed() != p.Epochs() {
		t.Errorf("backup committed epoch %d, primary sent %d", bk.Committed(), p.Epochs())
	}
	bk.Image().Read(func(img, _ []byte, _ uint64) {
		if string(img) != string(m.Memory().Backing()) {
			t.Errorf("the backup's image differs from the stopped guest's memory")
		}
	})

	// An intermediary's message on a direct link is refused.
	pc2, bc2 := roleLink(t, memSize, wire.RolePrimary, wire.RoleBackup)
	bk2, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer bk2.Close()
	go func() { _, err := bk2.ServeDirect(bc2); served <- err }()
	if err := pc2.WriteMessage(&wire.Activate{Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if err := <-served; err == nil || !strings.Contains(err.Error(), "unexpected") {
		t.Errorf("ServeDirect after an Activate from the primary = %v, want a refusal", err)
	}
}
