package arch

import (
	"encoding/binary"
	"fmt"
)

// x86-64 page-table entry bits.
const (
	PTEPresent  = 1 << 0
	PTEWrite    = 1 << 1
	PTEUser     = 1 << 2
	PTEPWT      = 1 << 3
	PTEPCD      = 1 << 4
	PTEAccessed = 1 << 5
	PTEDirty    = 1 << 6
	PTELarge    = 1 << 7 // PS: a 2 MiB (PD) or 1 GiB (PDPT) page
	PTEGlobal   = 1 << 8
	PTENX       = 1 << 63

	// PTEAddrMask selects the physical address bits 12..51 of an entry.
	PTEAddrMask = 0x000f_ffff_ffff_f000
)

// Page sizes.
const (
	PageSize      = 4 << 10
	LargePageSize = 2 << 20
	HugePageSize  = 1 << 30
)

// Control-register and EFER bits.
const (
	CR0PE = 1 << 0
	CR0MP = 1 << 1
	CR0EM = 1 << 2
	CR0TS = 1 << 3
	CR0ET = 1 << 4
	CR0NE = 1 << 5
	CR0WP = 1 << 16
	CR0AM = 1 << 18
	CR0PG = 1 << 31

	CR4PAE        = 1 << 5
	CR4PGE        = 1 << 7
	CR4OSFXSR     = 1 << 9
	CR4OSXMMEXCPT = 1 << 10
	CR4OSXSAVE    = 1 << 18

	EFERSCE = 1 << 0
	EFERLME = 1 << 8
	EFERLMA = 1 << 10
	EFERNXE = 1 << 11

	RFLAGSReserved = 1 << 1
	RFLAGSIF       = 1 << 9
	RFLAGSIOPL3    = 3 << 12
)

// IdentityMapSpec says how to build identity-mapped page tables.
type IdentityMapSpec struct {
	TablesGPA uint64 // where the tables will be placed (4 KiB aligned)
	MemSize   uint64 // bytes to map from GPA 0 (multiple of 2 MiB, at most 512 GiB)
	User      bool   // set the U/S bit so CPL3 code may use the mapping
	// Small lists 2 MiB region indices to map with 4 KiB pages instead of a
	// 2 MiB page (each costs one extra 4 KiB page table).
	Small []uint64
}

// IdentityPageTables builds 4-level page tables that map [0, MemSize) to
// itself with 2 MiB pages (4 KiB pages for the Small regions). It returns the
// table bytes, to be copied to TablesGPA, and the CR3 value.
func IdentityPageTables(s IdentityMapSpec) (tables []byte, cr3 uint64, err error) {
	if s.TablesGPA%PageSize != 0 {
		return nil, 0, fmt.Errorf("page tables at %#x: not 4 KiB aligned", s.TablesGPA)
	}
	if s.MemSize == 0 || s.MemSize%LargePageSize != 0 || s.MemSize > 512<<30 {
		return nil, 0, fmt.Errorf("identity map of %d bytes: want a non-zero multiple of 2 MiB up to 512 GiB", s.MemSize)
	}
	regions := s.MemSize / LargePageSize
	nPD := (regions + 511) / 512
	small := map[uint64]int{}
	for _, r := range s.Small {
		if r >= regions {
			return nil, 0, fmt.Errorf("4 KiB region %d beyond the %d mapped regions", r, regions)
		}
		if _, dup := small[r]; !dup {
			small[r] = len(small)
		}
	}
	pages := 2 + nPD + uint64(len(small))
	tables = make([]byte, pages*PageSize)
	flags := uint64(PTEPresent | PTEWrite)
	if s.User {
		flags |= PTEUser
	}
	le := binary.LittleEndian
	pml4, pdpt := s.TablesGPA, s.TablesGPA+PageSize
	le.PutUint64(tables[0:], pdpt|flags)
	for i := uint64(0); i < nPD; i++ {
		pd := s.TablesGPA + (2+i)*PageSize
		le.PutUint64(tables[PageSize+8*i:], pd|flags)
	}
	for r := uint64(0); r < regions; r++ {
		entry := (2*PageSize + 8*r)
		if k, ok := small[r]; ok {
			ptIdx := 2 + nPD + uint64(k)
			pt := s.TablesGPA + ptIdx*PageSize
			le.PutUint64(tables[entry:], pt|flags)
			for j := uint64(0); j < 512; j++ {
				le.PutUint64(tables[ptIdx*PageSize+8*j:], (r*LargePageSize+j*PageSize)|flags)
			}
			continue
		}
		le.PutUint64(tables[entry:], (r*LargePageSize)|flags|PTELarge)
	}
	return tables, pml4, nil
}
