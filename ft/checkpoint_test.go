package ft

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// startCounter runs a counter guest until stop is called or the test ends.
func startCounter(t testing.TB, mem uint64, opts map[string]string) (m *vmm.Machine, recs *atomic.Uint64, stop func()) {
	t.Helper()
	recs = new(atomic.Uint64)
	m, err := vmm.New(vmm.Config{MemSize: mem, Payload: &vmm.PayloadConfig{Name: "counter", Options: opts,
		OnRecord: func(r vmm.Record) { recs.Store(r.Value) }}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("Run = %v, want Canceled", err)
			}
			m.Close()
		})
	}
	t.Cleanup(stop)
	return m, recs, stop
}

func waitRecords(t testing.TB, recs *atomic.Uint64, min uint64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for recs.Load() < min {
		if time.Now().After(deadline) {
			t.Fatalf("records stuck at %d, want %d", recs.Load(), min)
		}
		time.Sleep(time.Millisecond)
	}
}

// apply writes a checkpoint's pages into image (laid out like the backing).
func apply(t *testing.T, mem *mmu.Memory, image []byte, cp *Checkpoint) {
	t.Helper()
	for i, pfn := range cp.PFNs {
		off, err := mem.Offset(pfn*mmu.PageSize, mmu.PageSize)
		if err != nil {
			t.Fatalf("checkpoint %d: page %#x: %v", cp.Epoch, pfn, err)
		}
		copy(image[off:], cp.Page(i))
	}
}

// TestCheckpointsRebuildMemory takes a full image with pre-copy while the
// guest runs, then deltas; applied in order they must rebuild guest memory
// byte for byte as of the last checkpoint.
func TestCheckpointsRebuildMemory(t *testing.T) {
	kvmtest.Require(t)
	m, recs, _ := startCounter(t, 32<<20, map[string]string{"pages": "2048", "hot": "64", "cold_every": "1", "iterations": "0", "report": "0"})
	waitRecords(t, recs, 10)
	c, err := NewCheckpointer(m)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	full, err := c.TakeFull(2)
	if err != nil {
		t.Fatal(err)
	}
	mem := m.Memory()
	if full.Kind != KindFull || full.Epoch != 1 || len(full.PFNs) != int(mem.Size()/mmu.PageSize) || len(full.Data) != int(mem.Size()) || len(full.State) == 0 {
		t.Fatalf("full image: epoch %d, %d pages, %d bytes, %d state bytes", full.Epoch, len(full.PFNs), len(full.Data), len(full.State))
	}
	image := make([]byte, mem.Size())
	apply(t, mem, image, full)
	for e := uint64(2); e <= 20; e++ {
		before := recs.Load()
		waitRecords(t, recs, before+5)
		cp, err := c.Take()
		if err != nil {
			t.Fatal(err)
		}
		if cp.Epoch != e || cp.Kind != KindDelta || len(cp.PFNs) == 0 || len(cp.State) == 0 || cp.Stun <= 0 {
			t.Fatalf("checkpoint %d: %+v", e, cp)
		}
		for i := 1; i < len(cp.PFNs); i++ {
			if cp.PFNs[i] <= cp.PFNs[i-1] {
				t.Fatalf("checkpoint %d: PFNs not ascending at %d", e, i)
			}
		}
		apply(t, mem, image, cp)
	}
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	last, err := c.TakePaused()
	if err != nil {
		t.Fatal(err)
	}
	apply(t, mem, image, last)
	if !bytes.Equal(image, mem.Backing()) {
		n := 0
		for off := 0; off < len(image); off += mmu.PageSize {
			if !bytes.Equal(image[off:off+mmu.PageSize], mem.Backing()[off:off+mmu.PageSize]) {
				n++
			}
		}
		t.Fatalf("rebuilt memory differs from guest memory in %d pages", n)
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
}

// TestStagingShrinks: a staging buffer grown for an epoch that dirtied
// much (a guest's boot) is given back once the epochs dirty a quarter of
// it or less, and kept while they need more.
func TestStagingShrinks(t *testing.T) {
	for _, tt := range []struct {
		have, want int
		shrink     bool
	}{
		{shrinkPages, 1, false},                   // small buffers are always kept
		{shrinkPages + 1, 10, true},               // past the floor and 4× the need
		{8 * shrinkPages, 2 * shrinkPages, false}, // still needed
		{8 * shrinkPages, 2*shrinkPages - 1, true},
	} {
		if got := shrink(tt.have, tt.want); got != tt.shrink {
			t.Errorf("shrink(%d, %d) = %v, want %v", tt.have, tt.want, got, tt.shrink)
		}
	}
}
