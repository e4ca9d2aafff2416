package ft

import (
	"context"
	"crypto/sha256"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// forwardRig is an intermediary forwarding with policy (nil: its default)
// to a real backup configured by bcfg, fed by the stand-in primary link it
// returns; all over mTLS, all stopped when the test ends. setup, if given,
// configures the intermediary before the backup is attached; the rig
// returns once it is.
func forwardRig(t *testing.T, memSize uint64, policy ForwardPolicy, bcfg BackupConfig, setup ...func(*Intermediary)) (*Intermediary, *Backup, MessageConn) {
	t.Helper()
	pc, ic := link(t, memSize)
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	if policy != nil {
		in.SetForwardPolicy(policy)
	}
	for _, f := range setup {
		f(in)
	}
	go in.ServePrimary(ic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go in.ServeBackup(ctx, ib)
	bk, err := NewBackup(memSize, bcfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bk.Close() })
	go bk.Serve(bi)
	// The rig is ready once the intermediary holds its backup link (tests
	// sync and inspect it; on a loaded host ServeBackup may not have run yet).
	waitFor(t, "the intermediary to attach its backup", func() bool { return attachedBackup(in) != nil })
	return in, bk, pc
}

// attachedBackup returns the intermediary's backup link.
func attachedBackup(in *Intermediary) *backupLink {
	in.bmu.Lock()
	defer in.bmu.Unlock()
	return in.backup
}

// holdBackEpoch is epoch e of a guest with three hot pages (10-12, changed
// every epoch) and one cold page (200+e, changed once); epoch 1 is a full
// image of a few pages.
func holdBackEpoch(e uint64) *Checkpoint {
	if e == 1 {
		cp := testCheckpoint(1, true, 0, 1, 2, 10, 11, 12)
		cp.State = []byte("state-1")
		return cp
	}
	cp := testCheckpoint(e, false, 10, 11, 12, 200+e)
	cp.State = fmt.Appendf(nil, "state-%d", e)
	return cp
}

// sendAcked sends cp as a primary would (a delta on base) and waits for
// its acknowledgement.
func sendAcked(t testing.TB, c MessageConn, cp *Checkpoint, base uint64) {
	t.Helper()
	if err := SendCheckpoint(c, cp, base); err != nil {
		t.Fatalf("SendCheckpoint(%d) = %v", cp.Epoch, err)
	}
	for {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("reading the ack of %d: %v", cp.Epoch, err)
		}
		if _, ok := m.(*wire.Status); ok {
			continue
		}
		if a, ok := m.(*wire.Ack); !ok || a.Epoch != cp.Epoch {
			t.Fatalf("reply to checkpoint %d = %v, want Ack{%d}", cp.Epoch, m, cp.Epoch)
		}
		return
	}
}

func imageHash(mem, state []byte) [32]byte {
	h := sha256.New()
	h.Write(mem)
	h.Write(state)
	return [32]byte(h.Sum(nil))
}

