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
// Several nodes on one Ethernet segment (Segment, TestTwoNodesKV): the
// test makes a network namespace with a Linux bridge in it (ip netns add,
// ip link add br0 type bridge) and one persistent tap per node on the
// bridge; each node's QEMU runs in the namespace (Config.NetNS, through
// `ip netns exec`) with a virtio-net-pci NIC on its tap, its eth0. Nothing
// in the namespace reaches the host's network; deleting it at the end of
// the test removes bridge and taps. Inside each node the appliance makes
// a tap for the nested guest and a bridge br0 with eth0 and that tap as
// ports and the node's address (understudy.bridge=br0:eth0+tap0,A/N), so a
// nested guest is on the segment with its own IP and MAC, and a client on
// any node (kvload, bin/kvload in the image) reaches it directly. Nodes
// are 192.0.2.1N/24, the nested guest 192.0.2.2. This needs root, as
// network namespaces do; QEMU's socket/dgram/stream netdevs were the
// alternative (point to point, or multicast on loopback).
//
// A node's test role runs a sequence (understudy.exec, then each
// understudy.then once the one before exited 0), can signal its command
// once a console line shows a text (understudy.signal=USR1:TEXT), and has
// two tools besides understudy: /bin/kvload, the key-value client, and
// /bin/nodefile, which moves files (a snapshot, a disk image) from one
// node to another over the segment, SHA-256 checked at both ends.
// bootNodeMem gives a node more memory than nodeMemMiB when it must hold a
// large snapshot next to a running guest.
//
// The tests skip, saying to run `make image`, when there is no image, and
// fail instead when UNDERSTUDY_QEMU_REQUIRED=1 (as `make qemu-test` sets).
// A failed test keeps its console log under build/qemu-tests/ and names it.
package qemutests
