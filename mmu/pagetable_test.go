package mmu

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

const (
	user     = arch.PTEUser
	accessed = arch.PTEAccessed
	dirty    = arch.PTEDirty
	global   = arch.PTEGlobal
	pcd      = arch.PTEPCD
)

// identity writes arch.IdentityPageTables(spec) into m and returns the CR3
// and the table bytes.
func identity(t testing.TB, m *Memory, spec arch.IdentityMapSpec) (uint64, []byte) {
	t.Helper()
	tb, cr3, err := arch.IdentityPageTables(spec)
	if err != nil {
		t.Fatalf("IdentityPageTables(%+v) = %v", spec, err)
	}
	if err := m.Write(spec.TablesGPA, tb); err != nil {
		t.Fatalf("Write(%#x, %d bytes) = %v", spec.TablesGPA, len(tb), err)
	}
	takeDirty(t, m) // start with a clean VMM dirty bitmap
	return cr3, tb
}

// takeDirty returns the pages in m's VMM dirty bitmap and clears it.
func takeDirty(t testing.TB, m *Memory) []uint64 {
	t.Helper()
	bm := make([]uint64, (m.Size()/PageSize+63)/64)
	if _, err := m.TakeVMMDirty(bm); err != nil {
		t.Fatalf("TakeVMMDirty = %v", err)
	}
	return dirtyPages(bm)
}

// walkAll walks cr3 and returns every mapping visited.
func walkAll(t testing.TB, m *Memory, cr3 uint64, limit int) ([]Mapping, WalkStats) {
	t.Helper()
	var got []Mapping
	st, err := m.WalkPageTables(cr3, limit, func(mp Mapping) error {
		got = append(got, mp)
		return nil
	})
	if err != nil {
		t.Fatalf("WalkPageTables(%#x, %d) = %v", cr3, limit, err)
	}
	if st.Leaves != len(got) {
		t.Errorf("WalkPageTables(%#x, %d) = %+v with %d visits; want Leaves == visits", cr3, limit, st, len(got))
	}
	return got, st
}

// identityEntry returns the GPA of the entry that maps identity page va: the
// PDE of a 2 MiB region, or the PTE of a Small region's page.
func identityEntry(t testing.TB, m *Memory, tablesGPA, va uint64) uint64 {
	t.Helper()
	pde := tablesGPA + 2*PageSize + 8*(va/RegionSize)
	e, err := m.Uint64(pde)
	if err != nil {
		t.Fatalf("Uint64(%#x) = %v", pde, err)
	}
	if e&large != 0 {
		return pde
	}
	return e&arch.PTEAddrMask + 8*(va%RegionSize/PageSize)
}

// orEntry sets bits in the entry at gpa without marking it dirty (as the CPU
// would).
func orEntry(t testing.TB, m *Memory, gpa, bits uint64) {
	t.Helper()
	b, err := m.Slice(gpa, 8)
	if err != nil {
		t.Fatalf("Slice(%#x, 8) = %v", gpa, err)
	}
	binary.LittleEndian.PutUint64(b, binary.LittleEndian.Uint64(b)|bits)
}

func TestWalkPageTablesIdentity(t *testing.T) {
	tests := []struct {
		name string
		spec arch.IdentityMapSpec
	}{
		{"2 MiB pages", arch.IdentityMapSpec{TablesGPA: 14 * mib, MemSize: 16 * mib}},
		{"mixed, user", arch.IdentityMapSpec{TablesGPA: 14 * mib, MemSize: 16 * mib, User: true, Small: []uint64{1, 3, 7}}},
		{"4 KiB pages only", arch.IdentityMapSpec{TablesGPA: 6 * mib, MemSize: 8 * mib, Small: []uint64{0, 1, 2, 3}}},
		{"two PDs", arch.IdentityMapSpec{TablesGPA: 1 * gib, MemSize: 1*gib + 2*mib, Small: []uint64{511, 512}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := tt.spec
			m := newMemory(t, Config{Size: s.MemSize + 2*mib})
			cr3, _ := identity(t, m, s)
			small := map[uint64]bool{}
			for _, r := range s.Small {
				small[r] = true
			}
			got, st := walkAll(t, m, cr3, 0)

			regions := s.MemSize / RegionSize
			nPD := int((regions + 511) / 512)
			want := WalkStats{Tables: 2 + nPD + len(small), Leaves: int(regions) - len(small) + 512*len(small)}
			if st != want {
				t.Errorf("WalkPageTables(%#x, 0) = %+v, want %+v", cr3, st, want)
			}
			next := uint64(0)
			for _, mp := range got {
				r := mp.VA / RegionSize
				wantMp := Mapping{VA: next, GPA: next, Size: RegionSize, Flags: present | write | large, InRAM: true}
				if small[r] {
					wantMp.Size, wantMp.Flags = PageSize, present|write
				}
				if s.User {
					wantMp.Flags |= user
				}
				wantMp.Entry = identityEntry(t, m, s.TablesGPA, next)
				if mp != wantMp {
					t.Fatalf("WalkPageTables(%#x, 0) visited %+v, want %+v", cr3, mp, wantMp)
				}
				next += mp.Size
			}
			if next != s.MemSize {
				t.Errorf("WalkPageTables(%#x, 0) mapped [0, %#x), want [0, %#x)", cr3, next, s.MemSize)
			}

			ra, cst, err := m.CountAccessed([]uint64{cr3}, false)
			wantRA := RegionAccess{Accessed4K: map[uint64]int{}, LargeAccessed: map[uint64]bool{}, Mapped4K: map[uint64]int{}, MappedLarge: map[uint64]bool{}}
			for r := uint64(0); r < regions; r++ {
				if small[r] {
					wantRA.Mapped4K[r] = 512
				} else {
					wantRA.MappedLarge[r] = true
				}
			}
			if err != nil || cst != want || !reflect.DeepEqual(ra, wantRA) {
				t.Errorf("CountAccessed([%#x], false) = %+v, %+v, %v; want %+v, %+v, nil", cr3, ra, cst, err, wantRA, want)
			}
		})
	}
}

