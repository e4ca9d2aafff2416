// Package ft is Understudy's fault tolerance: it drives a machine's
// pause/harvest/resume cycle into epoch checkpoints, moves them between the
// primary, the intermediary and the backup, and restores a backup into a
// running guest. The wire format is in ft/wire and the links in ft/transport.
//
// It depends on vmm (the machine) and mmu (guest memory and its dirty log);
// neither of those may depend on ft.
package ft
