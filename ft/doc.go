// Package ft is Understudy's fault tolerance: it drives a machine's
// pause/harvest/resume cycle into epoch checkpoints, moves them between the
// primary, the intermediary and the backup, and restores a backup into a
// running guest. The wire format is in ft/wire and the links in ft/transport.
//
// The parts: Checkpointer takes checkpoints; Primary runs the epoch loop and
// holds output until it is acknowledged (output commit); Intermediary
// verifies, applies, acknowledges and forwards checkpoints and fails over;
// Backup commits whole epochs and activates the guest. The role runners,
// RunPrimary, RunIntermediary and RunBackup (run_*.go), are the processes
// built from them: each takes one config struct (PrimaryRunConfig,
// IntermediaryRunConfig, BackupRunConfig) and owns its links, its one accept
// loop (a peer of a role already served is refused with a reason and
// logged), reconnects, failover retries and activation, and reports through a
// *slog.Logger. The binary (vmm/cmd/understudy) only maps flags to these
// configs and speaks no wire protocol itself.
//
// A payload guest's output is its records; a Linux guest's is the frames
// it transmits and its console bytes (linux.go): both are held until
// acknowledged and carried in each checkpoint's envelope (envelope.go), so
// the activated backup sends them first.
//
// A Linux guest's disks are replicated with its memory (disk*.go): each
// checkpoint carries its epoch's disk writes and each full image the whole
// disks; the intermediary keeps a copy of the disks and forwards every
// epoch's writes; the backup keeps each disk in an ft/diskrep replica that
// commits with its image.
//
// It depends on vmm (the machine) and mmu (guest memory and its dirty log);
// neither of those may depend on ft.
package ft