func TestCountAccessed(t *testing.T) {
	const tablesGPA = 14 * mib
	spec := arch.IdentityMapSpec{TablesGPA: tablesGPA, MemSize: 16 * mib, User: true, Small: []uint64{1, 3, 7}}
	mapped4K := map[uint64]int{1: 512, 3: 512, 7: 512}
	mappedLarge := map[uint64]bool{0: true, 2: true, 4: true, 5: true, 6: true}
	tests := []struct {
		name          string
		accessed      []uint64 // VAs whose leaf entry gets A
		dirtyOnly     []uint64 // VAs whose leaf entry gets D only
		accessed4K    map[uint64]int
		largeAccessed map[uint64]bool
	}{
		{name: "none", accessed4K: map[uint64]int{}, largeAccessed: map[uint64]bool{}},
		{
			name:          "one 4 KiB page",
			accessed:      []uint64{1*RegionSize + 5*PageSize},
			accessed4K:    map[uint64]int{1: 1},
			largeAccessed: map[uint64]bool{},
		},
		{
			name: "several per region",
			accessed: []uint64{
				1 * RegionSize, 1*RegionSize + 511*PageSize, 1*RegionSize + 100*PageSize,
				3*RegionSize + 7*PageSize, 3*RegionSize + 8*PageSize,
				7*RegionSize + 511*PageSize,
			},
			dirtyOnly:     []uint64{3*RegionSize + 9*PageSize},
			accessed4K:    map[uint64]int{1: 3, 3: 2, 7: 1},
			largeAccessed: map[uint64]bool{},
		},
		{
			name:          "2 MiB pages",
			accessed:      []uint64{0, 5 * RegionSize},
			dirtyOnly:     []uint64{6 * RegionSize},
			accessed4K:    map[uint64]int{},
			largeAccessed: map[uint64]bool{0: true, 5: true},
		},
		{
			name:          "mixed",
			accessed:      []uint64{2 * RegionSize, 7*RegionSize + 3*PageSize},
			accessed4K:    map[uint64]int{7: 1},
			largeAccessed: map[uint64]bool{2: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMemory(t, Config{Size: 16 * mib})
			cr3, pristine := identity(t, m, spec)
			var withD []byte // the tables as they should be after clearing
			for _, va := range tt.dirtyOnly {
				orEntry(t, m, identityEntry(t, m, tablesGPA, va), dirty)
			}
			withD = append(withD, m.Backing()[tablesGPA:tablesGPA+uint64(len(pristine))]...)
			wantDirty := map[uint64]bool{}
			for _, va := range tt.accessed {
				e := identityEntry(t, m, tablesGPA, va)
				orEntry(t, m, e, accessed|dirty)
				off := e - tablesGPA
				binary.LittleEndian.PutUint64(withD[off:], binary.LittleEndian.Uint64(withD[off:])|dirty)
				wantDirty[e/PageSize] = true
			}
			before := append([]byte(nil), m.Backing()[tablesGPA:tablesGPA+uint64(len(pristine))]...)
			wantRA := RegionAccess{Accessed4K: tt.accessed4K, LargeAccessed: tt.largeAccessed, Mapped4K: mapped4K, MappedLarge: mappedLarge}

			// Counting alone changes nothing.
			ra, _, err := m.CountAccessed([]uint64{cr3}, false)
			if err != nil || !reflect.DeepEqual(ra, wantRA) {
				t.Errorf("CountAccessed([%#x], false) = %+v, %v; want %+v, nil", cr3, ra, err, wantRA)
			}
			if !bytes.Equal(m.Backing()[tablesGPA:tablesGPA+uint64(len(before))], before) {
				t.Errorf("CountAccessed([%#x], false) changed the page tables", cr3)
			}
			if d := takeDirty(t, m); d != nil {
				t.Errorf("CountAccessed([%#x], false) dirtied pages %v, want none", cr3, d)
			}

			// Clearing counts the same, clears exactly the A bits counted
			// (D bits stay) and marks the written table pages dirty.
			ra, _, err = m.CountAccessed([]uint64{cr3}, true)
			if err != nil || !reflect.DeepEqual(ra, wantRA) {
				t.Errorf("CountAccessed([%#x], true) = %+v, %v; want %+v, nil", cr3, ra, err, wantRA)
			}
			if after := m.Backing()[tablesGPA : tablesGPA+uint64(len(withD))]; !bytes.Equal(after, withD) {
				t.Errorf("CountAccessed([%#x], true) left tables differing from the expected at %d bytes", cr3, countDiff(after, withD))
			}
			var want []uint64
			for p := uint64(0); p < 16*mib/PageSize; p++ {
				if wantDirty[p] {
					want = append(want, p)
				}
			}
			if d := takeDirty(t, m); !reflect.DeepEqual(d, want) {
				t.Errorf("CountAccessed([%#x], true) dirtied pages %v, want %v", cr3, d, want)
			}

			// The next period starts fresh.
			empty := RegionAccess{Accessed4K: map[uint64]int{}, LargeAccessed: map[uint64]bool{}, Mapped4K: mapped4K, MappedLarge: mappedLarge}
			ra, _, err = m.CountAccessed([]uint64{cr3}, true)
			if err != nil || !reflect.DeepEqual(ra, empty) {
				t.Errorf("second CountAccessed([%#x], true) = %+v, %v; want %+v, nil", cr3, ra, err, empty)
			}
			if d := takeDirty(t, m); d != nil {
				t.Errorf("second CountAccessed([%#x], true) dirtied pages %v, want none", cr3, d)
			}
		})
	}
}

