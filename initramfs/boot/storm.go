package boot

// The storm of process exits (guest.mode=storm of the nested guest's init)
// and the VMM's audit of its exit detector agree on a tag.

// LiveTag is what the first 16 bytes of the page at DefaultTagVA (or the
// guest.tag= address) hold in the address space of each long-lived process
// of the storm. The VMM's exit-detect audit (vmm/largepage, `--large-pages
// ...,exit-audit=VA`) reads the first 16 bytes at that guest-virtual address
// in each address space it decides is exiting: a process whose page says
// LiveTag there is a long-lived one that never exits during the storm, so
// such a decision is a false positive. Short-lived processes never map the
// page.
const LiveTag = "understudy-live\x00"

// DefaultTagVA is the guest-virtual address of the tagged page: page
// aligned, in the user half, below the lowest mmap base Linux picks on
// x86-64 (the stack top less at most 1 TiB of randomisation and the stack
// gap, so at 0x7eff... or above) and far above the Go runtime's heap
// (0xc000000000), so nothing else is mapped there.
const DefaultTagVA = 0x7e0000000000
