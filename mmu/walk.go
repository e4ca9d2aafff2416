package mmu

import (
	"fmt"

	"github.com/understudy-vmm/understudy/arch"
)

// Translate translates gva through 4-level page tables rooted at cr3, reading
// them from guest memory. It is used for error reports, so every malformed
// case returns an error rather than trusting the guest.
func (mem *Memory) Translate(cr3, gva uint64) (uint64, error) {
	table := cr3 & arch.PTEAddrMask
	for level := 4; level >= 1; level-- {
		shift := uint(12 + 9*(level-1))
		idx := (gva >> shift) & 0x1ff
		e, err := mem.Uint64(table + 8*idx)
		if err != nil {
			return 0, fmt.Errorf("level-%d page table at %#x: %w", level, table, err)
		}
		if e&arch.PTEPresent == 0 {
			return 0, fmt.Errorf("virtual address %#x is not mapped (level %d)", gva, level)
		}
		if (level == 2 || level == 3) && e&arch.PTELarge != 0 {
			mask := uint64(1)<<shift - 1
			return (e & arch.PTEAddrMask &^ mask) | (gva & mask), nil
		}
		table = e & arch.PTEAddrMask
	}
	return table | (gva & 0xfff), nil
}