// countDiff returns the number of differing bytes of two equal-length slices.
func countDiff(a, b []byte) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// TestWalkPageTablesHandBuilt covers entries IdentityPageTables does not
// produce: 1 GiB pages, the high half, NX/U/W combined over levels, reserved
// bits, PAT bits, shared tables and leaves outside RAM.
func TestWalkPageTablesHandBuilt(t *testing.T) {
	m := newMemory(t, Config{Size: 4 * mib})
	const pml4, pdpt, pd, pt, pdptHigh = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
	putEntries(t, m, map[uint64]uint64{
		pml4 + 8*0:   pdpt | present | write | user,
		pml4 + 8*1:   0x6000 | present | large, // PS is reserved in a PML4E
		pml4 + 8*2:   pdpt,                     // not present
		pml4 + 8*256: pdptHigh | present | write,
		pml4 + 8*511: pdptHigh | present, // shared with entry 256

		pdpt + 8*0: pd | present | write | user | nx,
		pdpt + 8*1: 1*gib | present | write | user | large | accessed | dirty | pat, // 1 GiB page beyond RAM
		pdpt + 8*2: 1*gib | present | large | 1<<13,                                 // reserved bit 13
		pdpt + 8*3: 1*gib | present | large | 1<<29,                                 // reserved bit 29
		pdpt + 8*4: 0 | present | large | accessed,                                  // 1 GiB page over all of RAM

		pd + 8*0: pt | present | write | user,
		pd + 8*1: 2*mib | present | user | large | accessed,
		pd + 8*2: 2*mib | present | large | 1<<20,                       // reserved bit 20
		pd + 8*3: 3*gib | present | large,                               // the MMIO hole
		pd + 8*4: 1<<40 | present,                                       // a PT beyond RAM
		pd + 8*5: 0x7ff0_0000_0020_0000 | present | large | pat | 1<<52, // ignored bits

		pt + 8*0: 0x7000 | present | write | user | accessed | dirty | global,
		pt + 8*1: 0x8000 | present | nx,
		pt + 8*5: 0xfee0_0000 | present | write | user | pcd, // the local APIC
		pt + 8*7: 0x9000 | present | write | user | large,    // PAT, not PS
		pt + 8*9: 0x3f_f000 | present | user | 0x7ff<<52,     // last page of RAM

		pdptHigh + 8*0:   1*gib | present | large | write,
		pdptHigh + 8*511: pd | present, // shared with pdpt entry 0
	})
	want := []Mapping{
		{VA: 0x0000, GPA: 0x7000, Size: PageSize, Flags: present | write | user | nx | accessed | dirty | global, Entry: pt, InRAM: true},
		{VA: 0x1000, GPA: 0x8000, Size: PageSize, Flags: present | nx, Entry: pt + 8, InRAM: true},
		{VA: 0x5000, GPA: 0xfee0_0000, Size: PageSize, Flags: present | write | user | nx | pcd, Entry: pt + 8*5},
		{VA: 0x7000, GPA: 0x9000, Size: PageSize, Flags: present | write | user | nx, Entry: pt + 8*7, InRAM: true},
		{VA: 0x9000, GPA: 0x3f_f000, Size: PageSize, Flags: present | user | nx, Entry: pt + 8*9, InRAM: true},
		{VA: 0x20_0000, GPA: 2 * mib, Size: RegionSize, Flags: present | user | nx | large | accessed, Entry: pd + 8, InRAM: true},
		{VA: 0x60_0000, GPA: 3 * gib, Size: RegionSize, Flags: present | nx | large, Entry: pd + 8*3},
		{VA: 0xa0_0000, GPA: 2 * mib, Size: RegionSize, Flags: present | nx | large, Entry: pd + 8*5, InRAM: true},
		{VA: 1 * gib, GPA: 1 * gib, Size: arch.HugePageSize, Flags: present | write | user | large | accessed | dirty, Entry: pdpt + 8},
		{VA: 4 * gib, GPA: 0, Size: arch.HugePageSize, Flags: present | large | accessed, Entry: pdpt + 8*4},
		{VA: 0xffff_8000_0000_0000, GPA: 1 * gib, Size: arch.HugePageSize, Flags: present | write | large, Entry: pdptHigh},
	}
	wantStats := WalkStats{Tables: 5, Leaves: len(want), NotRAM: 5, BadTables: 2, BadLeaves: 3, Shared: 2}
	got, st := walkAll(t, m, pml4, 0)
	if st != wantStats {
		t.Errorf("WalkPageTables(%#x, 0) = %+v, want %+v", pml4, st, wantStats)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("WalkPageTables(%#x, 0) visited\n%+v\nwant\n%+v", pml4, got, want)
	}
	for _, mp := range got {
		if gpa, err := m.Translate(pml4, mp.VA+0x123); err != nil || gpa != mp.GPA+0x123 {
			t.Errorf("Translate(%#x, %#x) = %#x, %v; want %#x, nil", pml4, mp.VA+0x123, gpa, err, mp.GPA+0x123)
		}
	}
	if st.Malformed() != 5 {
		t.Errorf("%+v.Malformed() = %d, want 5", st, st.Malformed())
	}

	// Counting: the 1 GiB page at 0 covers both RAM regions; the one at
	// 1 GiB and the MMIO mappings are not RAM and are neither counted nor
	// cleared.
	takeDirty(t, m)
	ra, cst, err := m.CountAccessed([]uint64{pml4}, true)
	wantRA := RegionAccess{
		Accessed4K:    map[uint64]int{0: 1},
		LargeAccessed: map[uint64]bool{0: true, 1: true},
		Mapped4K:      map[uint64]int{0: 3, 1: 1},
		MappedLarge:   map[uint64]bool{0: true, 1: true},
	}
	if err != nil || cst != wantStats || !reflect.DeepEqual(ra, wantRA) {
		t.Errorf("CountAccessed([%#x], true) = %+v, %+v, %v; want %+v, %+v, nil", pml4, ra, cst, err, wantRA, wantStats)
	}
	for _, c := range []struct{ entry, want uint64 }{
		{pt, 0x7000 | present | write | user | dirty | global},
		{pd + 8, 2*mib | present | user | large},
		{pdpt + 8*4, present | large},
		{pdpt + 8, 1*gib | present | write | user | large | accessed | dirty | pat}, // not RAM: kept
	} {
		if e, err := m.Uint64(c.entry); err != nil || e != c.want {
			t.Errorf("after CountAccessed: Uint64(%#x) = %#x, %v; want %#x, nil", c.entry, e, err, c.want)
		}
	}
	if d, want := takeDirty(t, m), []uint64{pdpt / PageSize, pd / PageSize, pt / PageSize}; !reflect.DeepEqual(d, want) {
		t.Errorf("CountAccessed([%#x], true) dirtied pages %v, want %v", pml4, d, want)
	}
}