// TestHoldBackWholeEpochs runs the hold-back policy between a stand-in
// primary and a real backup (mTLS links): hot pages are held back, cold ones
// staged, and a sync every few epochs (the lag bound) brings the backup up.
// Every state of the backup's image that can be observed is exactly the
// intermediary's image at that epoch (never a partial epoch); the lag bound
// holds; hold-back sends fewer bytes than forwarding every epoch would; and
// a flush (as Failover does) brings the backup to the last epoch exactly.
func TestHoldBackWholeEpochs(t *testing.T) {
	const (
		memSize = 4 << 20
		epochs  = 40
		maxLag  = 4
	)
	in, bk, pc := forwardRig(t, memSize, HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: maxLag, MaxLag: time.Hour}, BackupConfig{})

	ref := NewImage(memSize)
	want := map[uint64][32]byte{}
	var naive uint64 // what forwarding every epoch would send
	maxSeenLag, staged := uint64(0), false
	check := func(e uint64) {
		bk.Image().Read(func(mem, state []byte, epoch uint64) {
			if epoch == 0 {
				return
			}
			if h, ok := want[epoch]; !ok || h != imageHash(mem, state) {
				t.Fatalf("after epoch %d the backup's image at its epoch %d is not the intermediary's image at that epoch: a partial epoch", e, epoch)
			}
			maxSeenLag = max(maxSeenLag, e-epoch)
		})
		staged = staged || bk.stagedBytes.Load() > 0
	}
	for e := uint64(1); e <= epochs; e++ {
		cp := holdBackEpoch(e)
		if err := ref.Apply(cp, e-1, in.PageOffset); err != nil {
			t.Fatal(err)
		}
		ref.Read(func(mem, state []byte, _ uint64) { want[e] = imageHash(mem, state) })
		naive += uint64(len(cp.Data))
		sendAcked(t, pc, cp, e-1)
		time.Sleep(2 * time.Millisecond)
		check(e)
		// The lag bound: a sync is due once the backup's epoch is maxLag
		// behind; it lands within moments (the link is fast here).
		if e > 1 {
			waitFor(t, fmt.Sprintf("the backup within %d epochs of %d", maxLag, e), func() bool { return bk.Committed()+maxLag >= e })
		}
	}
	waitFor(t, "a sync at the lag bound", func() bool { return bk.Committed() >= epochs-maxLag })
	check(epochs)
	if maxSeenLag < 2 {
		t.Errorf("the backup lagged at most %d epochs: nothing was held back", maxSeenLag)
	}
	if !staged {
		t.Errorf("no cold page was ever staged at the backup")
	}
	// The re-seed (the first image) aside, hold-back sent fewer page bytes.
	first := uint64(len(holdBackEpoch(1).Data))
	if sent := in.forwarded.Load(); sent >= naive+memSize-first {
		t.Errorf("hold-back forwarded %d bytes, forwarding every epoch would send %d (+ the re-seed)", sent, naive)
	}
	// Failover's flush: everything held goes now, whole.
	if err := attachedBackup(in).sync(t.Context(), in, epochs); err != nil {
		t.Fatalf("sync(%d) = %v", epochs, err)
	}
	if got := bk.Committed(); got != epochs {
		t.Fatalf("after the flush the backup is at %d, want %d", got, epochs)
	}
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("after the flush the backup's image differs from the intermediary's")
	}
	if bk.stagedBytes.Load() != 0 {
		t.Errorf("staged bytes after the sync = %d, want 0", bk.stagedBytes.Load())
	}
}

// TestHoldBackLagInTime: with a time bound only, an epoch syncs the
// backup exactly when the backup's epoch is older than the bound.
func TestHoldBackLagInTime(t *testing.T) {
	const (
		memSize = 4 << 20
		maxLag  = 60 * time.Millisecond
	)
	in, bk, pc := forwardRig(t, memSize, HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: 1 << 40, MaxLag: maxLag}, BackupConfig{})
	sent := sendTimed(t, in, pc, 50, nil)
	checkLagSyncs(t, in, bk, sent, maxLag)
}

