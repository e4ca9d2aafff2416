// Package chaos holds Understudy's fault-injection tests: they run the
// primary, intermediary and backup as three real processes of the
// understudy binary on loopback, with the counter payload on /dev/kvm, and
// inject faults: SIGKILL of the primary at random times and at exact points
// of the epoch loop (mid-stun, mid-transfer, between transfer and
// acknowledgement; see ft/failpoint.go), loss of the intermediary, loss of
// the backup and its re-seed, a link cut that leaves sockets open, bad
// peers, and the loss of primary and intermediary together.
//
// After each injection the checks are those of "nothing lost" (DESIGN.md
// section 4): the client's sequence (the records the primary released) is
// gap-free; the activated guest's sequence number is at least the last one
// the client saw; the backup continues the sequence without a gap; and the
// activated image (saved by `backup --save-activated`) is consistent with
// one instant of the guest: the counter pages and the vCPU's registers
// agree.
//
// UNDERSTUDY_INJECTIONS sets the number of primary kills (default 200);
// `make soak` runs 1000 and prints `soak ft: injections=N violations=V`.
// Logs of a failed scenario are kept under build/chaos/.
package chaos