// TestWalkPageTablesCanonical checks the sign extension of virtual addresses
// above bit 47.
func TestWalkPageTablesCanonical(t *testing.T) {
	tests := []struct {
		pml4Index, pdptIndex uint64
		want                 uint64
	}{
		{0, 0, 0},
		{1, 3, 0x0000_0080_c000_0000},
		{255, 511, 0x0000_7fff_c000_0000},
		{256, 0, 0xffff_8000_0000_0000},
		{300, 2, 0xffff_9600_8000_0000},
		{511, 511, 0xffff_ffff_c000_0000},
	}
	m := newMemory(t, Config{Size: 2 * mib})
	for _, tt := range tests {
		clear(m.Backing()[:3*PageSize])
		putEntries(t, m, map[uint64]uint64{
			0x1000 + 8*tt.pml4Index: 0x2000 | present,
			0x2000 + 8*tt.pdptIndex: 0 | present | large,
		})
		got, _ := walkAll(t, m, 0x1000, 0)
		if len(got) != 1 || got[0].VA != tt.want {
			t.Errorf("WalkPageTables with PML4[%d] PDPT[%d] = %+v, want one mapping at VA %#x", tt.pml4Index, tt.pdptIndex, got, tt.want)
		}
	}
}

// seq returns n values from start, step apart.
func seq(start, step uint64, n int) []uint64 {
	s := make([]uint64, n)
	for i := range s {
		s[i] = start + uint64(i)*step
	}
	return s
}

// TestWalkPageTablesLoops builds tables that refer to themselves or share
// subtrees: the walk terminates, expands each (table, level) once and counts.
func TestWalkPageTablesLoops(t *testing.T) {
	const pml4, a, b, c = 0x1000, 0x2000, 0x3000, 0x4000
	all := func(table, e uint64) map[uint64]uint64 {
		es := map[uint64]uint64{}
		for i := uint64(0); i < 512; i++ {
			es[table+8*i] = e
		}
		return es
	}
	merge := func(ms ...map[uint64]uint64) map[uint64]uint64 {
		out := map[uint64]uint64{}
		for _, m := range ms {
			for k, v := range m {
				out[k] = v
			}
		}
		return out
	}
	tests := []struct {
		name    string
		entries map[uint64]uint64
		want    WalkStats
		vas     []uint64 // the VAs visited
	}{
		{
			name: "empty PML4",
			want: WalkStats{Tables: 1},
		},
		{
			name: "PML4 entry at the PML4",
			entries: map[uint64]uint64{
				pml4 + 8*0: pml4 | present,
				pml4 + 8*1: a | present,
				a + 8*0:    0 | present | large,
			},
			want: WalkStats{Tables: 2, Leaves: 1, NotRAM: 1, Loops: 1},
			vas:  []uint64{512 * gib},
		},
		{
			name: "PD entry at the PD",
			entries: map[uint64]uint64{
				pml4:  a | present,
				a:     b | present,
				b:     b | present | write,
				b + 8: 2*mib | present | large,
			},
			want: WalkStats{Tables: 3, Leaves: 1, Loops: 1},
			vas:  []uint64{2 * mib},
		},
		{
			name: "PD entry at the PML4",
			entries: map[uint64]uint64{
				pml4:  a | present,
				a:     b | present,
				b + 8: pml4 | present,
			},
			want: WalkStats{Tables: 3, Loops: 1},
		},
		{
			name: "PDPT entry at the PML4, PT entry at the PML4",
			entries: map[uint64]uint64{
				pml4:  a | present,
				a:     pml4 | present,
				a + 8: b | present,
				b:     c | present,
				c:     pml4 | present, // a leaf: maps the PML4 page, no loop
			},
			want: WalkStats{Tables: 4, Leaves: 1, Loops: 1},
			vas:  []uint64{1 * gib},
		},
		{
			name:    "a cycle through every entry",
			entries: merge(all(pml4, a|present), all(a, b|present), all(b, pml4|present)),
			want:    WalkStats{Tables: 3, Loops: 512, Shared: 2 * 511},
		},
		{
			name:    "every entry shares one table",
			entries: merge(all(pml4, a|present), all(a, b|present), all(b, c|present), all(c, 0x5000|present)),
			want:    WalkStats{Tables: 4, Leaves: 512, Shared: 3 * 511},
			vas:     seq(0, PageSize, 512),
		},
		{
			name: "one table at two levels",
			entries: map[uint64]uint64{
				pml4:     a | present,
				pml4 + 8: b | present, // b as a PDPT
				a:        b | present, // b as a PD
				b:        2*mib | present | large,
			},
			// As a PD entry, b's entry 0 maps 2 MiB at 2 MiB; as a PDPT
			// entry it is a 1 GiB page with reserved bit 21.
			want: WalkStats{Tables: 4, Leaves: 1, BadLeaves: 1},
			vas:  []uint64{0},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMemory(t, Config{Size: 4 * mib})
			putEntries(t, m, tt.entries)
			got, st := walkAll(t, m, pml4, 0)
			if st != tt.want {
				t.Errorf("WalkPageTables(%#x, 0) = %+v, want %+v", pml4, st, tt.want)
			}
			var vas []uint64
			for _, mp := range got {
				vas = append(vas, mp.VA)
			}
			if !reflect.DeepEqual(vas, tt.vas) {
				t.Errorf("WalkPageTables(%#x, 0) visited VAs %#x, want %#x", pml4, vas, tt.vas)
			}
			// CountAccessed walks the same way.
			if _, cst, err := m.CountAccessed([]uint64{pml4}, false); err != nil || cst != tt.want {
				t.Errorf("CountAccessed([%#x], false) = %+v, %v; want %+v, nil", pml4, cst, err, tt.want)
			}
		})
	}
}

