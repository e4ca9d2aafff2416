package ft

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Protected Linux machines: the stand-in kernel of internal/linuxtest
// (a real Linux guest does not boot on this host's KVM), its NIC driven
// from the host side, real taps, real roles over loopback mTLS.

const (
	lxMem      = 64 << 20
	lxNetRings = 0x2100000
	lxHdr      = 0x2200000
	lxTxBufs   = 0x2300000
	lxEthType  = 0x88b5 // IEEE 802 local experimental
	ethRARP    = 0x8035
)

// codePrintSpin writes 'X' to COM1 and spins.
var codePrintSpin = []byte{
	0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
	0xb0, 'X', // mov al, 'X'
	0xee,       // out dx, al
	0xeb, 0xfe, // jmp $
}

// makeLxTap creates a tap device that is up, and deletes it at the end.
func makeLxTap(t testing.TB) string { return linuxtest.MakeTap(t, "uft") }

// lxTap reads the frames written to a tap.
type lxTap struct{ *linuxtest.TapReader }

func newLxTap(t testing.TB, tap string) *lxTap { return &lxTap{linuxtest.NewTapReader(t, tap)} }

func (r *lxTap) next(typ uint16, wait time.Duration) []byte { return r.Next(typ, wait) }

// expect receives the next test frames and checks they are want, in order.
func (r *lxTap) expect(want ...[]byte) { r.Expect(lxEthType, 10*time.Second, want...) }

func lxFrame(mac net.HardwareAddr, payload string) []byte {
	f := append(bytes.Repeat([]byte{0xff}, 6), mac...)
	f = append(f, lxEthType>>8, lxEthType&0xff)
	return append(f, payload...)
}

func lxKernel(t testing.TB, code []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "bzImage")
	if err := os.WriteFile(p, linuxtest.Kernel(code, 0x100000), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func lxDriver(t testing.TB, m *vmm.Machine) *linuxtest.Driver {
	return &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: lxNetRings, Hdr: lxHdr, TxBufs: lxTxBufs}
}

// syncBuffer is a console for tests.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// waitUntil polls cond until it holds (20 s at most).
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// freeAddr returns a loopback TCP address nobody listens at now.
func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "tcp://" + l.Addr().String()
}

