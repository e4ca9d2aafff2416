// Package mmu owns guest memory: its backing (anonymous or memfd, 2 MiB
// aligned), its layout in guest-physical address space, the KVM memory slots
// that expose it, bounds-checked access by guest-physical address (GPA), and a
// dirty bitmap of the pages the VMM itself writes (KVM's dirty log does not
// see those).
//
// It also owns the memory-management policy pieces that work on that memory:
// the guest page-table walker (pagetable.go, walk.go), the shadow page tables
// and exit detection (shadow.go, exitdetect.go), the guest-physical
// access sampler (sampler.go), the large-page prioritizer (prioritizer.go) and
// the host huge-page operations (hugepage.go).
//
// # Shadow page tables and process-exit detection
//
// ShadowSet (shadow.go) keeps, per guest address space (keyed by CR3), a
// copy of every guest page table reachable from the CR3, and turns the
// guest's writes to them into PTE transitions (unmapped, mapped, remapped,
// flags changed). The trace on a table is the dirty log: at each Update the
// tables the dirty bitmap marks are read and diffed against their copies, so
// a sampling window costs work proportional to the tables written, not to
// the whole tree (BenchmarkShadowWalk). New subtables are copied when a
// pointer to them appears; subtables no longer referenced are freed.
//
// Tearing an address space down, Linux writes every one of its entries
// (exit_mmap: unmap_vmas clears the leaf PTEs in ascending VA order, then
// free_pgtables clears the PMD, PUD and PGD entries going up), and following
// that write by write is the cost the exit detector (exitdetect.go, seed
// idea 2) saves. Embodiment 1 watches the accessed minimum VA: when its leaf
// goes present→not-present the space is exiting and each later such
// transition drops its table's shadow and trace. Embodiment 2 counts
// consecutive present→not-present transitions per table; with two tables at
// four or more, the next one drops its table. A dropped root ends the
// address space.
//
// ShadowSet.CountAccessed (shadowcount.go) gives the large-page controller
// what Memory.CountAccessed gives it, read from the shadows after an Update
// instead of by walking guest memory: the same per-region counts, and with
// clear the same writes to guest PTEs. The VMM's own A-bit clears are
// applied to every shadow copy of the written table, so the next Update does
// not report them as transitions (the guest setting A again is a
// FlagsChanged). It differs from the walk in what the set does not follow:
// address spaces found exiting, dropped, truncated or loop tables (and the
// kernel half with SkipKernelHalf) are not counted; a table used at two
// levels of one address space, never part of a well-formed tree, is counted
// at the first only.
//
// KVM's shadow MMU has a cruder cousin: detect_write_flooding
// (arch/x86/kvm/mmu/mmu.c) zaps a shadow page after 3 trapped guest writes
// to it with no use of the page in between (a vCPU walk through it resets
// the count); last-level pages are exempt because KVM lets them go unsync
// instead of trapping their writes. It works per page on any write pattern,
// with no notion of an address space or of which writes unmap, and a wrong
// zap costs only a refault that rebuilds the page. Here a dropped trace is not rebuilt while
// the parent still points at the table, so a wrong drop loses transitions:
// embodiment 1 errs only when a live process unmaps its lowest accessed
// page; embodiment 2, like write flooding, also fires on a big munmap or
// MADV_DONTNEED in a live process (TestShadowMunmap, TestShadowDontneed).
//
// It must not run vCPUs or know about devices; package vmm does that, and
// drives the sampler and prioritizer from a running machine.
package mmu
