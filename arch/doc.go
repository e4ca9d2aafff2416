// Package arch is Understudy's thin layer over x86-64 and the KVM API.
//
// It follows the kernel's fd hierarchy with one type per level: System
// (/dev/kvm), VM and VCPU. Every ioctl error is an *IoctlError that names the
// ioctl and wraps the errno. It also holds the x86 formats the VMM needs:
// paging entries, segment descriptors, and instruction decoding for error
// reports. All use of package unsafe lives in files named *_unsafe.go.
//
// It owns no policy: no goroutines, no memory allocation for guests, no
// devices. Those belong to packages mmu and vmm.
//
// Creating a VM and running it:
//
//	sys, err := arch.Open("")          // /dev/kvm
//	vm, err := sys.CreateVM()
//	mem, _ := unix.Mmap(-1, 0, 2<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
//	copy(mem[0x1000:], code)
//	err = vm.SetUserMemoryRegion(arch.UserMemoryRegion{Slot: 0, MemorySize: 2 << 20, UserspaceAddr: arch.SliceAddr(mem)})
//	cpu, err := vm.CreateVCPU(0)
//	sregs, _ := cpu.Sregs()
//	sregs.CS.Base, sregs.CS.Selector = 0, 0
//	_ = cpu.SetSregs(sregs)
//	_ = cpu.SetRegs(arch.Regs{RIP: 0x1000, RFLAGS: 2})
//	for {
//		if err := cpu.Run(); err != nil { ... }
//		switch cpu.ExitReason() {
//		case arch.ExitIO:
//			io, _ := cpu.IO()
//			...
//		case arch.ExitHLT:
//			return
//		}
//	}
package arch
