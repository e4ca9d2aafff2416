package ft

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// sendEpoch sends checkpoint e (a full image for e == 1, else a delta on
// e-1) as a primary would and waits for its acknowledgement.
func sendEpoch(t *testing.T, c MessageConn, e uint64) {
	t.Helper()
	cp := testCheckpoint(e, e == 1, 0, e, e+16)
	if e == 1 {
		cp = testCheckpoint(1, true, 0, 1, 2, 3)
	}
	if err := SendCheckpoint(c, cp, e-1); err != nil {
		t.Fatalf("SendCheckpoint(%d) = %v", e, err)
	}
	m, err := c.ReadMessage()
	for err == nil {
		if _, ok := m.(*wire.Status); !ok {
			break
		}
		m, err = c.ReadMessage() // the backup's epoch, for the primary's status
	}
	if err != nil {
		t.Fatalf("reading the ack of %d: %v", e, err)
	}
	if a, ok := m.(*wire.Ack); !ok || a.Epoch != e {
		t.Fatalf("reply to checkpoint %d = %v, want Ack{%d}", e, m, e)
	}
}

// waitFor is testutil.WaitFor, under the name the package's tests (and
// those written in parallel with them) call it by.
var waitFor = testutil.WaitFor

// sameImage reports whether two images hold the same epoch, memory and state.
func sameImage(a, b *Image) bool {
	var am, as []byte
	var ae uint64
	a.Read(func(mem, state []byte, epoch uint64) { am, as, ae = bytes.Clone(mem), bytes.Clone(state), epoch })
	same := false
	b.Read(func(mem, state []byte, epoch uint64) {
		same = epoch == ae && bytes.Equal(mem, am) && bytes.Equal(state, as)
	})
	return same
}

// TestForwardReseedsNewBackup attaches a backup after several epochs: it is
// re-seeded with a full image of the intermediary's image, then follows the
// forwarded deltas. A backup that leaves and returns later is re-seeded again.
func TestForwardReseedsNewBackup(t *testing.T) {
	const memSize = 4 << 20
	in, pc := servingIntermediary(t, memSize)
	for e := uint64(1); e <= 5; e++ {
		sendEpoch(t, pc, e)
	}
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	attach := func() (context.CancelFunc, chan error) {
		ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { _, err := bk.Serve(bi); done <- err }()
		go in.ServeBackup(ctx, ib)
		return cancel, done
	}
	cancel, done := attach()
	// A delta cannot apply to an empty image: reaching epoch 5 takes the
	// full image.
	waitFor(t, "the backup to reach epoch 5", func() bool { return bk.Committed() == 5 })
	for e := uint64(6); e <= 8; e++ {
		sendEpoch(t, pc, e)
	}
	waitFor(t, "the backup to reach epoch 8", func() bool { return bk.Committed() == 8 })
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("backup image at epoch %d differs from the intermediary's", bk.Committed())
	}

	// The backup leaves; the primary goes on; the backup returns.
	cancel()
	if err := <-done; err != nil {
		t.Logf("backup link ended: %v", err)
	}
	for e := uint64(9); e <= 12; e++ {
		sendEpoch(t, pc, e)
	}
	if got := bk.Committed(); got != 8 {
		t.Fatalf("detached backup Committed() = %d, want 8", got)
	}
	waitFor(t, "the intermediary to detach the backup", func() bool {
		in.bmu.Lock()
		defer in.bmu.Unlock()
		return in.backup == nil
	})
	cancel, _ = attach()
	defer cancel()
	waitFor(t, "the returning backup to reach epoch 12", func() bool { return bk.Committed() == 12 })
	sendEpoch(t, pc, 13)
	waitFor(t, "the returning backup to reach epoch 13", func() bool { return bk.Committed() == 13 })
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("returning backup image at epoch %d differs from the intermediary's", bk.Committed())
	}
}

// holdAll is a forwarding policy that forwards nothing until a sync.
type holdAll struct{}

func (holdAll) Decide(*Checkpoint, func(int) float64) Decision { return Decision{} }
func (holdAll) SyncNow(BackupView) bool                        { return false }

