// Package largepage is a machine's large-page controller (seed idea 4): it
// samples which 2 MiB guest-physical regions the guest touches most (DAMON
// where the kernel has it, else mmu's refault sampler), ranks them with
// mmu's Prioritizer, and maps the hottest large (MADV_COLLAPSE) within a
// budget, with hysteresis; or it applies a fixed policy (random, all,
// none). Parse reads the --large-pages option, Start runs the controller on
// a machine, Status reports what it did. The files: config.go (policies,
// sources, Parse), largepage.go (Start, the policy loops, promotion),
// sample.go (the samplers' windows and the guest's page-table view),
// shadow.go (that view through shadow page tables, with exit-detect),
// status.go (Status and its one-line text).
//
// It is a client of the machine's public API, as ft's Checkpointer is:
// Pause, OnVCPU (to read each vCPU's CR3 for the guest's page tables) and
// Resume, Memory, VM (for KVM's pages_2m/pages_4k statistics),
// SetFaultHandler (the refault sampler) and DataRegions. It must not reach
// into the machine otherwise. While KVM dirty logging is on (fault
// tolerance) it samples nothing it would have to revoke and promotes
// nothing, since KVM maps 4 KiB pages then anyway; the pages the
// checkpoints found written count instead (Pager.CheckpointHeat).
//
// Heat (Pager.Heat, mmu.Heat) is what the controller learned: the regions'
// count values and its large regions. A protected primary's checkpoints
// carry it, and the controller of the guest a backup activates starts from
// it (Config.Heat): no warm-up, the same regions promoted in its first
// window.
package largepage