// TestHoldBackLagWithoutCheckpoints: a primary that sends nothing for a
// while (a long epoch, a stalled host) does not stretch the backup's lag
// past the time bound. Once the bound is passed the intermediary syncs
// the backup to the latest epoch it holds, with no further checkpoint
// arriving; and not before the bound.
func TestHoldBackLagWithoutCheckpoints(t *testing.T) {
	const (
		memSize = 4 << 20
		maxLag  = 100 * time.Millisecond
	)
	in, bk, pc := forwardRig(t, memSize, HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: 1 << 40, MaxLag: maxLag}, BackupConfig{})
	// Send epochs back to back until one holds pages back without a sync
	// (on a loaded host an epoch may come late enough to sync itself).
	sent := sendTimed(t, in, pc, 1, nil)
	last := uint64(0)
	for e := uint64(2); e < 50 && last == 0; e++ {
		sent = append(sent, timedEpoch{start: time.Now()})
		sendAcked(t, pc, holdBackEpoch(e), e-1)
		sent[e].acked = time.Now()
		if lastSynced(in) < e {
			last = e
		}
	}
	if last == 0 {
		t.Fatalf("every epoch synced the backup: nothing held back")
	}
	// Nothing more is sent: the sync must come from the intermediary.
	waitFor(t, fmt.Sprintf("the backup to commit epoch %d with no checkpoint after it", last), func() bool { return bk.Committed() >= last },
		func() string { return fmt.Sprintf("the backup is at %d, its base %d", bk.Committed(), baseOf(in)) })
	if got := bk.Committed(); got != last {
		t.Fatalf("the backup committed %d, want the last epoch %d", got, last)
	}
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("the backup's image at epoch %d differs from the intermediary's", last)
	}
	// Not early, none skipped; the sync of the last epoch among them.
	checkLagSyncs(t, in, bk, sent, maxLag)
	syncs := attachedBackup(in).held.syncs.list()
	if r := syncs[len(syncs)-1]; r.epoch != last || r.acked.Before(r.queued) {
		t.Errorf("the last sync recorded = %+v, want one of epoch %d, acknowledged after it was queued", r, last)
	}
}

// timedEpoch is what a test saw of one epoch it sent: when its send began
// and when its acknowledgement arrived.
type timedEpoch struct{ start, acked time.Time }