// TestRunPrimaryLinuxHoldsOutput runs a Linux machine under RunPrimary,
// protected through a real intermediary that acknowledges nothing until its
// backup is attached (OnBackupLoss stall). The frame the guest transmits
// and the byte it prints are held (sealed into a checkpoint, not on the tap,
// not on the console) for as long as no checkpoint is acknowledged; once a
// real backup comes up and the intermediary acknowledges, both come out,
// and the status line and metrics account for them.
func TestRunPrimaryLinuxHoldsOutput(t *testing.T) {
	kvmtest.Require(t)
	tap := makeLxTap(t)
	rd := newLxTap(t, tap)
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	backupAddr := freeAddr(t)
	ilog, itl := newTestLog()
	idone := make(chan error, 1)
	go func() {
		idone <- RunIntermediary(ctx, IntermediaryRunConfig{Listen: "tcp://127.0.0.1:0", Backup: backupAddr,
			Links: c.links("intermediary", RoleIntermediary, ilog), Log: ilog, OnBackupLoss: StallWithoutBackup,
			BackupRetry: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second})
	}()
	interAddr := itl.waitFor(t, `listening on (tcp://\S+)`)[1]

	mac := net.HardwareAddr{0x02, 0, 0, 0x13, 0x13, 0x01}
	frame := lxFrame(mac, "sent in epoch 1")
	console := &syncBuffer{}
	started := make(chan *vmm.Machine, 1)
	plog, _ := newTestLog()
	pdone := make(chan error, 1)
	go func() {
		_, err := RunPrimary(ctx, PrimaryRunConfig{
			Machine: vmm.Config{MemSize: lxMem, Console: console, Linux: &vmm.LinuxConfig{
				Kernel: lxKernel(t, codePrintSpin), Nets: []vmm.NetConfig{{Tap: tap, MAC: mac}}}},
			NetOutput:    virtio.EgressBounds{MaxFrames: 16},
			Epochs:       PrimaryConfig{Interval: 10 * time.Millisecond},
			Intermediary: interAddr, Links: c.links("primary", RolePrimary, plog), Log: plog,
			OnStart: func(m *vmm.Machine) (func(), error) {
				// The guest's driver, before the guest runs: the frame is
				// taken now, in epoch 1.
				nic := lxDriver(t, m)
				nic.Setup(2)
				nic.TxAvail(0, frame)
				nic.Notify(1)
				started <- m
				return nil, nil
			},
		})
		pdone <- err
	}()
	m := <-started
	// Checkpoint 1 (the full image) sealed the frame and the console byte;
	// the loop goes on while the intermediary holds checkpoint 1 unacknowledged.
	waitUntil(t, "checkpoint 2 is sealed", func() bool { return m.NetOutputStats().SealedEpoch >= 2 })
	if s := m.NetOutputStats(); !s.Holding || s.HeldFrames != 1 || s.ReleasedFrames != 0 {
		t.Fatalf("before any acknowledgement: %+v, want the frame held", s)
	}
	if got := rd.next(lxEthType, 200*time.Millisecond); got != nil {
		t.Fatalf("a frame on the tap before its checkpoint was acknowledged: %q", got)
	}
	if got := console.String(); got != "" {
		t.Fatalf("console %q before its checkpoint was acknowledged, want nothing", got)
	}
	// The backup comes up: the intermediary seeds it, then acknowledges.
	blog, _ := newTestLog()
	bdone := make(chan error, 1)
	go func() {
		_, err := RunBackup(ctx, BackupRunConfig{Listen: backupAddr, Links: c.links("backup", RoleBackup, blog), Log: blog})
		bdone <- err
	}()
	rd.expect(frame)
	waitUntil(t, "the console byte is released", func() bool { return console.String() == "X" })
	if s := m.NetOutputStats(); s.HeldFrames != 0 || s.ReleasedFrames != 1 || s.Latency.Count != 1 {
		t.Errorf("after the acknowledgement: %+v, want the frame released", s)
	}
	// The primary and the backup stop with ctx. (The intermediary is not
	// waited for: under the stall policy, a checkpoint it received after
	// its backup left waits in Intermediary.waitForBackup, which no
	// context ends.)
	cancel()
	for i, ch := range []chan error{pdone, bdone} {
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			buf := make([]byte, 1<<20)
			t.Fatalf("role %d (primary, backup) did not stop\n%s", i, buf[:runtime.Stack(buf, true)])
		}
	}
}

// ackDropper is a primary's link to its intermediary that, once drop is
// set, loses the intermediary's acknowledgements on the way (recording the
// last one lost): the intermediary holds those epochs, the primary never
// learns of them and keeps their output held.
type ackDropper struct {
	transport.Conn
	drop    *atomic.Bool
	dropped *atomic.Uint64
}

func (a *ackDropper) ReadMessage() (wire.Message, error) {
	for {
		m, err := a.Conn.ReadMessage()
		if ack, ok := m.(*wire.Ack); ok && err == nil && a.drop.Load() {
			if ack.Epoch > a.dropped.Load() {
				a.dropped.Store(ack.Epoch)
			}
			continue
		}
		return m, err
	}
}