// TestWalkPageTablesRAM places tables and leaves around the MMIO hole and the
// end of RAM of a 4 GiB guest (RAM at [0, 3 GiB) and [4 GiB, 5 GiB)).
func TestWalkPageTablesRAM(t *testing.T) {
	m := newMemory(t, Config{Size: 4 * gib})
	const (
		pml4 = 4 * gib
		pdpt = 4*gib + 0x1000
		pd   = 4*gib + 0x2000
		pt   = 4*gib + 0x3000
		last = 5*gib - PageSize // the last page of RAM
	)
	putEntries(t, m, map[uint64]uint64{
		pml4 + 8*0: 3*gib | present,              // a PDPT in the MMIO hole
		pml4 + 8*1: 5*gib | present,              // just past the end of RAM
		pml4 + 8*2: 0xf_ffff_ffff_f000 | present, // the highest address
		pml4 + 8*3: pdpt | present,
		pml4 + 8*4: last | present, // a zero table at the last page
		pdpt + 8*0: pd | present,
		pdpt + 8*1: 2*gib | present | large, // [2, 3) GiB: RAM
		pdpt + 8*2: 3*gib | present | large, // the hole
		pdpt + 8*3: 4*gib | present | large, // [4, 5) GiB: RAM
		pdpt + 8*4: 5*gib | present | large, // beyond
		pdpt + 8*5: 3*gib - 2*mib | present, // a PD in the last RAM page below the hole: zero
		pdpt + 8*6: 3*gib + 4*mib | present, // a PD in the hole
		pd + 8*0:   pt | present,
		pd + 8*1:   3*gib - 2*mib | present | large, // RAM
		pd + 8*2:   3*gib | present | large,         // the hole
		pd + 8*3:   5*gib - 2*mib | present | large, // RAM
		pd + 8*4:   5*gib | present | large,         // beyond
		pd + 8*5:   3*gib + 0x1000 | present,        // a PT in the hole
		pt + 8*0:   3*gib - PageSize | present,      // RAM
		pt + 8*1:   3*gib | present,                 // the hole
		pt + 8*2:   last | present,                  // RAM
		pt + 8*3:   5*gib | present,                 // beyond
	})
	got, st := walkAll(t, m, pml4, 0)
	wantStats := WalkStats{Tables: 6, Leaves: 12, NotRAM: 6, BadTables: 5}
	if st != wantStats {
		t.Errorf("WalkPageTables(%#x, 0) = %+v, want %+v", pml4, st, wantStats)
	}
	inRAM := map[uint64]bool{}
	for _, mp := range got {
		inRAM[mp.GPA] = mp.InRAM
	}
	for gpa, want := range map[uint64]bool{
		3*gib - PageSize: true, 3 * gib: false, last: true, 5 * gib: false,
		3*gib - 2*mib: true, 5*gib - 2*mib: true, 2 * gib: true, 4 * gib: true,
	} {
		if got, ok := inRAM[gpa]; !ok || got != want {
			t.Errorf("WalkPageTables(%#x, 0): mapping of GPA %#x visited %v with InRAM %v, want InRAM %v", pml4, gpa, ok, got, want)
		}
	}

	// CR3 values: flag bits are ignored, tables outside RAM are counted.
	for _, tt := range []struct {
		cr3  uint64
		want WalkStats
	}{
		{pml4 | 0x18 | 1<<63, wantStats},
		{last, WalkStats{Tables: 1}},
		{3 * gib, WalkStats{BadTables: 1}},
		{5 * gib, WalkStats{BadTables: 1}},
		{1 << 51, WalkStats{BadTables: 1}},
	} {
		if st, err := m.WalkPageTables(tt.cr3, 0, nil); err != nil || st != tt.want {
			t.Errorf("WalkPageTables(%#x, 0, nil) = %+v, %v; want %+v, nil", tt.cr3, st, err, tt.want)
		}
	}

	// Counting: the 1 GiB pages give their 512 regions each.
	ra, _, err := m.CountAccessed([]uint64{pml4}, false)
	if err != nil {
		t.Fatalf("CountAccessed([%#x], false) = %v", pml4, err)
	}
	if n := len(ra.MappedLarge); n != 2*512 || !ra.MappedLarge[2*gib/RegionSize] || !ra.MappedLarge[5*gib/RegionSize-1] || ra.MappedLarge[3*gib/RegionSize] {
		t.Errorf("CountAccessed([%#x], false).MappedLarge has %d regions, want the 1024 of [2, 3) and [4, 5) GiB", pml4, n)
	}
	if want := map[uint64]int{3*gib/RegionSize - 1: 1, 5*gib/RegionSize - 1: 1}; !reflect.DeepEqual(ra.Mapped4K, want) {
		t.Errorf("CountAccessed([%#x], false).Mapped4K = %v, want %v", pml4, ra.Mapped4K, want)
	}
}

