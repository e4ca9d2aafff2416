package ft

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// TestFailoverNothingLost runs counter under a primary that streams to an
// intermediary, which forwards to a backup (one process, real mTLS links).
// After some epochs the primary is killed without a goodbye (its machine and
// link closed under it), the intermediary fails over, and the backup resumes
// the guest. Nothing released is lost: the resumed guest's first record
// follows every record the client saw, and when the primary had processed
// the activated epoch's acknowledgement it is exactly the next one. The
// activated image is consistent with one instant of the guest: every hot
// page holds the same sequence number, or, for a stun mid-iteration, a
// prefix holds s and the rest s-1.
func TestFailoverNothingLost(t *testing.T) {
	kvmtest.Require(t)
	const (
		memSize = 8 << 20
		hot     = 16
	)
	pc, ic := link(t, memSize)
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	go in.ServePrimary(ic)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go in.ServeBackup(ctx, ib)

	var (
		bmu     sync.Mutex
		resumed []uint64
	)
	bk, err := NewBackup(memSize, BackupConfig{Restore: vmm.RestoreConfig{OnRecord: func(r vmm.Record) {
		bmu.Lock()
		resumed = append(resumed, r.Value)
		bmu.Unlock()
	}}})
	if err != nil {
		t.Fatal(err)
	}
	type served struct {
		m   *vmm.Machine
		err error
	}
	backupDone := make(chan served, 1)
	go func() { m, err := bk.Serve(bi); backupDone <- served{m, err} }()

	// The primary and its client.
	var (
		p        *Primary
		mu       sync.Mutex
		emitted  uint64 // last record the primary's guest emitted
		released []uint64
	)
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options: map[string]string{"pages": "256", "hot": "16", "cold_every": "2", "iterations": "0", "report": "0"},
		OnRecord: func(r vmm.Record) {
			mu.Lock()
			emitted = r.Value
			mu.Unlock()
			p.Record(r)
		}}})
	if err != nil {
		t.Fatal(err)
	}
	dataBase := m.DataRegions()[0] * mmu.RegionSize
	p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 10 * time.Millisecond, OnRelease: func(r vmm.Record) {
		mu.Lock()
		released = append(released, r.Value)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	pctx, kill := context.WithCancel(ctx)
	machineDone := make(chan error, 1)
	go func() { _, err := m.Run(pctx); machineDone <- err }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(pctx) }()
	waitFor(t, "the backup to commit 10 epochs", func() bool { return bk.Committed() >= 10 })

	// Host loss: the link and the machine go away mid-stream, no goodbye.
	pc.Close()
	kill()
	if err := <-primaryDone; err == nil {
		t.Errorf("Primary.Run after the kill = nil, want an error")
	}
	<-machineDone
	m.Close()

	epoch, err := in.Failover(ctx)
	if err != nil {
		t.Fatalf("Failover() = %v", err)
	}
	b := <-backupDone
	if b.err != nil || b.m == nil {
		t.Fatalf("Backup.Serve() = %v, %v, want a machine", b.m, b.err)
	}
	defer b.m.Close()
	if got := bk.Committed(); got != epoch {
		t.Fatalf("backup committed epoch = %d, want the failover epoch %d", got, epoch)
	}
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("backup image at epoch %d differs from the intermediary's", epoch)
	}

	// (b) The activated image shows one instant of the guest.
	seqs := make([]uint64, hot)
	bk.Image().Read(func(mem, _ []byte, _ uint64) {
		for i := range seqs {
			page := mem[dataBase+uint64(i)*mmu.PageSize:]
			seqs[i] = binary.LittleEndian.Uint64(page)
			if idx, inv := binary.LittleEndian.Uint64(page[8:]), binary.LittleEndian.Uint64(page[16:]); idx != uint64(i) || inv != ^seqs[i] {
				t.Errorf("hot page %d = seq %d, index %d, ~seq %#x: torn", i, seqs[i], idx, inv)
			}
		}
	})
	s, split := seqs[0], hot
	for i, v := range seqs {
		if v != s && split == hot {
			split = i
		}
		if (i < split && v != s) || (i >= split && v != s-1) {
			t.Fatalf("hot pages at activation = %v: not one instant of the guest", seqs)
		}
	}

	// Run the restored guest and collect its records.
	bctx, stop := context.WithTimeout(ctx, 10*time.Second)
	defer stop()
	runDone := make(chan error, 1)
	go func() { _, err := b.m.Run(bctx); runDone <- err }()
	waitFor(t, "the restored guest's records", func() bool {
		bmu.Lock()
		defer bmu.Unlock()
		return len(resumed) >= 1000
	})
	stop()
	if err := <-runDone; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("restored machine Run = %v", err)
	}

	bmu.Lock()
	defer bmu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if len(released) == 0 {
		t.Fatal("no record was released before the kill")
	}
	for i, v := range released {
		if v != uint64(i+1) {
			t.Fatalf("released record %d = %d, want %d", i, v, i+1)
		}
	}
	last, first := released[len(released)-1], resumed[0]
	for i, v := range resumed {
		if v != first+uint64(i) {
			t.Fatalf("backup record %d = %d, want %d: not consecutive", i, v, first+uint64(i))
		}
	}
	// (a) The backup first releases what the primary still held, then the
	// resumed guest goes on: a client that drops what it has seen (by
	// sequence) continues exactly after its last record, and the backup
	// does not get ahead of what the primary's guest did.
	if first > last+1 {
		t.Errorf("first backup record = %d, want <= %d: records after the last released one are lost", first, last+1)
	}
	if first > emitted+1 {
		t.Errorf("first backup record = %d, want <= %d (one past the primary's last)", first, emitted+1)
	}
	// The resumed guest's records belong to the instant the hot pages show.
	if end := resumed[len(resumed)-1]; end < s {
		t.Errorf("backup records end at %d, before the activated instant %d", end, s)
	}
	t.Logf("failover at epoch %d (primary acked %d): released 1..%d, primary emitted up to %d, backup released from %d, hot pages split at %d",
		epoch, p.Acked(), last, emitted, first, split)
}
