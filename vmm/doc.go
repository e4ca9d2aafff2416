// Package vmm is the machine: it builds a VM from arch (KVM) and mmu (guest
// memory), runs one goroutine per vCPU locked to its OS thread, handles every
// KVM exit, pauses and resumes all vCPUs on demand, and owns the devices and
// boot loaders. The binary is vmm/cmd/understudy.
//
// A machine's life cycle:
//
//	m, err := vmm.New(vmm.Config{MemSize: 64 << 20, CPUs: 1, Payload: "hello", Console: os.Stdout})
//	res, err := m.Run(ctx)   // until the guest exits, fails or ctx ends
//	m.Close()
//
// A Linux guest instead of a payload: Config{Kernel: "bzImage", Initrd:
// "initrd.cpio", Cmdline: ..., Disks: ..., Nets: ...} boots a bzImage through
// the 64-bit boot protocol, with a UART, an i8042 for reset, ACPI power-off
// and virtio-mmio devices from package vmm/virtio (linux_boot.go).
//
// While Run is going, Pause stops every vCPU (returning how long that took),
// OnVCPU runs a function on a paused vCPU's own thread, and Resume lets
// them go again. Package ft builds checkpoints on these.
//
// A paused machine's complete state, memory aside, is a MachineState
// (CaptureState; every device keeps its saved state in a *_state.go file
// next to itself). It has a strict, versioned binary encoding
// (MarshalBinary, UnmarshalBinary), and Restore builds a new machine from it
// and a memory image that continues exactly where the captured one
// stopped. WriteSnapshot and RestoreSnapshot put both into one stream.
package vmm