// sendTimed sends holdBackEpoch 1..n 10 ms apart, as a primary would, and
// records each. Epoch 1 seeds the backup; the others are sent once the
// seed has landed, so that the backup's base is epoch 1 from then on.
// each, if given, runs after each acknowledgement.
func sendTimed(t *testing.T, in *Intermediary, pc MessageConn, n uint64, each func(e uint64)) []timedEpoch {
	t.Helper()
	sent := make([]timedEpoch, n+1)
	for e := uint64(1); e <= n; e++ {
		sent[e].start = time.Now()
		sendAcked(t, pc, holdBackEpoch(e), e-1)
		sent[e].acked = time.Now()
		if e == 1 {
			waitFor(t, "the seed", func() bool { return attachedBackup(in) != nil && baseOf(in) == 1 })
		}
		if each != nil {
			each(e)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return sent
}

// lastSynced returns the epoch of the last sync queued for the backup (0:
// none).
func lastSynced(in *Intermediary) uint64 {
	syncs := attachedBackup(in).held.syncs.list()
	if len(syncs) == 0 {
		return 0
	}
	return syncs[len(syncs)-1].epoch
}

// baseOf returns the epoch the intermediary's backup link is synced to.
func baseOf(in *Intermediary) uint64 {
	h := &attachedBackup(in).held
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.synced
}

// checkLagSyncs checks, from the times the test saw and the syncs the
// intermediary recorded (a sync is queued when an epoch arrives, or
// between epochs by the writer's ticker), that the backup was synced if
// and only if its base was at least maxLag old. The test's times bracket
// the intermediary's own: an epoch is applied after its send began and
// before its acknowledgement came. So a sync is never early (it was queued
// at least maxLag after its base's send began), and none is skipped (an
// epoch that brought no sync began less than maxLag after the base was
// acknowledged). Every sync reaches the backup. A loaded host stretches
// the times, not these relations.
func checkLagSyncs(t *testing.T, in *Intermediary, bk *Backup, sent []timedEpoch, maxLag time.Duration) {
	t.Helper()
	queued := map[uint64]time.Time{}
	for _, r := range attachedBackup(in).held.syncs.list() {
		queued[r.epoch] = r.queued
	}
	base, syncs := uint64(1), 0
	for e := uint64(2); e < uint64(len(sent)); e++ {
		b, x := sent[base], sent[e]
		q, synced := queued[e]
		if synced && q.Sub(b.start) < maxLag {
			t.Errorf("a sync of epoch %d was queued %v after its base %d was sent: before the %v bound", e, q.Sub(b.start), base, maxLag)
		}
		if !synced && x.start.Sub(b.acked) >= maxLag {
			t.Errorf("epoch %d did not sync the backup though its base %d was acknowledged %v before: past the %v bound", e, base, x.start.Sub(b.acked), maxLag)
		}
		if synced {
			base = e
			syncs++
		}
	}
	if syncs == 0 {
		t.Errorf("no sync in %d epochs over %v with a %v bound", len(sent)-1, sent[len(sent)-1].acked.Sub(sent[1].start), maxLag)
	}
	waitFor(t, fmt.Sprintf("the backup to commit the last sync (epoch %d)", base), func() bool { return bk.Committed() >= base })
}

func TestParseHoldBack(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want *HoldBack
	}{
		{"off", nil},
		{"on", &DefaultHoldBack},
		{"threshold=3", &HoldBack{Threshold: 3, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: 5 * time.Second}},
		{"threshold=1.5,max-held=8M,max-lag-epochs=40,max-lag=2s", &HoldBack{Threshold: 1.5, MaxHeld: 8 << 20, MaxLagEpochs: 40, MaxLag: 2 * time.Second}},
		{"bandwidth=100Mbit,range=0-1M,range=0x200000-0x400000", &HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: 5 * time.Second,
			Bandwidth: 12_500_000, Ranges: []Range{{0, 1 << 20}, {0x200000, 0x400000}}}},
		{"bandwidth=2MiB/s", &HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: 5 * time.Second, Bandwidth: 2 << 20}},
	} {
		got, err := ParseHoldBack(tc.in)
		if err != nil || !reflect.DeepEqual(got, tc.want) {
			t.Errorf("ParseHoldBack(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"threshold", "threshold=0", "threshold=-1", "threshold=NaN", "max-held=lots",
		"max-lag-epochs=0", "max-lag=-1s", "max-lag=0s", "speed=9", "threshold=2,", "on,threshold=2",
		"bandwidth=0", "bandwidth=fast", "bandwidth=-1Mbit", "bandwidth=NaNbit", "range=4M-1M", "range=0-4097", "range=1M", "range=0x-0x1000", "manifest"} {
		if _, err := ParseHoldBack(bad); err == nil {
			t.Errorf("ParseHoldBack(%q) = nil error, want a refusal", bad)
		}
	}
}

func FuzzParseHoldBack(f *testing.F) {
	for _, s := range []string{"on", "off", "threshold=2,max-held=64M", "max-lag=5s,max-lag-epochs=3", "=", ",,"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseHoldBack(s)
		if err == nil && h != nil && !(h.Threshold > 0 && h.MaxLagEpochs > 0 && h.MaxLag > 0) {
			t.Fatalf("ParseHoldBack(%q) = %+v: accepted an invalid policy", s, h)
		}
	})
}

// backupPolicyRig is an intermediary with a real backup that installs
// policy, fed by a stand-in primary.
func backupPolicyRig(t *testing.T, policy string) (*Intermediary, *Backup, MessageConn) {
	in, bk, pc := forwardRig(t, 4<<20, nil, BackupConfig{Policy: policy})
	waitFor(t, "the policy answer", func() bool { return bk.PolicyState() != "" })
	return in, bk, pc
}

