package mmu

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// newSampled returns 8 MiB of memory filled with a pattern, and a sampler.
func newSampled(t *testing.T, k int) (*Memory, *Sampler, []byte) {
	t.Helper()
	m, err := New(Config{Size: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	pat := make([]byte, m.Size())
	for i := range pat {
		pat[i] = byte(i*7 + i>>12)
	}
	copy(m.Backing(), pat)
	s, err := NewSampler(m, SamplerConfig{PagesPerRegion: k, Seed: 42})
	if err != nil {
		t.Fatal(err)
	}
	return m, s, pat
}

func TestSamplerConfig(t *testing.T) {
	m, err := New(Config{Size: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, k := range []int{-1, 65} {
		if _, err := NewSampler(m, SamplerConfig{PagesPerRegion: k}); err == nil {
			t.Errorf("NewSampler(PagesPerRegion %d) succeeded", k)
		}
	}
}

// TestSamplerCounts drives a window by hand: faults on sampled pages count
// once each, a fault elsewhere while armed voids the window, and memory is
// intact and accessible afterwards.
func TestSamplerCounts(t *testing.T) {
	m, s, pat := newSampled(t, 8)
	if _, err := s.Disarm(); err == nil {
		t.Errorf("Disarm before Arm succeeded")
	}
	if err := s.Arm([]SampleSpec{{Region: 1}, {Region: 2, Large: true}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Arm(nil); err == nil {
		t.Errorf("second Arm succeeded")
	}
	// Find region 1's sampled block: it is the block of pages below region 2.
	b := s.blocks[0]
	if b.region != 1 || b.pages != 8 || b.gpa < RegionSize || b.gpa+8*PageSize > 2*RegionSize {
		t.Fatalf("region 1 block = %+v", b)
	}
	if !s.Fault([]uint64{b.gpa + 3*PageSize + 100}) || !s.Fault([]uint64{b.gpa + 3*PageSize}) || !s.Fault([]uint64{b.gpa, 2*RegionSize + 12345}) {
		t.Fatalf("Fault on sampled pages returned false")
	}
	counts, err := s.Disarm()
	if err != nil {
		t.Fatal(err)
	}
	want := []RegionCount{{Region: 1, Sampled: 8, Accessed: 2}, {Region: 2, Large: true, Sampled: 1, Accessed: 1}}
	if len(counts) != 2 || counts[0] != want[0] || counts[1] != want[1] {
		t.Errorf("Disarm() = %+v, want %+v", counts, want)
	}
	if e := counts[0].Estimate(); e != 128 {
		t.Errorf("Estimate() = %v, want 2/8*512 = 128", e)
	}
	if e := counts[1].Estimate(); e != 512 {
		t.Errorf("large Estimate() = %v, want 512", e)
	}
	// Everything is readable and writable again, with its data.
	if !bytes.Equal(m.Backing(), pat) {
		t.Errorf("memory changed by sampling")
	}
	if err := m.Write(RegionSize+5*PageSize, []byte{1}); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Windows != 1 || st.Refaults != 3 || st.Unresolved != 0 || st.Protects < 5 {
		t.Errorf("Stats() = %+v, want 1 window, 3 refaults", st)
	}

	// A stale fault just after Disarm is tolerated; much later it is real.
	if !s.Fault([]uint64{b.gpa}) {
		t.Errorf("stale Fault right after Disarm = false, want true")
	}
	s.disarmed = time.Now().Add(-2 * time.Second)
	if s.Fault([]uint64{b.gpa}) {
		t.Errorf("Fault with the sampler idle = true, want false (a real fault)")
	}

	// An unidentifiable fault while armed restores everything and voids the window.
	if err := s.Arm([]SampleSpec{{Region: 0}, {Region: 3}}); err != nil {
		t.Fatal(err)
	}
	if !s.Fault([]uint64{7 * RegionSize}) {
		t.Errorf("unidentified Fault while armed = false, want true")
	}
	for _, b := range s.blocks {
		if b.protected != 0 {
			t.Errorf("block %+v still protected after an unresolved fault", b)
		}
	}
	if c, err := s.Disarm(); err != nil || c != nil {
		t.Errorf("Disarm after a voided window = %v, %v; want nil, nil", c, err)
	}
	if !bytes.Equal(m.Backing()[2*RegionSize:], pat[2*RegionSize:]) || s.Stats().Unresolved != 1 {
		t.Errorf("after a voided window: data intact %v, unresolved %d", bytes.Equal(m.Backing()[2*RegionSize:], pat[2*RegionSize:]), s.Stats().Unresolved)
	}
}

func TestSamplerArmBadRegion(t *testing.T) {
	m, s, _ := newSampled(t, 4)
	err := s.Arm([]SampleSpec{{Region: 0}, {Region: 99}})
	if err == nil || !strings.Contains(err.Error(), "region 99") {
		t.Fatalf("Arm with a region outside RAM = %v", err)
	}
	// The region armed before the bad one was restored.
	if err := m.Write(0, make([]byte, RegionSize)); err != nil {
		t.Fatal(err)
	}
	if err := s.Arm([]SampleSpec{{Region: 1}}); err != nil {
		t.Errorf("Arm after a failed Arm = %v", err)
	}
}

// TestSamplerOffsetsVary: block offsets are random per window and stay
// inside the region.
func TestSamplerOffsetsVary(t *testing.T) {
	_, s, _ := newSampled(t, 16)
	seen := map[uint64]bool{}
	for w := 0; w < 20; w++ {
		if err := s.Arm([]SampleSpec{{Region: 2}}); err != nil {
			t.Fatal(err)
		}
		b := s.blocks[0]
		if b.gpa < 2*RegionSize || b.gpa+16*PageSize > 3*RegionSize || b.gpa%PageSize != 0 {
			t.Fatalf("block at %#x outside region 2", b.gpa)
		}
		seen[b.gpa] = true
		if _, err := s.Disarm(); err != nil {
			t.Fatal(err)
		}
	}
	if len(seen) < 10 {
		t.Errorf("%d distinct offsets in 20 windows, want them to vary", len(seen))
	}
}
