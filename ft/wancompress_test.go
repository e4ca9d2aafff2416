package ft

import (
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// TestWANCompression: with compression on, the backup link carries
// compressed page batches, fewer bytes than the pages, and the backup's
// image is the intermediary's, epoch by epoch (plain forwarding, then
// hold-back with its staged pages).
func TestWANCompression(t *testing.T) {
	for _, policy := range []ForwardPolicy{ForwardEvery{}, HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: 3, MaxLag: time.Hour}} {
		in, bk, pc := forwardRig(t, 4<<20, policy, BackupConfig{}, func(in *Intermediary) {
			if err := in.SetWANCompression(wanzip.DefaultLevel); err != nil {
				t.Fatal(err)
			}
		})
		for e := uint64(1); e <= 12; e++ {
			sendAcked(t, pc, holdBackEpoch(e), e-1)
		}
		if err := attachedBackup(in).sync(t.Context(), in, 12); err != nil {
			t.Fatalf("%T: sync = %v", policy, err)
		}
		if !sameImage(in.Image(), bk.Image()) {
			t.Errorf("%T: with compression the backup's image differs from the intermediary's", policy)
		}
		raw, sent := in.wanRaw.Load(), in.wanWire.Load()
		if raw == 0 || sent*4 > raw {
			t.Errorf("%T: compressed %d page bytes into %d, want at least 4x smaller for these pages", policy, raw, sent)
		}
	}
}

// TestCompressedBatchRefused: a compressed batch that does not decode is a
// bad checkpoint: the backup refuses it and commits nothing.
func TestCompressedBatchRefused(t *testing.T) {
	const memSize = 4 << 20
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	done := make(chan error, 1)
	go func() { _, err := bk.Serve(bi); done <- err }()
	if err := SendCheckpoint(ib, testCheckpoint(1, true, 0, 1), 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "epoch 1", func() bool { return bk.Committed() == 1 })
	ib.WriteMessage(&wire.CheckpointBegin{Epoch: 2, Base: 1, Pages: 1, StateLen: 5})
	ib.WriteMessage(&wire.CompressedBatch{Epoch: 2, Sums: []uint32{0}, Data: []byte{1, 0, 1, 7, 0xff, 0xff}})
	if err := <-done; !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("Serve after a corrupt compressed batch = %v, want ErrBadCheckpoint", err)
	}
	if bk.Committed() != 1 {
		t.Errorf("committed epoch after the corrupt batch = %d, want 1", bk.Committed())
	}
}

// TestCompressedBatchFromPrimary: the intermediary takes a primary's
// compressed page batches (PrimaryConfig.Compression) as raw ones, and
// refuses one that does not decode as a bad checkpoint from a live
// primary (ErrRefused), not a lost one (which would fail over).
func TestCompressedBatchFromPrimary(t *testing.T) {
	const memSize = 4 << 20
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- in.ServePrimary(ic) }()
	enc, err := wanzip.NewEncoder(wanzip.LevelStore)
	if err != nil {
		t.Fatal(err)
	}
	var raw, sent atomic.Uint64
	zc := &compressingConn{MessageConn: pc, enc: enc, raw: &raw, wire: &sent}
	sendAcked(t, zc, holdBackEpoch(1), 0)
	sendAcked(t, zc, holdBackEpoch(2), 1)
	if raw.Load() == 0 {
		t.Fatalf("no page batch went compressed")
	}
	want := NewImage(memSize)
	for e := uint64(1); e <= 2; e++ {
		if err := want.Apply(holdBackEpoch(e), e-1, in.PageOffset); err != nil {
			t.Fatal(err)
		}
	}
	if !sameImage(in.Image(), want) {
		t.Errorf("the intermediary's image after two compressed checkpoints differs from the checkpoints applied")
	}
	pc.WriteMessage(&wire.CheckpointBegin{Epoch: 3, Base: 2, Pages: 1, StateLen: 5})
	pc.WriteMessage(&wire.CompressedBatch{Epoch: 3, Sums: []uint32{0}, Data: []byte{1, 0, 1, 7, 0xff, 0xff}})
	if err := <-done; !errors.Is(err, ErrRefused) || errors.Is(err, ErrPrimaryLost) {
		t.Errorf("ServePrimary after a corrupt compressed batch = %v, want ErrRefused (not ErrPrimaryLost)", err)
	}
	if e := in.Image().Epoch(); e != 2 {
		t.Errorf("the intermediary's epoch after the corrupt batch = %d, want 2", e)
	}
}

// BenchmarkStreamStore measures what --compress store costs and saves a
// primary: a 64 MiB full image sent to a serving intermediary over mTLS on
// loopback (as BenchmarkStream), raw and at wanzip.LevelStore, for memory
// with no zero pages (the worst case: a copy and a checksum more per byte,
// nothing saved) and for memory nine tenths zero (a freshly booted guest's
// first image). The rounds alternate, best of 4 each. It prints per mix
//
//	bench ft-stream-store: zero_pct=Z raw_mib_s=A store_mib_s=B speedup=B/A wire_ratio=W
//
// with W the bytes on the link over the page bytes.
func BenchmarkStreamStore(b *testing.B) {
	const memSize = 64 << 20
	for _, zeroPct := range []int{0, 90} {
		_, pc := servingIntermediary(b, memSize)
		cp := testImage(1, memSize)
		pages := memSize / wire.PageSize
		for p := range pages * zeroPct / 100 {
			q := p * 100 / zeroPct // spread over memory
			clear(cp.Data[q*wire.PageSize : (q+1)*wire.PageSize])
		}
		enc, err := wanzip.NewEncoder(wanzip.LevelStore)
		if err != nil {
			b.Fatal(err)
		}
		var raw, sent atomic.Uint64
		zc := &compressingConn{MessageConn: pc, enc: enc, raw: &raw, wire: &sent}
		send := func(c MessageConn, epoch uint64) time.Duration {
			cp.Epoch = epoch
			t0 := time.Now()
			sendAcked(b, c, cp, 0)
			return time.Since(t0)
		}
		var bestRaw, bestStore time.Duration
		for round := uint64(0); round < 4; round++ {
			if d := send(pc, 2*round+1); bestRaw == 0 || d < bestRaw {
				bestRaw = d
			}
			if d := send(zc, 2*round+2); bestStore == 0 || d < bestStore {
				bestStore = d
			}
		}
		mib := float64(memSize) / (1 << 20)
		fmt.Printf("bench ft-stream-store: zero_pct=%d raw_mib_s=%.0f store_mib_s=%.0f speedup=%.2f wire_ratio=%.3f image_mib=%.0f (mTLS loopback, verified and applied, best of 4)\n",
			zeroPct, mib/bestRaw.Seconds(), mib/bestStore.Seconds(), bestRaw.Seconds()/bestStore.Seconds(),
			float64(sent.Load())/float64(raw.Load()), mib)
	}
}