func TestWalkPageTablesVisitError(t *testing.T) {
	m := newMemory(t, Config{Size: 16 * mib})
	cr3, _ := identity(t, m, arch.IdentityMapSpec{TablesGPA: 14 * mib, MemSize: 16 * mib, Small: []uint64{1}})
	errStop := errors.New("stop")
	for _, n := range []int{1, 2, 300, 513, 519} {
		calls := 0
		st, err := m.WalkPageTables(cr3, 0, func(Mapping) error {
			calls++
			if calls == n {
				return errStop
			}
			return nil
		})
		if err != errStop || st.Leaves != n || calls != n {
			t.Errorf("WalkPageTables(%#x, 0) stopping at visit %d = %+v after %d calls, %v; want Leaves %d, %v", cr3, n, st, calls, err, n, errStop)
		}
	}
	// Every visit seen: nil.
	if st, err := m.WalkPageTables(cr3, 0, func(Mapping) error { return nil }); err != nil || st.Leaves != 519 {
		t.Errorf("WalkPageTables(%#x, 0) = %+v, %v; want 519 leaves, nil", cr3, st, err)
	}
}

func TestWalkPageTablesLimit(t *testing.T) {
	m := newMemory(t, Config{Size: 16 * mib})
	// Tables: PML4, PDPT, PD, then the PTs of regions 1, 3 and 7.
	cr3, _ := identity(t, m, arch.IdentityMapSpec{TablesGPA: 14 * mib, MemSize: 16 * mib, Small: []uint64{1, 3, 7}})
	tests := []struct {
		limit int
		want  WalkStats
	}{
		{1, WalkStats{Tables: 1, Truncated: true}},
		{2, WalkStats{Tables: 2, Truncated: true}},
		{3, WalkStats{Tables: 3, Leaves: 1, Truncated: true}},            // region 0, then region 1's PT
		{4, WalkStats{Tables: 4, Leaves: 1 + 512 + 1, Truncated: true}},  // up to region 3's PT
		{5, WalkStats{Tables: 5, Leaves: 2 + 1024 + 3, Truncated: true}}, // up to region 7's PT
		{6, WalkStats{Tables: 6, Leaves: 5 + 3*512}},
		{0, WalkStats{Tables: 6, Leaves: 5 + 3*512}},
		{-1, WalkStats{Tables: 6, Leaves: 5 + 3*512}},
	}
	for _, tt := range tests {
		if _, st := walkAll(t, m, cr3, tt.limit); st != tt.want {
			t.Errorf("WalkPageTables(%#x, %d) = %+v, want %+v", cr3, tt.limit, st, tt.want)
		}
	}
}

// TestWalkPageTablesDefaultLimit builds DefaultTableLimit+1 distinct tables:
// a PML4, 128 PDPTs and the (zero) PDs they point at.
func TestWalkPageTablesDefaultLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("reads 256 MiB of page tables; skipped with -short")
	}
	const (
		pdpts = DefaultTableLimit / 512
		pds   = DefaultTableLimit + 1 - 1 - pdpts
	)
	m := newMemory(t, Config{Size: 2*mib + DefaultTableLimit*PageSize})
	le := binary.LittleEndian
	b := m.Backing()
	for k := uint64(0); k < pds; k++ {
		i, j := k/512, k%512
		pdpt := 0x1000 + (1+i)*PageSize
		le.PutUint64(b[0x1000+8*i:], pdpt|present)
		le.PutUint64(b[pdpt+8*j:], 2*mib+k*PageSize|present)
	}
	for _, tt := range []struct {
		limit int
		want  WalkStats
	}{
		{0, WalkStats{Tables: DefaultTableLimit, Truncated: true}},
		{DefaultTableLimit + 1, WalkStats{Tables: DefaultTableLimit + 1}},
	} {
		if st, err := m.WalkPageTables(0x1000, tt.limit, nil); err != nil || st != tt.want {
			t.Errorf("WalkPageTables(0x1000, %d, nil) = %+v, %v; want %+v, nil", tt.limit, st, err, tt.want)
		}
	}
}

