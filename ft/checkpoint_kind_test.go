package ft

import (
	"testing"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// TestCheckpointKinds: validate accepts each kind's shape and refuses the
// others, and a committing kind round-trips through its wire flags.
func TestCheckpointKinds(t *testing.T) {
	page := make([]byte, mmu.PageSize)
	for _, tc := range []struct {
		name string
		cp   Checkpoint
		ok   bool
	}{
		{"delta", Checkpoint{Epoch: 2, PFNs: []uint64{1}, Data: page, State: []byte("s")}, true},
		{"full", Checkpoint{Epoch: 2, Kind: KindFull, PFNs: []uint64{1}, Data: page, State: []byte("s")}, true},
		{"staged pages", Checkpoint{Epoch: 2, Kind: KindStagePages, PFNs: []uint64{1}, Data: page}, true},
		{"sync", Checkpoint{Epoch: 5, Kind: KindSync, Base: 2, State: []byte("s")}, true},
		{"unknown kind", Checkpoint{Epoch: 2, Kind: KindSync + 1}, false},
		{"short data", Checkpoint{Epoch: 2, PFNs: []uint64{1, 2}, Data: page}, false},
		{"sync without base", Checkpoint{Epoch: 5, Kind: KindSync}, false},
		{"sync on a later base", Checkpoint{Epoch: 5, Kind: KindSync, Base: 5}, false},
		{"delta with a base", Checkpoint{Epoch: 5, Base: 4}, false},
		{"staged pages with state", Checkpoint{Epoch: 2, Kind: KindStagePages, State: []byte("s")}, false},
	} {
		if err := tc.cp.validate(); (err == nil) != tc.ok {
			t.Errorf("%s: validate() = %v, want ok=%v", tc.name, err, tc.ok)
		}
	}
	for _, k := range []CheckpointKind{KindDelta, KindFull, KindSync} {
		if got := kindOf(k.wireFlags()); got != k || !k.Commits() {
			t.Errorf("kind %v: flags %#x read back as %v", k, k.wireFlags(), got)
		}
	}
	if KindStagePages.Commits() || kindOf(wire.FlagFullImage) != KindFull {
		t.Errorf("staged pages commit, or a full image's flag is not KindFull")
	}
}

// TestPageLimiter: no cap passes everything; a cap passes its burst (a
// tenth of a second's worth, at least two pages) at once and then refills.
func TestPageLimiter(t *testing.T) {
	var l pageLimiter
	if n := l.take(0, 100); n != 100 {
		t.Errorf("take(no cap, 100) = %d", n)
	}
	if n := l.take(100*mmu.PageSize, 100); n != 10 {
		t.Errorf("first take(100 pages/s, 100) = %d, want the burst of 10", n)
	}
	var slow pageLimiter // one page a second: a burst of two pages
	if n := slow.take(mmu.PageSize, 100); n != 2 {
		t.Errorf("take(1 page/s, 100) = %d, want the two-page minimum burst", n)
	}
	if n := slow.take(mmu.PageSize, 100); n != 0 {
		t.Errorf("take(1 page/s) right after the burst = %d, want 0", n)
	}
}

// BenchmarkPageLimiter is one capped take, as forward makes per checkpoint.
func BenchmarkPageLimiter(b *testing.B) {
	var l pageLimiter
	for b.Loop() {
		l.take(1<<40, 64)
	}
}
