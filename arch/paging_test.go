package arch

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
)

// tableEntry returns entry i of the 4 KiB table at gpa inside tables, which
// start at base.
func tableEntry(t *testing.T, tables []byte, base, gpa uint64, i uint64) uint64 {
	t.Helper()
	off := gpa - base + 8*i
	if gpa < base || off+8 > uint64(len(tables)) {
		t.Fatalf("table at %#x (entry %d) lies outside the %d bytes of tables at %#x", gpa, i, len(tables), base)
	}
	return binary.LittleEndian.Uint64(tables[off:])
}

// walkTables translates va through tables (placed at base) the way the CPU
// does, and returns the physical address and the page size.
func walkTables(t *testing.T, tables []byte, base, cr3, va uint64) (pa, size uint64, ok bool) {
	t.Helper()
	table := cr3 & PTEAddrMask
	for level := 4; level >= 1; level-- {
		shift := uint(12 + 9*(level-1))
		e := tableEntry(t, tables, base, table, (va>>shift)&0x1ff)
		if e&PTEPresent == 0 {
			return 0, 0, false
		}
		if level > 1 && e&PTELarge != 0 {
			size = 1 << shift
			return e&PTEAddrMask&^(size-1) | va&(size-1), size, true
		}
		table = e & PTEAddrMask
	}
	return table | va&0xfff, PageSize, true
}

func TestIdentityPageTables(t *testing.T) {
	tests := []struct {
		spec  IdentityMapSpec
		pages int // table pages
	}{
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 2 << 20}, 3},
		{IdentityMapSpec{TablesGPA: 0x9000, MemSize: 64 << 20, User: true}, 3},
		{IdentityMapSpec{TablesGPA: 0x20_0000, MemSize: 1 << 30, User: true}, 3},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 1<<30 + 2<<20}, 4},
		{IdentityMapSpec{TablesGPA: 0x10_0000, MemSize: 16 << 20, Small: []uint64{0, 5}}, 5},
		// Duplicates cost one table.
		{IdentityMapSpec{TablesGPA: 0x10_0000, MemSize: 16 << 20, User: true, Small: []uint64{7, 3, 7, 3}}, 5},
		// A small region in the second page directory.
		{IdentityMapSpec{TablesGPA: 0x4000_0000, MemSize: 2 << 30, Small: []uint64{511, 512, 1023}}, 7},
		// The largest map: 512 GiB, a full PDPT.
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 512 << 30, User: true}, 514},
	}
	for _, tt := range tests {
		s := tt.spec
		name := fmt.Sprintf("IdentityPageTables(%+v)", s)
		tables, cr3, err := IdentityPageTables(s)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if got := len(tables); got != tt.pages*PageSize {
			t.Errorf("%s = %d bytes of tables, want %d pages", name, got, tt.pages)
		}
		if cr3 != s.TablesGPA {
			t.Errorf("%s: cr3 = %#x, want %#x", name, cr3, s.TablesGPA)
		}
		flags := uint64(PTEPresent | PTEWrite)
		if s.User {
			flags |= PTEUser
		}
		// Every present entry carries exactly P|W (|U), plus PS in PDs.
		regions := s.MemSize / LargePageSize
		nPD := (regions + 511) / 512
		if got, want := tableEntry(t, tables, cr3, cr3, 0), (s.TablesGPA+PageSize)|flags; got != want {
			t.Errorf("%s: PML4[0] = %#x, want %#x", name, got, want)
		}
		for i := uint64(1); i < 512; i++ {
			if e := tableEntry(t, tables, cr3, cr3, i); e != 0 {
				t.Errorf("%s: PML4[%d] = %#x, want 0", name, i, e)
			}
		}
		pdpt := s.TablesGPA + PageSize
		for i := uint64(0); i < 512; i++ {
			want := uint64(0)
			if i < nPD {
				want = (s.TablesGPA + (2+i)*PageSize) | flags
			}
			if got := tableEntry(t, tables, cr3, pdpt, i); got != want {
				t.Errorf("%s: PDPT[%d] = %#x, want %#x", name, i, got, want)
			}
		}
		small := map[uint64]bool{}
		for _, r := range s.Small {
			small[r] = true
		}
		firstPT, end := s.TablesGPA+(2+nPD)*PageSize, s.TablesGPA+uint64(len(tables))
		usedPT := map[uint64]uint64{}
		for r := uint64(0); r < nPD*512; r++ {
			pd := s.TablesGPA + (2+r/512)*PageSize
			e := tableEntry(t, tables, cr3, pd, r%512)
			switch {
			case r >= regions:
				if e != 0 {
					t.Errorf("%s: PD entry for region %d = %#x beyond MemSize, want 0", name, r, e)
				}
			case small[r]:
				pt := e & PTEAddrMask
				if e&^PTEAddrMask != flags || pt < firstPT || pt >= end {
					t.Errorf("%s: PD entry for small region %d = %#x, want a page table in [%#x, %#x) with flags %#x", name, r, e, firstPT, end, flags)
					continue
				}
				if other, dup := usedPT[pt]; dup {
					t.Errorf("%s: small regions %d and %d share the page table at %#x", name, other, r, pt)
				}
				usedPT[pt] = r
				for j := uint64(0); j < 512; j++ {
					if got, want := tableEntry(t, tables, cr3, pt, j), (r*LargePageSize+j*PageSize)|flags; got != want {
						t.Fatalf("%s: PT[%d] of small region %d = %#x, want %#x", name, j, r, got, want)
					}
				}
			default:
				if want := r*LargePageSize | flags | PTELarge; e != want {
					t.Errorf("%s: PD entry for region %d = %#x, want %#x", name, r, e, want)
				}
			}
		}
		// Spot-check translations through a CPU-style walk, including the
		// first and last byte of every small region and of the map.
		vas := []uint64{0, 0xfff, 0x1000, 0x1f_ffff, s.MemSize - 1, s.MemSize / 2, s.MemSize - 0x1234}
		for _, r := range s.Small {
			vas = append(vas, r*LargePageSize, r*LargePageSize+0x5678, (r+1)*LargePageSize-1)
		}
		for _, va := range vas {
			wantSize := uint64(LargePageSize)
			if small[va/LargePageSize] {
				wantSize = PageSize
			}
			pa, size, ok := walkTables(t, tables, s.TablesGPA, cr3, va)
			if !ok || pa != va || size != wantSize {
				t.Errorf("%s: walk(%#x) = %#x, %d-byte page, %v; want %#x, %d, true", name, va, pa, size, ok, va, wantSize)
			}
		}
		if _, _, ok := walkTables(t, tables, s.TablesGPA, cr3, s.MemSize); ok {
			t.Errorf("%s: walk(%#x) (MemSize) is mapped, want not present", name, s.MemSize)
		}
	}
}

