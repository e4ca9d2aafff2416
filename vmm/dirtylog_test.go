package vmm

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
)

func bit(bm []uint64, page uint64) bool { return bm[page/64]&(1<<(page%64)) != 0 }

// TestDirtyLogHarvest runs counter with dirty logging on and checks that a
// harvest taken while paused holds exactly the pages the guest wrote since
// the previous one, plus the pages the VMM wrote itself.
func TestDirtyLogHarvest(t *testing.T) {
	requireKVM(t)
	var recs atomic.Uint64
	m, err := New(Config{MemSize: 16 << 20, Payload: &PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "64", "hot": "4", "cold_every": "1", "iterations": "0", "report": "0"},
		OnRecord: func(r Record) { recs.Store(r.Value) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	mem := m.Memory()
	dl, err := mem.EnableDirtyLog(m.VM())
	if err != nil {
		t.Fatal(err)
	}
	bm := make([]uint64, mem.BitmapWords())
	// The first harvest takes everything the loader wrote.
	if n, err := dl.Harvest(bm); err != nil || n == 0 {
		t.Fatalf("first Harvest = %d, %v; want the loader's pages", n, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v", err)
		}
	}()
	base := m.payload.dataBase / mmu.PageSize // backing page of counter page 0 (region 0 is at offset 0)
	for round := 0; round < 5; round++ {
		start := recs.Load()
		testutil.WaitFor(t, "100 more iterations", func() bool { return recs.Load() >= start+100 })
		if _, err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		clear(bm)
		if err := mem.PutUint64(0x1ff8, 42); err != nil { // a VMM write (last word of the GDT page)
			t.Fatal(err)
		}
		// Counting reads the log without taking it: twice the same, and
		// exactly what the harvest then takes.
		c1, err := dl.Count()
		if err != nil {
			t.Fatal(err)
		}
		c2, err := dl.Count()
		if err != nil || c2 != c1 {
			t.Errorf("round %d: Count = %d, %v after Count = %d; want the same", round, c2, err, c1)
		}
		n, err := dl.Harvest(bm)
		if err != nil {
			t.Fatal(err)
		}
		if n != c1 {
			t.Errorf("round %d: Harvest = %d pages, Count before it = %d; want equal", round, n, c1)
		}
		if c, err := dl.Count(); err != nil || c != 0 {
			t.Errorf("round %d: Count after Harvest (paused) = %d, %v; want 0", round, c, err)
		}
		from, to := start, recs.Load()
		// Hot pages are written every iteration; with cold_every=1 one cold
		// page per iteration, round robin over the 60 cold pages.
		for p := uint64(0); p < 4; p++ {
			if !bit(bm, base+p) {
				t.Errorf("round %d: hot page %d not dirty", round, p)
			}
		}
		if !bit(bm, 1) {
			t.Errorf("round %d: page 1 (written by the VMM) not dirty", round)
		}
		for p := uint64(64); p < 128; p++ {
			if bit(bm, base+p) {
				t.Errorf("round %d: page %d past the counter pages is dirty", round, p)
			}
		}
		if to-from >= 60 {
			for p := uint64(4); p < 64; p++ {
				if !bit(bm, base+p) {
					t.Errorf("round %d: cold page %d not dirty after %d iterations", round, p, to-from)
				}
			}
		}
		if n < 5 {
			t.Errorf("round %d: %d dirty pages", round, n)
		}
		// Immediately harvesting again (still paused) finds nothing new.
		clear(bm)
		if n, err := dl.Harvest(bm); err != nil || n != 0 {
			t.Errorf("round %d: second Harvest while paused = %d, %v; want 0", round, n, err)
		}
		if _, err := m.Resume(); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dl.Harvest(make([]uint64, 1)); err == nil {
		t.Errorf("Harvest into a short bitmap succeeded")
	}
	if err := dl.Disable(); err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Harvest(bm); err == nil {
		t.Errorf("Harvest after Disable succeeded")
	}
	if _, err := dl.Count(); err == nil {
		t.Errorf("Count after Disable succeeded")
	}
}