// TestBackupInstalledPolicy: a backup installs "pull everything at most
// every 100 ms unless the lag exceeds 1000 epochs" at its intermediary,
// which acknowledges it and then stages nothing and syncs on that schedule.
func TestBackupInstalledPolicy(t *testing.T) {
	in, bk, pc := backupPolicyRig(t, "pull-every=100ms,max-lag-epochs=1000")
	if s := bk.PolicyState(); !strings.Contains(s, "policy 1 installed") {
		t.Fatalf("PolicyState() = %q, want policy 1 installed", s)
	}
	// Nothing is staged: the backup holds only what the syncs bring, so
	// after an epoch that did not sync it is behind.
	sent := sendTimed(t, in, pc, 40, func(e uint64) {
		if bk.stagedBytes.Load() != 0 {
			t.Fatalf("a pull policy staged %d bytes", bk.stagedBytes.Load())
		}
		// A sync is recorded before it is queued: one the backup
		// committed is there by the time of this look. Epoch 1 comes
		// as the seed (a re-seed), not a sync.
		if c := bk.Committed(); e > 1 && c >= e && lastSynced(in) < e {
			t.Errorf("the backup committed epoch %d, which no sync brought", e)
		}
	})
	checkLagSyncs(t, in, bk, sent, 100*time.Millisecond)
}

// TestBackupPolicyRefused: a policy the intermediary does not accept is
// refused with a reason and changes nothing: it goes on forwarding every
// epoch, and the link stays up.
func TestBackupPolicyRefused(t *testing.T) {
	for _, spec := range []string{"bandwidth=0", "threshold=-3", "pull-every=soon", "ranges=0-4096", "off", "range=0-8M", "manifest=yes", "range=0x1000-0x2000,range=2M-6M"} {
		t.Run(spec, func(t *testing.T) {
			_, bk, pc := backupPolicyRig(t, spec)
			if s := bk.PolicyState(); !strings.Contains(s, "policy 1 refused") {
				t.Fatalf("PolicyState() = %q, want a refusal with its reason", s)
			}
			for e := uint64(1); e <= 5; e++ {
				sendAcked(t, pc, holdBackEpoch(e), e-1)
			}
			waitFor(t, "the backup to follow every epoch", func() bool { return bk.Committed() == 5 })
		})
	}
	// A stale version is refused too.
	in, err := NewIntermediary(4<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	b := &backupLink{policyVersion: 5}
	if m, ok := in.installPolicy(b, &wire.Policy{Version: 3, Spec: "pull-every=1s"}).(*wire.Error); !ok || !strings.Contains(m.Reason, "not newer") {
		t.Errorf("installPolicy(version 3 after 5) = %v, want a refusal", m)
	}
}

func FuzzParseBackupPolicy(f *testing.F) {
	for _, s := range []string{"pull-every=2s,max-lag-epochs=400", "threshold=2", "bandwidth=1", "pull-every=", ","} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		h, err := ParseBackupPolicy(s)
		if err == nil && !(h.Threshold >= 0 && h.MaxLagEpochs > 0 && h.MaxLag > 0) {
			t.Fatalf("ParseBackupPolicy(%q) = %+v: accepted an invalid policy", s, h)
		}
	})
}

// TestPolicyAfterWholeEpochs: a hold-back policy installed after whole
// epochs were forwarded syncs on the last of them; the backup is not
// re-seeded.
func TestPolicyAfterWholeEpochs(t *testing.T) {
	in, bk, pc := forwardRig(t, 4<<20, nil, BackupConfig{})
	for e := uint64(1); e <= 5; e++ {
		sendAcked(t, pc, holdBackEpoch(e), e-1)
	}
	waitFor(t, "the backup to follow every epoch", func() bool { return bk.Committed() == 5 })
	// The backup was seeded one way or another (a re-seed, if it attached
	// after epoch 1 was applied, or epoch 1's full image forwarded whole).
	seeds := in.reseeds.Load()
	in.SetForwardPolicy(HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: 3, MaxLag: time.Hour})
	for e := uint64(6); e <= 20; e++ {
		sendAcked(t, pc, holdBackEpoch(e), e-1)
	}
	waitFor(t, "a sync at the lag bound", func() bool { return bk.Committed() >= 18 })
	if n := in.reseeds.Load(); n != seeds {
		t.Errorf("%d re-seeds after the policy was installed, want none", n-seeds)
	}
	if in.syncs.Load() == 0 {
		t.Errorf("no hold-back sync")
	}
}