// TestFailoverSyncsHeldBack: whatever the policy held back, Failover fences
// the primary (no acknowledgement after it), brings the backup to the
// acknowledged epoch, waits for its Ack and only then sends Activate.
func TestFailoverSyncsHeldBack(t *testing.T) {
	const memSize = 4 << 20
	pc, ic := link(t, memSize)
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetForwardPolicy(holdAll{})
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- in.ServePrimary(ic) }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go in.ServeBackup(ctx, ib)

	// A stand-in backup that records what it commits and when it is told
	// to activate.
	img := NewImage(memSize)
	type activation struct{ epoch, committed uint64 }
	activated := make(chan activation, 1)
	go func() {
		for {
			m, err := bi.ReadMessage()
			if err != nil {
				return
			}
			switch m := m.(type) {
			case *wire.CheckpointBegin:
				cp, base, err := ReceiveCheckpoint(bi, m, memSize/4096)
				if err == nil {
					err = img.Apply(cp, base, in.PageOffset)
				}
				if err != nil {
					t.Errorf("stand-in backup: %v", err)
					return
				}
				bi.WriteMessage(&wire.Ack{Epoch: cp.Epoch})
			case *wire.Activate:
				activated <- activation{m.Epoch, img.Epoch()}
				bi.WriteMessage(&wire.Ready{})
			}
		}
	}()
	// The backup's seed is epoch 1 (a backup with no epoch is seeded
	// whatever the policy). Sent with the others, the seed could carry any
	// of them, as its writer may take the image after several applied.
	sendEpoch(t, pc, 1)
	waitFor(t, "the backup's seed", func() bool { return img.Epoch() == 1 })
	for e := uint64(2); e <= 5; e++ {
		sendEpoch(t, pc, e)
	}
	time.Sleep(20 * time.Millisecond)
	// Nothing after the seed is forwarded.
	if got := img.Epoch(); got != 1 {
		t.Fatalf("backup epoch with everything held back = %d, want 1 (the seed)", got)
	}
	epoch, err := in.Failover(ctx)
	if err != nil || epoch != 5 {
		t.Fatalf("Failover() = %d, %v, want 5, nil", epoch, err)
	}
	if a := <-activated; a != (activation{5, 5}) {
		t.Errorf("Activate{%d} with the backup at %d, want Activate{5} at 5", a.epoch, a.committed)
	}
	if !sameImage(in.Image(), img) {
		t.Errorf("backup image differs from the intermediary's at epoch 5")
	}
	// The primary is fenced: its link is closed, and nothing it sends is
	// applied or acknowledged.
	if err := <-primaryDone; !errors.Is(err, ErrFenced) {
		t.Errorf("ServePrimary = %v, want ErrFenced", err)
	}
	if err := SendCheckpoint(pc, testCheckpoint(6, false, 6), 5); err == nil {
		if m, err := pc.ReadMessage(); err == nil {
			if _, ok := m.(*wire.Ack); ok {
				t.Errorf("fenced primary got %v", m)
			}
		}
	}
	if got := in.Image().Epoch(); got != 5 {
		t.Errorf("intermediary epoch after fencing = %d, want 5", got)
	}
	if err := in.ServePrimary(ic); !errors.Is(err, ErrFenced) {
		t.Errorf("ServePrimary after Failover = %v, want ErrFenced", err)
	}
}

// TestBackupRefusesActivate: Activate for an epoch the backup has not
// committed is refused with an Error and changes nothing; the link goes on
// and later checkpoints still commit.
func TestBackupRefusesActivate(t *testing.T) {
	const memSize = 4 << 20
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		m   *vmm.Machine
		err error
	}
	served := make(chan result, 1)
	go func() { m, err := bk.Serve(bi); served <- result{m, err} }()
	read := func() wire.Message {
		t.Helper()
		m, err := ib.ReadMessage()
		if err != nil {
			t.Fatalf("ReadMessage() = %v", err)
		}
		return m
	}
	if m, ok := read().(*wire.Status); !ok || m.Role != wire.RoleBackup || m.Committed != 0 {
		t.Fatalf("first message = %v, want Status{backup, 0}", m)
	}
	refused := func(e uint64) {
		t.Helper()
		if err := ib.WriteMessage(&wire.Activate{Epoch: e}); err != nil {
			t.Fatal(err)
		}
		if m, ok := read().(*wire.Error); !ok || m.Code != wire.CodeRefused {
			t.Fatalf("reply to Activate{%d} = %v, want an Error (refused)", e, m)
		}
	}
	refused(1) // nothing committed yet
	for e := uint64(1); e <= 2; e++ {
		sendEpoch(t, ib, e)
	}
	before := NewImage(memSize)
	if err := before.Apply(mustSnapshot(t, bk.Image(), mmu.Layout(memSize)), 0, bk.pageOffset); err != nil {
		t.Fatal(err)
	}
	refused(1) // an earlier epoch
	refused(3) // a later one
	if !sameImage(before, bk.Image()) {
		t.Errorf("refused Activate changed the backup's image (epoch %d)", bk.Committed())
	}
	sendEpoch(t, ib, 3)
	if got := bk.Committed(); got != 3 {
		t.Errorf("Committed() after epoch 3 = %d, want 3", got)
	}
	ib.Close()
	if r := <-served; r.m != nil {
		t.Errorf("Serve() = %v, %v, want no machine", r.m, r.err)
	}
}

func mustSnapshot(t *testing.T, im *Image, layout []mmu.Region) *Checkpoint {
	t.Helper()
	cp, err := im.Snapshot(layout)
	if err != nil || cp == nil {
		t.Fatalf("Snapshot() = %v, %v", cp, err)
	}
	return cp
}

// TestMsgBytes: the sizes forward counts are the encoded sizes.
func TestMsgBytes(t *testing.T) {
	for _, m := range []wire.Message{
		&wire.Manifest{Epoch: 3, Pages: []wire.ManifestPage{{PFN: 1}, {PFN: 9, Freq: 7}}},
		&wire.Served{ID: 1, Epoch: 2, Pages: 3},
	} {
		b, err := m.MarshalBinary()
		if err != nil || msgBytes(m) != len(b) {
			t.Errorf("msgBytes(%T) = %d, encoded %d bytes (%v)", m, msgBytes(m), len(b), err)
		}
	}
}
