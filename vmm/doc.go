// Package vmm is the machine: it builds a VM from arch (KVM) and mmu (guest
// memory), runs one goroutine per vCPU locked to its OS thread, handles every
// KVM exit, pauses and resumes all vCPUs on demand, and boots its guest. The
// binary is vmm/cmd/understudy.
//
// A machine's life cycle:
//
//	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 1, Console: os.Stdout,
//		Payload: &vmm.PayloadConfig{Name: "hello"}})
//	res, err := m.Run(ctx)   // until the guest exits, fails or ctx ends
//	m.Close()
//
// Config holds what every machine has (memory, vCPUs, console, ...) and its
// guest: a payload (PayloadConfig: a small long-mode program from
// vmm/payload, booted by boot_payload.go) or a Linux kernel (LinuxConfig:
// a bzImage booted through the 64-bit boot protocol by boot_linux.go, with
// a UART, an i8042 for reset, ACPI power-off and virtio-mmio devices).
//
// The parts live in their own rooms:
//
//	config.go       Config and its checks
//	machine.go      New, Run, Close, the vCPU loop
//	pause.go        Pause, Resume, OnVCPU: how vCPUs park
//	park_unsafe.go  the futex words parked vCPUs sleep on
//	exits.go        KVM exits; iobus.go, mmiobus.go the port and MMIO buses
//	halt.go         detection of a Linux guest halted for good
//	boot_*.go       the two boot loaders
//	state*.go       MachineState: capture, restore, binary encoding
//	snapshot.go     a state and a memory image in one stream
//	vmm/devices     the legacy port devices, each with its saved state
//	vmm/virtio      virtio-mmio devices
//	vmm/largepage   the large-page controller, a client of this package
//	vmm/option      the option parsers the binary and ft share
//
// While Run is going, Pause stops every vCPU (returning how long that took),
// OnVCPU runs a function on a paused vCPU's own thread, and Resume lets
// them go again. A parked vCPU sleeps on a futex word, so waking it goes
// straight through the kernel. Package ft builds checkpoints on these, as
// vmm/largepage samples on them; neither reaches into the machine otherwise.
//
// A paused machine's complete state, memory aside, is a MachineState
// (CaptureState). With CaptureOnPause each vCPU reads its own state on its
// own thread as soon as it has stopped, while the pauser goes on copying
// memory. The state has a strict, versioned binary encoding (MarshalBinary,
// UnmarshalBinary; each device's part is encoded in vmm/devices), and
// Restore builds a new machine from it and a memory image that continues
// exactly where the captured one stopped. WriteSnapshot and RestoreSnapshot
// put both into one stream.
//
// A Linux machine's virtio devices are part of its state: every pause
// quiesces each virtio-mmio transport as soon as the vCPUs have parked
// (pending block requests complete, their guest-memory writes land in the
// VMM's dirty bitmap before the pauser harvests it, and no device writes
// guest memory until Resume, which kicks every queue). CaptureState adds
// each transport's SaveState bytes as a virtio section, in device order;
// SaveSnapshot first flushes the disks (FlushDisks). Restore opens the
// devices again from RestoreConfig.Disks and Nets (the MAC is the state's),
// loads each transport's state (a disk of another size or content is
// refused), restores vCPUs and interrupt controllers, resumes the
// transports and announces each NIC (RARP, 5 rounds from 50 ms apart,
// until the machine stops).
//
// vmm imports vmm/devices, vmm/virtio, vmm/payload and vmm/option; none of
// them imports vmm.
package vmm
