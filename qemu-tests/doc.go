// Package qemutests is the third test tier: it boots the appliance image
// (build/image, from `make image`) under qemu-system-x86_64 and checks, on
// the serial console, what happens inside: the uinit's report, nested Linux
// guests run by `understudy run --kernel`, their network and their disk.
//
// The harness (Machine, Start, Accel) starts QEMU with TCG and
// `-cpu qemu64,+svm,+npt` (so the appliance's kvm_amd loads and KVM works
// inside it), or with `-enable-kvm -cpu host` when the host offers nested
// hardware virtualization (/dev/kvm, vmx or svm in /proc/cpuinfo, and the
// kvm_intel or kvm_amd module's nested parameter Y or 1). It captures the
// console to a file and streams it line by line, waits for marker lines
// with timeouts, and kills QEMU when a run overstays. QEMU dies with the
// test process whatever ends it (Pdeathsig), and each test's QEMU is
// killed 30 s before go test's -timeout, so that a hung boot fails its
// test with the console log kept rather than ending in the -timeout panic.
//
// The tests skip, saying to run `make image`, when there is no image, and
// fail instead when UNDERSTUDY_QEMU_REQUIRED=1 (as `make qemu-test` sets).
// A failed test keeps its console log under build/qemu-tests/ and names it.
package qemutests
