// Package mmu owns guest memory: its backing (anonymous or memfd, 2 MiB
// aligned), its layout in guest-physical address space, the KVM memory slots
// that expose it, bounds-checked access by guest-physical address (GPA), and a
// dirty bitmap of the pages the VMM itself writes (KVM's dirty log does not
// see those).
//
// It must not run vCPUs or know about devices; package vmm does that.
package mmu
