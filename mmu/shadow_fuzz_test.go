package mmu

import (
	"encoding/binary"
	"reflect"
	"testing"
)

// fuzzEntry turns 7 fuzz bytes into a page-table entry that points into the
// fuzz tables (pages 0..15) most of the time, so the structure is rich:
// raw bits 0..11 are the flags, bits 12..15 the target page, bit 40 adds
// junk in the reserved bits of large entries, bit 41 points outside RAM,
// bit 48 sets NX.
func fuzzEntry(raw uint64) uint64 {
	e := raw&0xfff | (raw>>12&15)<<12
	if raw&(1<<40) != 0 {
		e |= (raw >> 16 & 0x1ff) << 13
	}
	if raw&(1<<41) != 0 {
		e |= 1 << 40
	}
	if raw&(1<<48) != 0 {
		e |= 1 << 63
	}
	return e
}

// FuzzShadowSet feeds arbitrary page-table contents and write sequences to
// a ShadowSet in every exit-detection mode (byte 0: mode, dirty bitmap or
// nil, SkipKernelHalf, LeavesFirst), then 10-byte records (table page,
// entry index, update flag, entry), with Updates fed the dirty bitmap or
// nil. It must never panic, the shadows must equal guest memory after every
// Update, and the shadow count must stay within the limit.
func FuzzShadowSet(f *testing.F) {
	rec := func(page, idx int, update bool, raw uint64) []byte {
		b := make([]byte, 10)
		b[0] = byte(page)
		binary.LittleEndian.PutUint16(b[1:], uint16(idx))
		if update {
			b[2] |= 0x80
		}
		var v [8]byte
		binary.LittleEndian.PutUint64(v[:], raw)
		copy(b[3:], v[:7])
		return b
	}
	const p, w, a, ps = 1, 2, 0x20, 0x80
	var seed []byte
	seed = append(seed, 0x05)
	seed = append(seed, rec(0, 0, false, 2<<12|p|w)...)
	seed = append(seed, rec(2, 0, false, 3<<12|p|w)...)
	seed = append(seed, rec(3, 0, false, 4<<12|p|w)...)
	seed = append(seed, rec(3, 1, false, 5<<12|p|w)...)
	for i := 0; i < 12; i++ {
		seed = append(seed, rec(4, i, true, 9<<12|p|w|a)...)
	}
	for i := 0; i < 12; i++ {
		seed = append(seed, rec(4, i, true, 0)...)
		seed = append(seed, rec(5, i, i%3 == 0, 0)...)
	}
	seed = append(seed, rec(3, 0, true, 0)...)
	seed = append(seed, rec(0, 0, true, 0)...)
	f.Add(seed)
	f.Add(append([]byte{0x03}, rec(0, 1, true, 0|p|w)...))            // self-map
	f.Add(append([]byte{0x02}, rec(3, 2, true, 1<<40|7<<12|p|ps)...)) // reserved bits
	m, err := New(Config{Size: 2 << 20})
	if err != nil {
		f.Fatalf("New = %v", err)
	}
	defer m.Close()
	bits := make([]uint64, m.BitmapWords())
	f.Fuzz(func(t *testing.T, data []byte) { fuzzShadowOnce(t, m, bits, data) })
}

func fuzzShadowOnce(t *testing.T, m *Memory, bits []uint64, data []byte) {
	{
		if len(data) == 0 || len(data) > 1+10*300 {
			return
		}
		clear(m.Backing()[:16*PageSize])
		clear(bits)
		m.TakeVMMDirty(bits)
		s := NewShadowSet(ShadowConfig{Detect: ExitDetect(data[0] & 3), PageLimit: 20, TableLimit: 12,
			SkipKernelHalf: data[0]&8 != 0, LeavesFirst: data[0]&16 != 0})
		update := func() {
			var d DirtySet
			if data[0]&4 != 0 {
				clear(bits)
				m.TakeVMMDirty(bits)
				d = DirtyBitmap{Layout: m.Regions(), Bits: bits}
			}
			s.Update(m, d)
			checkShadows(t, s, m)
			if st := s.Stats(); st.Pages > 20 || st.Pages < 0 {
				t.Fatalf("shadow pages %d, limit 20", st.Pages)
			}
		}
		recs := data[1:]
		// The first third of the records build the tables; then two
		// address spaces are tracked and the rest are guest writes.
		build := len(recs) / 10 / 3
		for n := 0; len(recs) >= 10; n++ {
			if n == build {
				for _, cr3 := range []uint64{0, PageSize} {
					if err := s.Track(m, cr3); err != nil {
						t.Fatalf("Track(%#x) = %v", cr3, err)
					}
				}
				checkShadows(t, s, m)
			}
			r := recs[:10]
			recs = recs[10:]
			gpa := uint64(r[0]&15)*PageSize + 8*uint64(binary.LittleEndian.Uint16(r[1:])&511)
			var v [8]byte
			copy(v[:], r[3:])
			if err := m.PutUint64(gpa, fuzzEntry(binary.LittleEndian.Uint64(v[:]))); err != nil {
				t.Fatalf("PutUint64(%#x) = %v", gpa, err)
			}
			if n >= build && r[2]&0x80 != 0 {
				update()
			}
		}
		update()
		data[0] &^= 4 // a final full diff
		update()

		// Counting from the shadows equals the walk where the set
		// followed every table, and clearing (byte 0 bit 5) keeps the
		// shadows equal to guest memory: no transitions follow.
		roots := []uint64{0, PageSize}
		want, _, werr := m.CountAccessed(roots, false)
		got, _, err := s.CountAccessed(m, roots, data[0]&32 != 0)
		if st := s.Stats(); err == nil && werr == nil && s.Detect() == ExitDetectNone && st.Loops == 0 && st.Truncated == 0 &&
			data[0]&8 == 0 && !reflect.DeepEqual(got, want) {
			t.Fatalf("ShadowSet.CountAccessed = %+v, want (Memory.CountAccessed) %+v", got, want)
		}
		checkShadows(t, s, m)
		if ts := s.Update(m, nil); len(ts) != 0 {
			t.Fatalf("Update after ShadowSet.CountAccessed = %+v, want no transitions", ts)
		}
	}
}
