// Package mmu owns guest memory: its backing (anonymous or memfd, 2 MiB
// aligned), its layout in guest-physical address space, the KVM memory slots
// that expose it, bounds-checked access by guest-physical address (GPA), and a
// dirty bitmap of the pages the VMM itself writes (KVM's dirty log does not
// see those).
//
// It also owns the memory-management policy pieces that work on that memory:
// the guest page-table walker (pagetable.go, walk.go), the guest-physical
// access sampler (sampler.go), the large-page prioritizer (prioritizer.go) and
// the host huge-page operations (hugepage.go).
//
// It must not run vCPUs or know about devices; package vmm does that, and
// drives the sampler and prioritizer from a running machine.
package mmu
