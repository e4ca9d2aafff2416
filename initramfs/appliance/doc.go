// Package appliance is the appliance image's uinit, as a library: u-root's
// init runs `understudy appliance` once the kernel is up, and that thin
// command (vmm/cmd/understudy) maps its flags to Options and calls Run.
// This is u-root's own split, a thin init command over pkg/libinit.
//
// Run reads the role and its options from the kernel command line
// (understudy.role=..., understudy.OPT=..., see Help), loads the image's
// kernel modules in dependency order, creates the tap devices asked for,
// reports on the console what it found (role, options, modules, whether
// KVM works), runs the role and reports how it ended, then powers the
// machine off. The roles run, intermediary and backup run `understudy
// ROLE ARGS`; the test role runs any command with a timeout, optionally
// with a test disk, a TCP probe and a line written to its stdin, which is
// how the QEMU tests (qemu-tests/) drive nested guests.
//
// understudy.failpoint=STAGE@EPOCH is a fault-injection knob for the QEMU
// tests, never for production: the role's command (run, intermediary or
// backup; the test role's exec and then commands, not its with command)
// gets UNDERSTUDY_FAILPOINT=STAGE@EPOCH in its environment, which arms one
// of package ft's failpoints (ft/failpoint.go: a primary killed or a
// checkpoint corrupted at an exact point of epoch EPOCH). The uinit checks
// only the syntax, STAGE a lowercase word of letters and '-' and EPOCH a
// positive integer; the stages are ft's.
//
// A node of a cluster gets its role, flags and keys from a config disk
// instead (nodeconfig.go: the format, its writer for `understudy
// node-config` and its reader; configdisk.go: finding it among the virtio
// disks and unpacking it into RunDir): secrets never ride the kernel
// command line, which is world-readable.
//
// Every line Run prints starts with Tag. The image's layout (the paths
// package initramfs writes and the uinit reads) is declared here, once.
//
// The kernel command line and the config disk are untrusted input:
// parseConfig validates every option and ReadNodeConfig every byte, and
// both are fuzzed (FuzzParseApplianceConfig, FuzzReadNodeConfig). The package is linked
// into the understudy binary, so it must not import package initramfs (the
// builder, with u-root's build-time dependencies); shared boot helpers
// (command line, modules, taps, power-off) come from initramfs/boot.
package appliance
