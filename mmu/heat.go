package mmu

import (
	"encoding/binary"
	"fmt"
	"math"
	"sort"
)

// Heat is what a prioritizer learned, carried to another host so that a
// prioritizer there starts from it instead of warming up again (a backup
// that activates after a failover: the checkpoints carry the primary's
// heat). It holds the regions' count values and which regions were mapped
// large.
type Heat struct {
	// Counts are the regions' count values (0..MaxHeatCount), in ascending
	// region order; regions absent count 0.
	Counts []RegionHeat
	// Large are the regions mapped large, in ascending order.
	Large []uint64
}

// Encoding (version 1; integers little-endian):
//
//	magic "USHEAT" | version u8 (1) | reserved u8 (0) | entries u32 |
//	entries × (region uvarint | count u16)
//
// The entries are the union of Counts and Large in strictly ascending region
// order; the first region is given whole, each next one as its (non-zero)
// distance from the previous one, each as a minimal uvarint. A count is its
// value in units of 1/32 page (0..MaxHeatCount*32, rounded), and bit 15
// marks a region mapped large. A guest of 1 GiB (512 regions) encodes in at
// most 3 KiB. Nothing may follow the last entry; DecodeHeat checks it all.
const (
	heatMagic   = "USHEAT"
	heatVersion = 1
	heatHeader  = len(heatMagic) + 2 + 4
	heatScale   = 32
	heatLarge   = 1 << 15
	// MaxHeatCount bounds a count value: a region has 512 pages of 4 KiB.
	MaxHeatCount = RegionSize / PageSize
	// MaxHeatRegions bounds the regions one Heat holds (128 GiB of guest
	// memory); Prioritizer.Heat keeps the hottest.
	MaxHeatRegions = 1 << 16
	// maxHeatRegion bounds a region number (a guest-physical address of
	// 52 bits).
	maxHeatRegion = 1 << (52 - 21)
)

// MaxHeatBytes bounds an encoded Heat.
const MaxHeatBytes = heatHeader + MaxHeatRegions*(5+2)

// heatQuant returns c in units of 1/32 page, clamped to 0..MaxHeatCount.
func heatQuant(c float64) uint16 {
	if !(c > 0) { // also NaN
		return 0
	}
	return uint16(math.Round(math.Min(c, MaxHeatCount) * heatScale))
}

// MarshalBinary encodes h. Counts are clamped to 0..MaxHeatCount and
// quantised to 1/32 page; a region listed twice, out of order, above the
// largest region number, or more than MaxHeatRegions regions is an error.
func (h Heat) MarshalBinary() ([]byte, error) {
	type entry struct {
		q     uint16
		large bool
	}
	es := map[uint64]*entry{}
	var order []uint64
	for i, c := range h.Counts {
		if i > 0 && c.Region <= h.Counts[i-1].Region {
			return nil, fmt.Errorf("heat: counts not in ascending region order at %d", c.Region)
		}
		es[c.Region] = &entry{q: heatQuant(c.Count)}
		order = append(order, c.Region)
	}
	for i, r := range h.Large {
		if i > 0 && r <= h.Large[i-1] {
			return nil, fmt.Errorf("heat: large regions not in ascending order at %d", r)
		}
		if e := es[r]; e != nil {
			e.large = true
			continue
		}
		es[r] = &entry{large: true}
		order = append(order, r)
	}
	if len(order) > MaxHeatRegions {
		return nil, fmt.Errorf("heat: %d regions, at most %d", len(order), MaxHeatRegions)
	}
	sort.Slice(order, func(i, j int) bool { return order[i] < order[j] })
	b := make([]byte, 0, heatHeader+len(order)*4)
	b = append(b, heatMagic...)
	b = append(b, heatVersion, 0)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(order)))
	prev := uint64(0)
	for i, r := range order {
		if r >= maxHeatRegion {
			return nil, fmt.Errorf("heat: region %d beyond guest-physical addresses", r)
		}
		d := r
		if i > 0 {
			d = r - prev
		}
		prev = r
		b = binary.AppendUvarint(b, d)
		v := es[r].q
		if es[r].large {
			v |= heatLarge
		}
		b = binary.LittleEndian.AppendUint16(b, v)
	}
	return b, nil
}

// DecodeHeat decodes and checks an encoded Heat (untrusted bytes: a
// checkpoint's). A decoded Heat re-encodes to exactly b.
func DecodeHeat(b []byte) (Heat, error) {
	var h Heat
	if len(b) < heatHeader || string(b[:len(heatMagic)]) != heatMagic {
		return h, fmt.Errorf("heat: bad magic")
	}
	if b[len(heatMagic)] != heatVersion || b[len(heatMagic)+1] != 0 {
		return h, fmt.Errorf("heat: version %d (reserved %d), want %d", b[len(heatMagic)], b[len(heatMagic)+1], heatVersion)
	}
	n := binary.LittleEndian.Uint32(b[len(heatMagic)+2:])
	b = b[heatHeader:]
	if n > MaxHeatRegions || uint64(n)*3 > uint64(len(b)) {
		return h, fmt.Errorf("heat: %d regions in %d bytes", n, len(b))
	}
	prev := uint64(0)
	for i := range int(n) {
		d, k := binary.Uvarint(b)
		if k <= 0 || k > 1 && b[k-1] == 0 {
			return h, fmt.Errorf("heat: entry %d: bad region", i)
		}
		b = b[k:]
		if i > 0 && d == 0 {
			return h, fmt.Errorf("heat: entry %d: region listed twice", i)
		}
		r := prev + d
		if d >= maxHeatRegion || r >= maxHeatRegion {
			return h, fmt.Errorf("heat: entry %d: region beyond guest-physical addresses", i)
		}
		prev = r
		if len(b) < 2 {
			return h, fmt.Errorf("heat: entry %d: ends before its count", i)
		}
		v := binary.LittleEndian.Uint16(b)
		b = b[2:]
		q := v &^ heatLarge
		if q > MaxHeatCount*heatScale {
			return h, fmt.Errorf("heat: entry %d: count %d/%d above %d pages", i, q, heatScale, MaxHeatCount)
		}
		h.Counts = append(h.Counts, RegionHeat{Region: r, Count: float64(q) / heatScale})
		if v&heatLarge != 0 {
			h.Large = append(h.Large, r)
		}
	}
	if len(b) != 0 {
		return h, fmt.Errorf("heat: %d bytes after the last entry", len(b))
	}
	return h, nil
}