func TestIdentityPageTablesErrors(t *testing.T) {
	tests := []struct {
		spec IdentityMapSpec
		want string // part of the error
	}{
		{IdentityMapSpec{TablesGPA: 0x1001, MemSize: 2 << 20}, "not 4 KiB aligned"},
		{IdentityMapSpec{TablesGPA: 0x800, MemSize: 2 << 20}, "not 4 KiB aligned"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 0}, "multiple of 2 MiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 1 << 20}, "multiple of 2 MiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 3 << 20}, "multiple of 2 MiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 4<<20 + 4096}, "multiple of 2 MiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 512<<30 + 2<<20}, "up to 512 GiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 1 << 40}, "up to 512 GiB"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 4 << 20, Small: []uint64{2}}, "4 KiB region 2 beyond the 2 mapped regions"},
		{IdentityMapSpec{TablesGPA: 0x1000, MemSize: 4 << 20, Small: []uint64{0, 1 << 40}}, "beyond"},
	}
	for _, tt := range tests {
		tables, cr3, err := IdentityPageTables(tt.spec)
		if err == nil || !strings.Contains(err.Error(), tt.want) || tables != nil || cr3 != 0 {
			t.Errorf("IdentityPageTables(%+v) = %d bytes, %#x, %v; want nil, 0, error containing %q", tt.spec, len(tables), cr3, err, tt.want)
		}
	}
}
