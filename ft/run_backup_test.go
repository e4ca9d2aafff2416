package ft

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// The backup's runner over real loopback mTLS links; the intermediaries
// are the test, speaking the protocol as an intermediary does.

// backupRig runs RunBackup.
type backupRig struct {
	c      *cluster
	log    *testLog
	addr   string
	done   chan error
	cancel context.CancelFunc
}

func startBackup(t *testing.T, cfg BackupRunConfig) *backupRig {
	c := newCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	log, tl := newTestLog()
	r := &backupRig{c: c, log: tl, done: make(chan error, 1), cancel: cancel}
	cfg.Listen, cfg.Links, cfg.Log = "tcp://127.0.0.1:0", c.links("backup", RoleBackup, log), log
	go func() {
		_, err := RunBackup(ctx, cfg)
		r.done <- err
	}()
	r.addr = tl.waitFor(t, `listening on (tcp://\S+)`)[1]
	return r
}

// intermediary connects as intermediary name protecting a guest of memSize
// bytes.
func (r *backupRig) intermediary(name string, memSize uint64) MessageConn {
	return r.c.dial(name, RoleIntermediary, memSize, r.addr)
}

// stop cancels the backup and waits for RunBackup.
func (r *backupRig) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("RunBackup did not return")
		return nil
	}
}

// readStatus waits for the backup's Status, which starts every link it
// serves.
func readStatus(t *testing.T, c MessageConn) *wire.Status {
	t.Helper()
	m, err := c.ReadMessage()
	if err != nil {
		t.Fatalf("reading the backup's Status: %v", err)
	}
	st, ok := m.(*wire.Status)
	if !ok {
		t.Fatalf("the backup said %v first, want its Status", m)
	}
	return st
}

// TestRunBackupRefusesWrongMemorySize: once the backup holds a guest, an
// intermediary that protects a guest of another memory size is refused
// with a reason and logged; one of the right size is served.
func TestRunBackupRefusesWrongMemorySize(t *testing.T) {
	r := startBackup(t, BackupRunConfig{})
	first := r.intermediary("intermediary", runMem)
	readStatus(t, first)
	sendEpoch(t, first, 1)
	first.(interface{ Close() error }).Close()
	r.log.waitFor(t, `intermediary lost .* at committed epoch 1; waiting for an intermediary`)

	wrong := r.intermediary("intermediary", 2*runMem)
	if e := readError(t, wrong); e.Code != wire.CodeRefused || !strings.Contains(e.Reason, "memory size") {
		t.Errorf("an intermediary of another guest size got %v, want CodeRefused about the memory size", e)
	}
	r.log.waitFor(t, `refused intermediary "intermediary": it protects a guest of 8 MiB, this backup holds one of 4 MiB`)

	right := r.intermediary("intermediary", runMem)
	if st := readStatus(t, right); st.Committed != 1 {
		t.Errorf("the backup's Status = %+v, want committed epoch 1", st)
	}
	sendEpoch(t, right, 2)
	if err := r.stop(t); !errors.Is(err, context.Canceled) {
		t.Errorf("RunBackup after cancel = %v, want context.Canceled", err)
	}
}

// TestRunBackupRefusesSecondIntermediary: while an intermediary is served,
// a second one is refused with a reason and logged, instead of being kept;
// the first goes on undisturbed.
func TestRunBackupRefusesSecondIntermediary(t *testing.T) {
	r := startBackup(t, BackupRunConfig{})
	first := r.intermediary("inter1", runMem)
	readStatus(t, first)
	sendEpoch(t, first, 1)

	second := r.intermediary("inter2", runMem)
	if e := readError(t, second); e.Code != wire.CodeRefused || !strings.Contains(e.Reason, `served by intermediary "inter1" already`) {
		t.Errorf("a second intermediary got %v, want CodeRefused naming the one served", e)
	}
	r.log.waitFor(t, `refused intermediary "inter2": this backup is served by intermediary "inter1" already`)
	sendEpoch(t, first, 2)
	if err := r.stop(t); !errors.Is(err, context.Canceled) {
		t.Errorf("RunBackup after cancel = %v, want context.Canceled", err)
	}
}

// TestRunBackupActivatesAlone: with ActivateAfter, a backup whose
// intermediary (and primary) are lost activates its committed epoch by
// itself after that long, reports the data-loss window, and resumes the
// guest; a peer that reaches it afterwards is refused as fenced.
func TestRunBackupActivatesAlone(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 8 << 20
	var (
		mu      sync.Mutex
		resumed []uint64
	)
	activated := make(chan struct{})
	r := startBackup(t, BackupRunConfig{ActivateAfter: 300 * time.Millisecond,
		Restore: vmm.RestoreConfig{OnRecord: func(rec vmm.Record) {
			mu.Lock()
			resumed = append(resumed, rec.Value)
			mu.Unlock()
		}},
		OnActivate: func(*vmm.Machine) (func(), error) { close(activated); return nil, nil }})

	// An intermediary in this process, attached to the backup, and a
	// primary replicating to it.
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	ictx, loseIntermediary := context.WithCancel(context.Background())
	defer loseIntermediary()
	ilinks := r.c.links("intermediary", RoleIntermediary, nil)
	go in.KeepBackup(ictx, dialer(r.addr, ilinks.transport(wire.RoleIntermediary, memSize, wire.RoleBackup)), 50*time.Millisecond)
	pc, ic := link(t, memSize)
	go in.ServePrimary(ic)
	p, err := newPrimary(pc, PrimaryConfig{Interval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options: map[string]string{"pages": "64", "hot": "8", "iterations": "0", "report": "0"}, OnRecord: p.Record}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.attach(m); err != nil {
		t.Fatal(err)
	}
	pctx, killPrimary := context.WithCancel(context.Background())
	machineDone := make(chan struct{})
	go func() { m.Run(pctx); close(machineDone) }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(pctx) }()
	waitFor(t, "the backup to acknowledge 10 epochs", func() bool { return in.backupAcked.Load() >= 10 })

	// Both lost: the primary's host, then the intermediary.
	pc.Close()
	killPrimary()
	<-primaryDone
	<-machineDone
	m.Close()
	loseIntermediary()

	w := r.log.waitFor(t, `no intermediary for 300ms: DATA MAY BE LOST: activated at epoch (\d+);`)
	epoch, _ := strconv.ParseUint(w[1], 10, 64)
	if epoch < 10 {
		t.Errorf("activated alone at epoch %d, want at least the 10 acknowledged", epoch)
	}
	select {
	case <-activated:
	case <-time.After(20 * time.Second):
		t.Fatal("the guest was not resumed after activating alone")
	}
	waitFor(t, "the resumed guest's output", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(resumed) >= 100
	})
	mu.Lock()
	for i := 1; i < len(resumed); i++ {
		if resumed[i] != resumed[i-1]+1 {
			t.Errorf("the resumed guest's output jumps from %d to %d", resumed[i-1], resumed[i])
			break
		}
	}
	mu.Unlock()

	// It runs the guest now: an intermediary that comes back is fenced.
	late := r.intermediary("intermediary", memSize)
	if e := readError(t, late); e.Code != wire.CodeFenced || !strings.Contains(e.Reason, "this backup runs the guest") {
		t.Errorf("an intermediary after the activation got %v, want CodeFenced", e)
	}
	if err := r.stop(t); !errors.Is(err, context.Canceled) {
		t.Errorf("RunBackup after cancel = %v, want context.Canceled", err)
	}
}
