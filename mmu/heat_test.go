package mmu

import (
	"bytes"
	"reflect"
	"strings"
	"testing"
)

func TestHeatRoundTrip(t *testing.T) {
	h := Heat{Counts: []RegionHeat{{1, 3.5}, {9, 512}, {200, 0.03125}, {1 << 20, 17.25}}, Large: []uint64{9, 300}}
	b, err := h.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeHeat(b)
	if err != nil {
		t.Fatal(err)
	}
	want := Heat{Counts: []RegionHeat{{1, 3.5}, {9, 512}, {200, 0.03125}, {300, 0}, {1 << 20, 17.25}}, Large: []uint64{9, 300}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DecodeHeat(Marshal(%+v)) = %+v, want %+v", h, got, want)
	}
	// Counts are clamped to a region's pages and quantised to 1/32 page.
	b2, _ := Heat{Counts: []RegionHeat{{4, 9000}, {5, -3}, {6, 1.0 / 100}}}.MarshalBinary()
	got2, err := DecodeHeat(b2)
	if err != nil || !reflect.DeepEqual(got2.Counts, []RegionHeat{{4, 512}, {5, 0}, {6, 0}}) {
		t.Errorf("clamped: %+v, %v", got2, err)
	}
	// A 1 GiB guest's heat (512 regions, all hot, 64 large) is a few KiB.
	var big Heat
	for r := uint64(0); r < 512; r++ {
		big.Counts = append(big.Counts, RegionHeat{r, float64(r%512) + 0.5})
		if r%8 == 0 {
			big.Large = append(big.Large, r)
		}
	}
	bb, err := big.MarshalBinary()
	if err != nil || len(bb) > 3<<10 {
		t.Errorf("512 regions: %d bytes, %v; want at most 3 KiB", len(bb), err)
	}
	for i := 0; i < len(b); i++ {
		if _, err := DecodeHeat(b[:i]); err == nil {
			t.Errorf("DecodeHeat(truncated to %d) succeeded", i)
		}
	}
	if _, err := DecodeHeat(append(bytes.Clone(b), 0)); err == nil {
		t.Errorf("DecodeHeat with a trailing byte succeeded")
	}
	bad := map[string][]byte{
		"magic":      append([]byte("USHEAX"), b[6:]...),
		"version":    append(append([]byte(heatMagic), 2, 0), b[8:]...),
		"twice":      append(bytes.Clone(b[:heatHeader-4]), 2, 0, 0, 0, 1, 1, 0, 0, 1, 0),
		"count":      append(bytes.Clone(b[:heatHeader-4]), 1, 0, 0, 0, 1, 0x01, 0x40),
		"nonminimal": append(bytes.Clone(b[:heatHeader-4]), 1, 0, 0, 0, 0x81, 0x00, 1, 0),
		"regions":    append(bytes.Clone(b[:heatHeader-4]), 0xff, 0xff, 0xff, 0xff),
		"beyond":     append(bytes.Clone(b[:heatHeader-4]), 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 0),
	}
	for name, c := range bad {
		if _, err := DecodeHeat(c); err == nil {
			t.Errorf("DecodeHeat(%s: %x) succeeded", name, c)
		}
	}
	for _, h := range []Heat{{Counts: []RegionHeat{{2, 1}, {1, 1}}}, {Large: []uint64{3, 3}}, {Counts: []RegionHeat{{maxHeatRegion, 1}}}} {
		if _, err := h.MarshalBinary(); err == nil || !strings.Contains(err.Error(), "heat:") {
			t.Errorf("Marshal(%+v) = %v, want an error", h, err)
		}
	}
}

func FuzzDecodeHeat(f *testing.F) {
	for _, h := range []Heat{{}, {Counts: []RegionHeat{{1, 3.5}, {9, 512}}, Large: []uint64{9, 300}}, {Large: []uint64{1 << 30}}} {
		b, err := h.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(heatMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHeat(b)
		if err != nil {
			return
		}
		if len(b) > MaxHeatBytes {
			t.Errorf("decoded %d bytes, more than MaxHeatBytes", len(b))
		}
		again, err := h.MarshalBinary()
		if err != nil || !bytes.Equal(again, b) {
			t.Errorf("DecodeHeat(%x) re-encodes to %x, %v", b, again, err)
		}
	})
}

// A seeded prioritizer is past its warm-up at once and promotes what the
// seed had large first, then the hottest others, within its budget.
func TestPrioritizerSeed(t *testing.T) {
	src, err := NewPrioritizer(PrioritizerConfig{Budget: 3, Warmup: 2})
	if err != nil {
		t.Fatal(err)
	}
	src.Observe(map[uint64]float64{1: 10, 2: 400, 3: 300, 4: 200, 5: 0}, nil)
	src.Observe(map[uint64]float64{1: 10, 2: 400, 3: 300, 4: 200}, nil)
	src.SetPromoted(1, true) // large on the source though no longer hottest
	h := src.Heat()
	if !reflect.DeepEqual(h.Large, []uint64{1}) || len(h.Counts) != 4 {
		t.Fatalf("Heat() = %+v", h)
	}
	b, err := h.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	h, err = DecodeHeat(b)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := NewPrioritizer(PrioritizerConfig{Budget: 3, Warmup: 10})
	if err != nil {
		t.Fatal(err)
	}
	if d := dst.Decide(nil); len(d.Promote) != 0 || dst.WarmedUp() {
		t.Fatalf("unseeded: %+v, warmed up %v", d, dst.WarmedUp())
	}
	dst.Seed(h, func(r uint64) bool { return r != 3 }) // 3 is no candidate here
	if !dst.WarmedUp() || !dst.Seeded() || dst.Windows() != 0 || dst.Count(2) != 300 || dst.Count(3) != 0 {
		t.Fatalf("seeded: warmed %v windows %d counts %v %v", dst.WarmedUp(), dst.Windows(), dst.Count(2), dst.Count(3))
	}
	d := dst.Decide(nil)
	if !reflect.DeepEqual(d.Promote, []uint64{1, 2, 4}) || len(d.Demote) != 0 {
		t.Fatalf("first decision after the seed = %+v, want promote [1 2 4]", d)
	}
	// Blocked regions are not promoted even if the seed had them large.
	dst2, _ := NewPrioritizer(PrioritizerConfig{Budget: 1})
	dst2.Seed(h, nil)
	if d := dst2.Decide(func(r uint64) bool { return r == 1 }); !reflect.DeepEqual(d.Promote, []uint64{2}) {
		t.Errorf("with the large region blocked: %+v, want promote [2]", d)
	}
}