// TestCountAccessedAddressSpaces combines two address spaces that share their
// kernel half: shared entries count once, aliases in different tables count
// separately, and a repeated CR3 adds nothing.
func TestCountAccessedAddressSpaces(t *testing.T) {
	m := newMemory(t, Config{Size: 8 * mib})
	const (
		pml4A, pdptA, pdA, ptA = 0x1000, 0x2000, 0x3000, 0x4000
		pml4B, pdptB, pdB, ptB = 0x11000, 0x12000, 0x13000, 0x14000
		pdptK, pdK, ptK        = 0x21000, 0x22000, 0x23000
	)
	putEntries(t, m, map[uint64]uint64{
		pml4A: pdptA | present | user, pml4A + 8*256: pdptK | present,
		pml4B: pdptB | present | user, pml4B + 8*256: pdptK | present,
		pdptA: pdA | present, pdA: ptA | present,
		pdptB: pdB | present, pdB: ptB | present,
		pdptK: pdK | present, pdK: ptK | present, pdK + 8: 6*mib | present | large | accessed,
		// A: two accessed pages in region 2, one mapped only.
		ptA: 4*mib | present | accessed, ptA + 8: 4*mib + 0x1000 | present | accessed, ptA + 16: 4*mib + 0x2000 | present,
		// B: the same page as A's first, accessed through its own PTE.
		ptB: 4*mib | present | accessed,
		// Kernel: three accessed pages in region 1.
		ptK: 2*mib | present | accessed, ptK + 8: 3*mib | present | accessed, ptK + 16: 2*mib | present | accessed,
	})
	takeDirty(t, m)
	want := RegionAccess{
		Accessed4K:    map[uint64]int{1: 3, 2: 3},
		LargeAccessed: map[uint64]bool{3: true},
		Mapped4K:      map[uint64]int{1: 3, 2: 4},
		MappedLarge:   map[uint64]bool{3: true},
	}
	cr3s := []uint64{pml4A, pml4B, pml4A | 0x18}
	wantStats := WalkStats{Tables: 7 + 4, Leaves: 7 + 1, Shared: 2}
	ra, st, err := m.CountAccessed(cr3s, true)
	if err != nil || st != wantStats || !reflect.DeepEqual(ra, want) {
		t.Errorf("CountAccessed(%#x, true) = %+v, %+v, %v; want %+v, %+v, nil", cr3s, ra, st, err, want, wantStats)
	}
	if d, want := takeDirty(t, m), []uint64{ptA / PageSize, ptB / PageSize, pdK / PageSize, ptK / PageSize}; !reflect.DeepEqual(d, want) {
		t.Errorf("CountAccessed(%#x, true) dirtied pages %v, want %v", cr3s, d, want)
	}
	// Each address space alone sees the kernel half too.
	for _, cr3 := range []uint64{pml4A, pml4B} {
		ra, _, err := m.CountAccessed([]uint64{cr3}, false)
		if err != nil || len(ra.Accessed4K) != 0 || len(ra.LargeAccessed) != 0 || ra.Mapped4K[1] != 3 || !ra.MappedLarge[3] {
			t.Errorf("CountAccessed([%#x], false) after clearing = %+v, %v; want nothing accessed, region 1 mapped 3 times, region 3 large", cr3, ra, err)
		}
	}
	// No address spaces: empty maps.
	empty := RegionAccess{Accessed4K: map[uint64]int{}, LargeAccessed: map[uint64]bool{}, Mapped4K: map[uint64]int{}, MappedLarge: map[uint64]bool{}}
	if ra, st, err := m.CountAccessed(nil, true); err != nil || st != (WalkStats{}) || !reflect.DeepEqual(ra, empty) {
		t.Errorf("CountAccessed(nil, true) = %+v, %+v, %v; want %+v, {}, nil", ra, st, err, empty)
	}
}