// TestLinuxFailoverCarriesHeldFrames protects a Linux machine through a
// real intermediary and backup. A frame released normally reaches the
// primary's tap. Then the intermediary's acknowledgements stop reaching
// the primary: the next frame's checkpoint is acknowledged and committed,
// but the frame stays held at the primary. The primary dies; the
// intermediary fails over; the backup restores the guest with its NIC on
// the backup's own tap, announces the primary's MAC there, sends the
// carried frame first and then what the resumed guest transmits. The dead
// primary's tap never saw the held frame.
func TestLinuxFailoverCarriesHeldFrames(t *testing.T) {
	kvmtest.Require(t)
	ptap, btap := makeLxTap(t), makeLxTap(t)
	prd, brd := newLxTap(t, ptap), newLxTap(t, btap)
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// The backup, its NIC on its own tap (no MAC: the state's).
	bconsole := &syncBuffer{}
	activated := make(chan *vmm.Machine, 1)
	blog, btl := newTestLog()
	bdone := make(chan error, 1)
	go func() {
		_, err := RunBackup(ctx, BackupRunConfig{Listen: "tcp://127.0.0.1:0", Links: c.links("backup", RoleBackup, blog), Log: blog,
			Restore:    vmm.RestoreConfig{Console: bconsole, Nets: []vmm.NetConfig{{Tap: btap}}},
			OnActivate: func(m *vmm.Machine) (func(), error) { activated <- m; return nil, nil }})
		bdone <- err
	}()
	backupAddr := btl.waitFor(t, `listening on (tcp://\S+)`)[1]
	ilog, itl := newTestLog()
	idone := make(chan error, 1)
	go func() {
		idone <- RunIntermediary(ctx, IntermediaryRunConfig{Listen: "tcp://127.0.0.1:0", Backup: backupAddr,
			Links: c.links("intermediary", RoleIntermediary, ilog), Log: ilog, BackupRetry: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second})
	}()
	interAddr := itl.waitFor(t, `listening on (tcp://\S+)`)[1]

	// The primary, built as RunPrimary builds a Linux one, on a link that
	// can lose acknowledgements.
	mac := net.HardwareAddr{0x02, 0, 0, 0x13, 0x13, 0x02}
	p, err := newPrimary(nil, PrimaryConfig{Interval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	pconsole := &syncBuffer{}
	p.lx = &linuxOutput{console: newConsoleGate(pconsole, &p.open)}
	m, err := vmm.New(vmm.Config{MemSize: lxMem, Console: p.lx.console, Linux: &vmm.LinuxConfig{
		Kernel: lxKernel(t, linuxtest.CodeSpin), Nets: []vmm.NetConfig{{Tap: ptap, MAC: mac}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.HoldNetOutput(virtio.EgressBounds{}); err != nil {
		t.Fatal(err)
	}
	if err := p.attach(m); err != nil {
		t.Fatal(err)
	}
	nic := lxDriver(t, m)
	nic.Setup(2)
	var drop atomic.Bool
	var dropped atomic.Uint64
	links := c.links("primary", RolePrimary, nil)
	dial := func(ctx context.Context) (MessageConn, error) {
		conn, err := transport.Dial(ctx, interAddr, links.transport(wire.RolePrimary, lxMem))
		if err != nil {
			return nil, err
		}
		return &ackDropper{Conn: conn, drop: &drop, dropped: &dropped}, nil
	}
	ran := make(chan error, 1)
	go func() {
		_, err := m.Run(ctx)
		p.Halted()
		ran <- err
	}()
	pctx, kill := context.WithCancel(ctx)
	protected := make(chan error, 1)
	go func() { protected <- p.Protect(pctx, dial, nil) }()

	waitUntil(t, "epoch 2 is acknowledged", func() bool { return p.Acked() >= 2 })
	released := lxFrame(mac, "released normally")
	nic.TxAvail(0, released)
	nic.Notify(1)
	prd.expect(released)

	// From now on the acknowledgements are lost on the way.
	drop.Store(true)
	held := lxFrame(mac, "held at the failover")
	nic.TxAvail(1, held)
	nic.Notify(1)
	waitUntil(t, "the device takes the frame", func() bool { return nic.UsedIdx(1) == 2 })
	// It was taken in the open epoch, after the last one sealed.
	e := m.NetOutputStats().SealedEpoch + 1
	waitUntil(t, fmt.Sprintf("the intermediary acknowledges epoch %d", e), func() bool { return dropped.Load() >= e })
	if s := m.NetOutputStats(); s.HeldFrames == 0 || s.ReleasedFrames != 1 {
		t.Fatalf("at the failover: %+v, want the frame held and only the first released", s)
	}
	if !hasMetric(p.Metrics(), "understudy_primary_held_frames", 1) {
		t.Errorf("metrics %v: want understudy_primary_held_frames 1", p.Metrics())
	}
	if line := p.StatusLine(new(uint64), time.Second); !strings.Contains(line, "held_frames=1") {
		t.Errorf("status line %q: want held_frames=1", line)
	}

	// The primary dies: its link and its machine go, with the frame.
	kill()
	<-protected
	m.Stop(0)
	<-ran
	m.Close()

	var bm *vmm.Machine
	select {
	case bm = <-activated:
	case <-time.After(30 * time.Second):
		t.Fatal("the backup did not activate")
	}
	brd.expect(held) // carried, first
	// The restored NIC announces the primary's MAC on the backup's tap.
	rarp := brd.next(ethRARP, 10*time.Second)
	if rarp == nil || !bytes.Equal(rarp[6:12], mac) {
		t.Errorf("announcement on the backup's tap: %x, want a RARP frame from %s", rarp, mac)
	}
	bnic := lxDriver(t, bm)
	after := lxFrame(mac, "sent by the resumed guest")
	bnic.TxAvail(2, after)
	bnic.Notify(1)
	brd.expect(after)
	if got := prd.next(lxEthType, 100*time.Millisecond); got != nil {
		t.Errorf("the primary's tap saw %q after the first frame, want nothing", got)
	}
	cancel()
	for _, ch := range []chan error{idone, bdone} {
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			t.Fatal("a role did not stop")
		}
	}
}

func hasMetric(ms []Metric, name string, v float64) bool {
	for _, m := range ms {
		if m.Name == name && m.Value == v {
			return true
		}
	}
	return false
}

// corruptCarried returns a full image of epoch 1 whose state envelope's
// carried frames are corrupt (the held-frames encoding's version), and the
// good one.
func corruptCarried(t *testing.T) (bad, good *Checkpoint) {
	frames, err := virtio.AppendHeldFrames(nil, []virtio.HeldFrame{{Epoch: 1, Data: []byte("a carried frame")}})
	if err != nil {
		t.Fatal(err)
	}
	env := envelope{Machine: []byte("machine"), Frames: frames}
	good = testCheckpoint(1, true, 0, 1, 2, 3)
	good.State = env.seal()
	bad = testCheckpoint(1, true, 0, 1, 2, 3)
	bad.State = bytes.Clone(good.State)
	bad.State[len(envelopeMagic)+8+len("machine")+4+8+8] ^= 0x7 // the frames' version
	if err := checkEnvelope(bad.State); err == nil {
		t.Fatal("the corrupted envelope opens")
	}
	return bad, good
}

// TestCorruptCarriedFramesRefused: a checkpoint whose carried frames are
// corrupt is refused by the intermediary (CodeIncomplete, nothing
// acknowledged, no failover: the primary reconnects and is served) and by
// the backup (nothing committed).
func TestCorruptCarriedFramesRefused(t *testing.T) {
	bad, good := corruptCarried(t)
	r := startIntermediary(t)
	p := r.primary(t, "primary")
	if err := SendCheckpoint(p, bad, 0); err != nil {
		t.Fatal(err)
	}
	if e := readError(t, p); e.Code != wire.CodeIncomplete || !strings.Contains(e.Reason, "carried frames") {
		t.Errorf("refusal = %v, want CodeIncomplete naming the carried frames", e)
	}
	r.log.waitFor(t, `refused a checkpoint`)
	// Not a lost primary: it reconnects and is served.
	p2 := r.primary(t, "primary")
	sendAcked(t, p2, good, 0)
	sendEpoch(t, p2, 2)
	if r.log.has("failing over") {
		t.Errorf("the intermediary failed over after a refused checkpoint")
	}
	select {
	case e := <-r.b.activated:
		t.Errorf("the backup was activated at epoch %d", e)
	default:
	}

	b := startBackup(t, BackupRunConfig{})
	in := b.intermediary("intermediary", runMem)
	if err := SendCheckpoint(in, bad, 0); err != nil {
		t.Fatal(err)
	}
	if e := readError(t, in); e.Code != wire.CodeIncomplete || !strings.Contains(e.Reason, "carried frames") {
		t.Errorf("backup's refusal = %v, want CodeIncomplete naming the carried frames", e)
	}
	b.log.waitFor(t, `refused a checkpoint`)
	// Nothing was committed: the next intermediary hears epoch 0. Until
	// the backup has ended the refused link's session it turns a new
	// intermediary away (as the role loop retries, so does the test).
	var m wire.Message
	var err error
	testutil.WaitFor(t, "the backup serving a new intermediary", func() bool {
		m, err = b.intermediary("intermediary", runMem).ReadMessage()
		pe, refused := m.(*wire.Error)
		return err != nil || !refused || !strings.Contains(pe.Reason, "already")
	}, func() string { return fmt.Sprint(m, err) })
	if st, ok := m.(*wire.Status); err != nil || !ok || st.Committed != 0 {
		t.Errorf("the backup's status after the refusal = %v, %v; want committed epoch 0", m, err)
	}
}

// envEpoch is holdBackEpoch(e) with a Linux guest's envelope as its state:
// a frame and console bytes of its own epoch.
func envEpoch(t *testing.T, e uint64) *Checkpoint {
	cp := holdBackEpoch(e)
	frames, err := virtio.AppendHeldFrames(nil, []virtio.HeldFrame{{Epoch: e, Data: fmt.Appendf(nil, "frame of epoch %d", e)}})
	if err != nil {
		t.Fatal(err)
	}
	env := envelope{Machine: cp.State, Frames: frames, Console: fmt.Appendf(nil, "console of epoch %d", e)}
	cp.State = env.seal()
	return cp
}

// committedState returns the backup's committed epoch and state.
func committedState(bk *Backup) (uint64, []byte) {
	var (
		e uint64
		s []byte
	)
	bk.Image().Read(func(_, state []byte, committed uint64) { e, s = committed, bytes.Clone(state) })
	return e, s
}

// TestEnvelopeForwardedUnchanged: the intermediary forwards the primary's
// envelope (carried frames and console bytes) byte for byte in every kind
// of checkpoint it builds for the backup: the seed (a full image from its
// image), each delta forwarded whole, and a hold-back sync.
func TestEnvelopeForwardedUnchanged(t *testing.T) {
	const memSize = 4 << 20
	for _, tc := range []struct {
		name   string
		policy ForwardPolicy
	}{{"delta", nil}, {"sync", holdAll{}}} {
		t.Run(tc.name, func(t *testing.T) {
			in, bk, pc := forwardRig(t, memSize, tc.policy, BackupConfig{})
			sent := map[uint64][]byte{}
			cp := envEpoch(t, 1)
			sent[1] = cp.State
			sendAcked(t, pc, cp, 0)
			waitFor(t, "the seed", func() bool { return bk.Committed() == 1 })
			if _, s := committedState(bk); !bytes.Equal(s, sent[1]) {
				t.Fatalf("seed's state differs from the primary's envelope")
			}
			for e := uint64(2); e <= 4; e++ {
				cp := envEpoch(t, e)
				sent[e] = cp.State
				sendAcked(t, pc, cp, e-1)
			}
			if tc.policy != nil {
				if err := attachedBackup(in).sync(t.Context(), in, 4); err != nil {
					t.Fatal(err)
				}
			}
			waitFor(t, "epoch 4", func() bool { return bk.Committed() == 4 })
			e, s := committedState(bk)
			if !bytes.Equal(s, sent[e]) {
				t.Errorf("epoch %d's state at the backup differs from the primary's envelope", e)
			}
			env, err := openEnvelope(s)
			if err != nil || !bytes.Contains(env.Frames, []byte("frame of epoch 4")) || string(env.Console) != "console of epoch 4" {
				t.Errorf("the backup's envelope = %+v, %v; want epoch 4's frame and console", env, err)
			}
		})
	}
}

// TestRunPrimaryLinuxIntermediaryLost: while its intermediary is lost, a
// protected Linux guest keeps running (policy hold) and the frame it
// transmits stays held; once an intermediary is back and has acknowledged
// the full image the primary sends it, the frame goes out.
func TestRunPrimaryLinuxIntermediaryLost(t *testing.T) {
	kvmtest.Require(t)
	tap := makeLxTap(t)
	rd := newLxTap(t, tap)
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	blog, btl := newTestLog()
	bdone := make(chan error, 1)
	go func() {
		_, err := RunBackup(ctx, BackupRunConfig{Listen: "tcp://127.0.0.1:0", Links: c.links("backup", RoleBackup, blog), Log: blog})
		bdone <- err
	}()
	backupAddr := btl.waitFor(t, `listening on (tcp://\S+)`)[1]
	interAddr := freeAddr(t)
	startInter := func() (context.CancelFunc, chan error) {
		ictx, icancel := context.WithCancel(ctx)
		ilog, itl := newTestLog()
		done := make(chan error, 1)
		go func() {
			done <- RunIntermediary(ictx, IntermediaryRunConfig{Listen: interAddr, Backup: backupAddr,
				Links: c.links("intermediary", RoleIntermediary, ilog), Log: ilog, BackupRetry: 20 * time.Millisecond, FailoverTimeout: 10 * time.Second})
		}()
		itl.waitFor(t, `listening on`)
		return icancel, done
	}
	stopInter, interDone := startInter()

	mac := net.HardwareAddr{0x02, 0, 0, 0x13, 0x13, 0x03}
	started := make(chan *linuxtest.Driver, 1)
	var machine atomic.Pointer[vmm.Machine]
	plog, ptl := newTestLog()
	pdone := make(chan error, 1)
	go func() {
		_, err := RunPrimary(ctx, PrimaryRunConfig{
			Machine: vmm.Config{MemSize: lxMem, Linux: &vmm.LinuxConfig{
				Kernel: lxKernel(t, linuxtest.CodeSpin), Nets: []vmm.NetConfig{{Tap: tap, MAC: mac}}}},
			Epochs:       PrimaryConfig{Interval: 10 * time.Millisecond, Redial: 20 * time.Millisecond},
			Intermediary: interAddr, Links: c.links("primary", RolePrimary, plog), Log: plog,
			OnStart: func(m *vmm.Machine) (func(), error) {
				nic := lxDriver(t, m)
				nic.Setup(2)
				machine.Store(m)
				started <- nic
				return nil, nil
			},
		})
		pdone <- err
	}()
	nic := <-started
	m := machine.Load()
	waitUntil(t, "a checkpoint is acknowledged", func() bool { return m.NetOutputStats().SealedEpoch >= 2 })

	stopInter()
	<-interDone
	ptl.waitFor(t, `intermediary lost .* output stays held \(0 frames`)
	frame := lxFrame(mac, "sent with no intermediary")
	nic.TxAvail(0, frame)
	nic.Notify(1)
	waitUntil(t, "the device takes the frame", func() bool { return nic.UsedIdx(1) == 1 })
	// The guest runs on (policy hold); no checkpoint is taken without a
	// link, so the frame waits in the open epoch, which the full image
	// to the next intermediary seals.
	if got := rd.next(lxEthType, 200*time.Millisecond); got != nil {
		t.Fatalf("a frame on the tap with no intermediary: %q", got)
	}
	if s := m.NetOutputStats(); s.HeldFrames != 1 || s.ReleasedFrames != 0 {
		t.Fatalf("with no intermediary: %+v, want the frame held", s)
	}

	_, interDone = startInter()
	ptl.waitFor(t, `intermediary reached again`)
	rd.expect(frame)
	cancel()
	for i, ch := range []chan error{pdone, bdone, interDone} {
		select {
		case <-ch:
		case <-time.After(20 * time.Second):
			t.Fatalf("role %d (primary, backup, intermediary) did not stop", i)
		}
	}
}

// TestConsoleGate: console bytes are held with the epoch they were written
// in, carried whole, and written out in order only up to the released
// epoch.
func TestConsoleGate(t *testing.T) {
	var open atomic.Uint64
	out := &syncBuffer{}
	g := newConsoleGate(out, &open)
	open.Store(1)
	g.Write([]byte("one "))
	g.Write([]byte("uno "))
	open.Store(2)
	g.Write([]byte("two "))
	open.Store(3)
	g.Write([]byte("three"))
	if got := string(g.held()); got != "one uno two three" {
		t.Errorf("held() = %q, want every byte", got)
	}
	g.release(0)
	if out.String() != "" {
		t.Errorf("release(0) wrote %q", out.String())
	}
	g.release(1)
	if got := out.String(); got != "one uno " {
		t.Errorf("after release(1): %q, want epoch 1's bytes", got)
	}
	if got := string(g.held()); got != "two three" || g.heldBytes() != len("two three") {
		t.Errorf("held() after release(1) = %q (%d bytes)", got, g.heldBytes())
	}
	g.release(1) // again: nothing more
	g.release(3)
	if got := out.String(); got != "one uno two three" || g.heldBytes() != 0 || g.held() != nil {
		t.Errorf("after release(3): %q, %d held", got, g.heldBytes())
	}
}
