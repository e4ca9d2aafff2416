package mmu

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
)

const (
	present = arch.PTEPresent
	write   = arch.PTEWrite
	large   = arch.PTELarge
	nx      = arch.PTENX
	pat     = 1 << 12 // PAT bit of a 2 MiB / 1 GiB entry
)

// putEntries writes page-table entries (GPA -> value) into m.
func putEntries(t *testing.T, m *Memory, entries map[uint64]uint64) {
	t.Helper()
	for gpa, e := range entries {
		if err := m.PutUint64(gpa, e); err != nil {
			t.Fatalf("PutUint64(%#x, %#x) = %v", gpa, e, err)
		}
	}
}

// translateCase is one Translate call and its expected outcome.
type translateCase struct {
	cr3, gva uint64
	want     uint64
	err      string // part of the error; "" for success
	oor      bool   // the error wraps ErrOutOfRange
}

func checkTranslate(t *testing.T, m *Memory, tests []translateCase) {
	t.Helper()
	for _, tt := range tests {
		got, err := m.Translate(tt.cr3, tt.gva)
		if tt.err == "" {
			if err != nil || got != tt.want {
				t.Errorf("Translate(%#x, %#x) = %#x, %v; want %#x, nil", tt.cr3, tt.gva, got, err, tt.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.err) || errors.Is(err, ErrOutOfRange) != tt.oor {
			t.Errorf("Translate(%#x, %#x) = %#x, %v; want an error containing %q (ErrOutOfRange: %v)", tt.cr3, tt.gva, got, err, tt.err, tt.oor)
		}
	}
}

func TestTranslateIdentity(t *testing.T) {
	const (
		memSize = 16 * mib
		tables  = 14 * mib
	)
	for _, user := range []bool{false, true} {
		m := newMemory(t, Config{Size: memSize})
		spec := arch.IdentityMapSpec{TablesGPA: tables, MemSize: memSize, User: user, Small: []uint64{1, 3, 7}}
		tb, cr3, err := arch.IdentityPageTables(spec)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Write(spec.TablesGPA, tb); err != nil {
			t.Fatal(err)
		}
		var tests []translateCase
		// Every 4 KiB page's first and last byte, plus a middle one.
		for va := uint64(0); va < memSize; va += PageSize {
			tests = append(tests, translateCase{cr3: cr3, gva: va, want: va}, translateCase{cr3: cr3, gva: va + 0xfff, want: va + 0xfff})
		}
		tests = append(tests,
			translateCase{cr3: cr3, gva: 0x20_1abc, want: 0x20_1abc},
			// Flag bits in CR3 (PWT, PCD, the PCID no-flush bit) are ignored.
			translateCase{cr3: cr3 | 0x18, gva: 0x71_2345, want: 0x71_2345},
			translateCase{cr3: cr3 | 1<<63 | 0xfff, gva: 0x30_0001, want: 0x30_0001},
			// Unmapped: beyond MemSize in the PD, past the first PD, past the
			// first PML4 entry, and the upper half.
			translateCase{cr3: cr3, gva: memSize, err: "not mapped (level 2)"},
			translateCase{cr3: cr3, gva: 1 * gib, err: "not mapped (level 3)"},
			translateCase{cr3: cr3, gva: 512 * gib, err: "not mapped (level 4)"},
			translateCase{cr3: cr3, gva: 0xffff_8000_0000_0000, err: "not mapped (level 4)"},
			// CR3 outside RAM.
			translateCase{cr3: memSize, gva: 0, err: "level-4 page table at 0x1000000", oor: true},
			translateCase{cr3: 1 << 40, gva: 0, err: "level-4", oor: true},
			// CR3 at a zeroed page.
			translateCase{cr3: 0x10_0000, gva: 0, err: "not mapped (level 4)"},
		)
		checkTranslate(t, m, tests)

		// Clearing one PTE of a 4 KiB region unmaps exactly that page.
		pt := binary.LittleEndian.Uint64(tb[2*PageSize+8*3:]) & arch.PTEAddrMask // PD entry of region 3
		if err := m.PutUint64(pt+8*5, 0); err != nil {
			t.Fatal(err)
		}
		checkTranslate(t, m, []translateCase{
			{cr3: cr3, gva: 3*RegionSize + 5*PageSize + 0x10, err: "not mapped (level 1)"},
			{cr3: cr3, gva: 3*RegionSize + 4*PageSize + 0x10, want: 3*RegionSize + 4*PageSize + 0x10},
			{cr3: cr3, gva: 3*RegionSize + 6*PageSize, want: 3*RegionSize + 6*PageSize},
		})
	}
}

// TestTranslateHandBuilt covers entry formats IdentityPageTables does not
// produce: 1 GiB pages, PAT and NX bits, high physical addresses, tables
// outside RAM.
func TestTranslateHandBuilt(t *testing.T) {
	m := newMemory(t, Config{Size: 2 * mib})
	const pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
	putEntries(t, m, map[uint64]uint64{
		pml4 + 8*0:   pdpt | present | write,
		pml4 + 8*1:   0x1f_f000 | present, // the last page of RAM, all zero
		pml4 + 8*2:   5 * gib,             // not present, even with an address
		pml4 + 8*511: 8*mib | present,     // a PDPT beyond RAM
		pdpt + 8*0:   pd | present | write,
		pdpt + 8*1:   1*gib | present | write | large,      // 1 GiB page at 1 GiB
		pdpt + 8*2:   4*gib | present | large | nx,         // NX is not an address bit
		pdpt + 8*3:   2*gib | present | large | pat,        // nor is PAT
		pdpt + 8*4:   0x10_0000_0000 | present,             // a PD beyond RAM
		pdpt + 8*5:   0xf_ffff_c000_0000 | present | large, // highest 1 GiB page
		pdpt + 8*6:   0x1234_5000 | large,                  // large but not present
		pd + 8*0:     pt | present | write,
		pd + 8*1:     2*mib | present | large | pat,             // 2 MiB page at 2 MiB
		pd + 8*2:     0xf_ffff_ffe0_0000 | present | large | nx, // highest 2 MiB page
		pd + 8*3:     0xbad000 | present,                        // a PT beyond RAM
		pd + 8*4:     0x7ff0_0000_0060_0000 | present | large,   // bits 52-62 are not address bits
		pt + 8*0:     0x7000 | present,
		pt + 8*1:     0xabcd_e000 | present | nx | 0x7ff<<52,      // bits 52-62 are ignored
		pt + 8*3:     0x9000 | present | large,                    // bit 7 of a PTE is PAT, not PS
		pt + 8*511:   0xf_ffff_ffff_f000 | present | arch.PTEUser, // highest 4 KiB page
	})
	checkTranslate(t, m, []translateCase{
		{cr3: pml4, gva: 0x0abc, want: 0x7abc},
		{cr3: pml4, gva: 0x1123, want: 0xabcd_e123},
		{cr3: pml4, gva: 0x2000, err: "not mapped (level 1)"},
		{cr3: pml4, gva: 0x3456, want: 0x9456},
		{cr3: pml4, gva: 0x1f_f00f, want: 0xf_ffff_ffff_f00f},
		{cr3: pml4, gva: 0x20_0123, want: 0x20_0123},
		{cr3: pml4, gva: 0x3f_ffff, want: 0x3f_ffff},
		{cr3: pml4, gva: 0x40_5678, want: 0xf_ffff_ffe0_5678},
		{cr3: pml4, gva: 0x60_0000, err: "level-1 page table at 0xbad000", oor: true},
		{cr3: pml4, gva: 0x80_0042, want: 0x60_0042},
		{cr3: pml4, gva: 0xa0_0000, err: "not mapped (level 2)"},
		{cr3: pml4, gva: 1*gib + 0x1234_5678, want: 1*gib + 0x1234_5678},
		{cr3: pml4, gva: 2*gib + 0x3fff_ffff, want: 4*gib + 0x3fff_ffff},
		{cr3: pml4, gva: 3*gib + 0x1000, want: 2*gib + 0x1000},
		{cr3: pml4, gva: 4 * gib, err: "level-2 page table at 0x1000000000", oor: true},
		{cr3: pml4, gva: 5*gib + 0xabc, want: 0xf_ffff_c000_0abc},
		{cr3: pml4, gva: 6 * gib, err: "not mapped (level 3)"},
		{cr3: pml4, gva: 7 * gib, err: "not mapped (level 3)"},
		{cr3: pml4, gva: 512 * gib, err: "not mapped (level 3)"},
		{cr3: pml4, gva: 1024 * gib, err: "not mapped (level 4)"},
		{cr3: pml4, gva: 0xffff_ff80_0000_0000, err: "level-3 page table at 0x800000", oor: true},
		// The error names the virtual address.
		{cr3: pml4, gva: 0x2010, err: "virtual address 0x2010 is not mapped"},
	})
}

// TestTranslateAboveHole walks tables that live in the RAM above 4 GiB.
func TestTranslateAboveHole(t *testing.T) {
	m := newMemory(t, Config{Size: 4 * gib})
	const base = 4 * gib
	putEntries(t, m, map[uint64]uint64{
		base + 0x0000 + 8*0: base + 0x1000 | present,
		base + 0x1000 + 8*0: base + 0x2000 | present,
		base + 0x1000 + 8*3: 3*gib | present, // a PD in the MMIO hole
		base + 0x2000 + 8*1: base + 0x3000 | present,
		base + 0x3000 + 8*2: 0x1234_5000 | present,
	})
	checkTranslate(t, m, []translateCase{
		{cr3: base, gva: 1*RegionSize + 2*PageSize + 0x67, want: 0x1234_5067},
		{cr3: base, gva: 3*gib + 0x1000, err: "level-2 page table at 0xc0000000", oor: true},
		{cr3: 3*gib + 0x1000, gva: 0, err: "level-4", oor: true},
	})
}

// FuzzTranslate walks arbitrary bytes as page tables: it must not panic, and
// a successful translation keeps the page offset and fits in 52 bits.
//
// The bytes land at GPA 0 of a 2 MiB memory. Seeds are small (entries that
// point back at page 0 reach every level in a few bytes), because the fuzzer
// minimizes each new input and large ones make that slow.
func FuzzTranslate(f *testing.F) {
	const area = 16 << 10
	m, err := New(Config{Size: 2 * mib})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { m.Close() })

	f.Add(pteBytes(present), uint64(0), uint64(0x123))                                        // 4 levels through page 0
	f.Add(pteBytes(present, 1*gib|present|large), uint64(0), uint64(1*gib+0x1234))            // 1 GiB page
	f.Add(pteBytes(present, 0, 0x60_0000|present|large|pat), uint64(0x18), uint64(0x40_0005)) // 2 MiB page
	f.Add(pteBytes(0x1000|present, 0, 0, 0x7000|present), uint64(0), uint64(0x3abc))          // page 1 is zero
	f.Add(pteBytes(0x10_0000_0000|present), uint64(0), uint64(0))                             // table beyond RAM
	f.Add(pteBytes(^uint64(0)), uint64(0), ^uint64(0))                                        // every bit set
	f.Add([]byte{}, uint64(0x1f_f000), uint64(0))                                             // zero page
	f.Add([]byte{1}, uint64(1<<40), uint64(0))                                                // CR3 beyond RAM

	zero := make([]byte, area)
	f.Fuzz(func(t *testing.T, tables []byte, cr3, gva uint64) {
		if len(tables) > area {
			tables = tables[:area]
		}
		copy(m.Backing(), zero)
		copy(m.Backing(), tables)
		got, err := m.Translate(cr3, gva)
		if err != nil {
			return
		}
		if got&0xfff != gva&0xfff || got >= 1<<52 {
			t.Fatalf("Translate(%#x, %#x) = %#x: page offset changed or beyond 52 bits", cr3, gva, got)
		}
	})
}

// pteBytes lays out page-table entries as little-endian bytes.
func pteBytes(es ...uint64) []byte {
	b := make([]byte, 8*len(es))
	for i, e := range es {
		binary.LittleEndian.PutUint64(b[8*i:], e)
	}
	return b
}