// FuzzWalkPageTables walks arbitrary bytes as page tables (at GPA 0 of a
// 2 MiB memory, the rest zero) from an arbitrary CR3 with an arbitrary
// limit. It must not panic and must terminate; the stats must match the
// visits, every mapping must be well formed, and clearing the A bits must
// leave none to count and the structure unchanged.
func FuzzWalkPageTables(f *testing.F) {
	const area = 16 << 10
	m, err := New(Config{Size: 2 * mib})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })
	f.Add(pteBytes(present|accessed), uint64(0), uint16(0))                                               // page 0 at every level
	f.Add(pteBytes(0x1000|present, 0, 0, 0, 0, 0, 0, 0, 0, 0, present), uint64(0), uint16(0))             // loops and a PT
	f.Add(pteBytes(0x1000|present, 1*gib|present|large|accessed), uint64(0x1000), uint16(0))              // a 1 GiB page
	f.Add(pteBytes(0x1000|present, 2*mib|present|large|accessed|1<<13), uint64(0x1000), uint16(3))        // reserved bit
	f.Add(pteBytes(0x1000|present, 0x2000|present, 0x3000|present, 0x3000|present), uint64(0), uint16(0)) // shared
	f.Add(pteBytes(1<<40|present, 3*gib|present|large, ^uint64(0)), uint64(0x1000), uint16(1))            // beyond RAM
	f.Add(pteBytes(^uint64(0), ^uint64(0)&^large), uint64(0), uint16(2))                                  // every bit
	f.Add([]byte{}, uint64(1<<40), uint16(0))                                                             // CR3 beyond RAM
	zero := make([]byte, area)
	f.Fuzz(func(t *testing.T, tables []byte, cr3 uint64, limit uint16) {
		if len(tables) > area {
			tables = tables[:area]
		}
		copy(m.Backing(), zero)
		copy(m.Backing(), tables)
		lim := int(limit % 128) // 0: the default
		var got []Mapping
		st, err := m.WalkPageTables(cr3, lim, func(mp Mapping) error {
			got = append(got, mp)
			return nil
		})
		if err != nil || st.Leaves != len(got) {
			t.Fatalf("WalkPageTables(%#x, %d) = %+v, %v with %d visits; want Leaves == visits, nil", cr3, lim, st, err, len(got))
		}
		maxTables := 4 * int(2*mib/PageSize)
		if lim > 0 {
			maxTables = lim
		}
		if st.Tables > maxTables || st.Leaves > 512*st.Tables || st.Truncated && st.Tables != lim && lim > 0 {
			t.Fatalf("WalkPageTables(%#x, %d) = %+v: beyond the bounds", cr3, lim, st)
		}
		notRAM := 0
		for i, mp := range got {
			canonical := mp.VA < 1<<47 || mp.VA>>47 == 1<<17-1
			sizeOK := mp.Size == PageSize || mp.Size == RegionSize || mp.Size == arch.HugePageSize
			if !canonical || !sizeOK || mp.VA%mp.Size != 0 || mp.GPA%mp.Size != 0 || mp.GPA >= 1<<52 ||
				mp.Flags&present == 0 || (mp.Flags&large != 0) != (mp.Size > PageSize) || mp.Entry%8 != 0 ||
				(i > 0 && mp.VA <= got[i-1].VA) {
				t.Fatalf("WalkPageTables(%#x, %d) visited %+v (after %+v): malformed or out of order", cr3, lim, mp, got[max(i-1, 0)])
			}
			if !mp.InRAM {
				notRAM++
			}
			// The single-address walk agrees.
			if gpa, err := m.Translate(cr3, mp.VA+mp.Size-1); err != nil || gpa != mp.GPA+mp.Size-1 {
				t.Fatalf("Translate(%#x, %#x) = %#x, %v; WalkPageTables visited %+v", cr3, mp.VA+mp.Size-1, gpa, err, mp)
			}
		}
		if notRAM != st.NotRAM {
			t.Fatalf("WalkPageTables(%#x, %d) = %+v with %d mappings not in RAM", cr3, lim, st, notRAM)
		}
		if lim != 0 {
			return
		}
		// Clearing the A bits keeps the structure and leaves none set.
		ra, cst, err := m.CountAccessed([]uint64{cr3}, true)
		if err != nil || cst != st {
			t.Fatalf("CountAccessed([%#x], true) = %+v, %v; want %+v, nil", cr3, cst, err, st)
		}
		ra2, cst2, err := m.CountAccessed([]uint64{cr3}, true)
		if err != nil || cst2 != st || len(ra2.Accessed4K) != 0 || len(ra2.LargeAccessed) != 0 ||
			!reflect.DeepEqual(ra2.Mapped4K, ra.Mapped4K) || !reflect.DeepEqual(ra2.MappedLarge, ra.MappedLarge) {
			t.Fatalf("second CountAccessed([%#x], true) = %+v, %+v, %v; want %+v with nothing accessed, %+v", cr3, ra2, cst2, err, ra, st)
		}
	})
}

// BenchmarkCountAccessed counts a 1 GiB identity map made of 4 KiB pages
// only (512 L1 tables, 262144 PTEs, one in eight accessed).
func BenchmarkCountAccessed(b *testing.B) {
	const tablesGPA = 1 * gib
	m := newMemory(b, Config{Size: 1*gib + 4*mib})
	small := make([]uint64, 512)
	for i := range small {
		small[i] = uint64(i)
	}
	cr3, _ := identity(b, m, arch.IdentityMapSpec{TablesGPA: tablesGPA, MemSize: 1 * gib, Small: small})
	for va := uint64(0); va < 1*gib; va += 8 * PageSize {
		orEntry(b, m, identityEntry(b, m, tablesGPA, va), accessed)
	}
	var st WalkStats
	var ra RegionAccess
	b.ResetTimer()
	start := time.Now()
	for i := 0; i < b.N; i++ {
		var err error
		ra, st, err = m.CountAccessed([]uint64{cr3}, false)
		if err != nil {
			b.Fatal(err)
		}
	}
	el := time.Since(start)
	b.StopTimer()
	if st.Tables != 2+1+512 || st.Leaves != 512*512 || ra.Accessed4K[0] != 64 || len(ra.Mapped4K) != 512 {
		b.Fatalf("CountAccessed([%#x], false) = %d regions accessed, %+v; want 515 tables, 262144 leaves, 64 accessed per region", cr3, len(ra.Accessed4K), st)
	}
	fmt.Printf("bench ptwalk: tables=%d leaves=%d us_per_walk=%.1f\n", st.Tables, st.Leaves, float64(el.Nanoseconds())/1e3/float64(b.N))
}

func ExampleMemory_WalkPageTables() {
	m, err := New(Config{Size: 8 << 20})
	if err != nil {
		panic(err)
	}
	defer m.Close()
	spec := arch.IdentityMapSpec{TablesGPA: 6 << 20, MemSize: 8 << 20, Small: []uint64{2}}
	tables, cr3, err := arch.IdentityPageTables(spec)
	if err != nil {
		panic(err)
	}
	if err := m.Write(spec.TablesGPA, tables); err != nil {
		panic(err)
	}
	stats, err := m.WalkPageTables(cr3, 0, func(mp Mapping) error {
		if mp.Size > PageSize || mp.VA%RegionSize == 0 {
			fmt.Printf("VA %#x -> GPA %#x, %d KiB\n", mp.VA, mp.GPA, mp.Size>>10)
		}
		return nil
	})
	fmt.Printf("%d tables, %d mappings, %v\n", stats.Tables, stats.Leaves, err)
	// Output:
	// VA 0x0 -> GPA 0x0, 2048 KiB
	// VA 0x200000 -> GPA 0x200000, 2048 KiB
	// VA 0x400000 -> GPA 0x400000, 4 KiB
	// VA 0x600000 -> GPA 0x600000, 2048 KiB
	// 4 tables, 515 mappings, <nil>
}
