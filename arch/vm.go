package arch

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// VM is a KVM virtual machine fd.
type VM struct {
	fd  int
	sys *System
}

// FD returns the raw file descriptor.
func (vm *VM) FD() int { return vm.fd }

// System returns the device the VM was created from.
func (vm *VM) System() *System { return vm.sys }

// Close closes the VM fd. vCPUs hold their own references.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION on the VM fd (0 = unsupported).
func (vm *VM) CheckExtension(cap int) int {
	r, err := ioctlVal(vm.fd, kvmCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return int(r)
}

// SetUserMemoryRegion adds, changes or (with size 0) deletes a memory slot.
func (vm *VM) SetUserMemoryRegion(r UserMemoryRegion) error {
	return ioctlOf(vm.fd, kvmSetUserMemoryRegion, &r)
}

// SetTSSAddr sets the three-page TSS region KVM needs on Intel (KVM_SET_TSS_ADDR).
func (vm *VM) SetTSSAddr(addr uint64) error {
	_, err := ioctlVal(vm.fd, kvmSetTSSAddr, uintptr(addr))
	return err
}

// SetIdentityMapAddr sets the EPT identity-map page (KVM_SET_IDENTITY_MAP_ADDR).
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	return ioctlOf(vm.fd, kvmSetIdentityMapAddr, &addr)
}

// CreateIRQChip creates the in-kernel PIC, IOAPIC and local APICs.
func (vm *VM) CreateIRQChip() error {
	_, err := ioctlVal(vm.fd, kvmCreateIRQChip, 0)
	return err
}

// CreatePIT2 creates the in-kernel i8254 PIT.
func (vm *VM) CreatePIT2(flags uint32) error {
	c := PITConfig{Flags: flags}
	return ioctlOf(vm.fd, kvmCreatePIT2, &c)
}

// IRQLine sets the level of an interrupt line of the in-kernel irqchip.
func (vm *VM) IRQLine(irq uint32, level bool) error {
	l := irqLevel{IRQ: irq}
	if level {
		l.Level = 1
	}
	return ioctlOf(vm.fd, kvmIRQLine, &l)
}

// IRQChip returns the state of one in-kernel interrupt controller.
func (vm *VM) IRQChip(chip uint32) (IRQChip, error) {
	c := IRQChip{ChipID: chip}
	err := ioctlOf(vm.fd, kvmGetIRQChip, &c)
	return c, err
}

// SetIRQChip restores the state of one in-kernel interrupt controller.
func (vm *VM) SetIRQChip(c IRQChip) error { return ioctlOf(vm.fd, kvmSetIRQChip, &c) }

// PIT2 returns the in-kernel PIT state.
func (vm *VM) PIT2() (PITState2, error) {
	var s PITState2
	err := ioctlOf(vm.fd, kvmGetPIT2, &s)
	return s, err
}

// SetPIT2 restores the in-kernel PIT state.
func (vm *VM) SetPIT2(s PITState2) error { return ioctlOf(vm.fd, kvmSetPIT2, &s) }

// Clock returns the kvmclock state.
func (vm *VM) Clock() (ClockData, error) {
	var c ClockData
	err := ioctlOf(vm.fd, kvmGetClock, &c)
	return c, err
}

// SetClock sets the kvmclock state.
func (vm *VM) SetClock(c ClockData) error { return ioctlOf(vm.fd, kvmSetClock, &c) }

// EnableCap enables a VM capability (KVM_ENABLE_CAP).
func (vm *VM) EnableCap(cap uint32, args ...uint64) error {
	if len(args) > 4 {
		return fmt.Errorf("KVM_ENABLE_CAP %d: %d args, at most 4", cap, len(args))
	}
	c := enableCap{Cap: cap}
	copy(c.Args[:], args)
	return ioctlOf(vm.fd, kvmEnableCap, &c)
}

// EnableManualDirtyLogProtect switches the dirty log to manual protection:
// GetDirtyLog no longer re-protects pages; ClearDirtyLog does. With initSet,
// every page starts dirty (and mapped writable) when logging is enabled.
func (vm *VM) EnableManualDirtyLogProtect(initSet bool) error {
	if vm.CheckExtension(CapManualDirtyLogProtect) == 0 {
		return fmt.Errorf("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not supported")
	}
	flags := uint64(ManualProtectEnable)
	if initSet {
		flags |= ManualProtectInitSet
	}
	return vm.EnableCap(CapManualDirtyLogProtect, flags)
}

// GetDirtyLog fills bitmap (one bit per 4 KiB page of the slot, 64-bit
// aligned length) with the slot's dirty log.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return errors.New("KVM_GET_DIRTY_LOG: empty bitmap")
	}
	d := dirtyLog{Slot: slot, Bitmap: wordsAddr(bitmap)}
	err := ioctlOf(vm.fd, kvmGetDirtyLog, &d)
	keepAlive(bitmap)
	return err
}

// ClearDirtyLog re-protects the pages set in bitmap, which covers numPages
// pages starting at firstPage (a multiple of 64) of the slot.
func (vm *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	if uint64(len(bitmap))*64 < uint64(numPages) {
		return fmt.Errorf("KVM_CLEAR_DIRTY_LOG: bitmap of %d words too small for %d pages", len(bitmap), numPages)
	}
	c := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: firstPage, Bitmap: wordsAddr(bitmap)}
	err := ioctlOf(vm.fd, kvmClearDirtyLog, &c)
	keepAlive(bitmap)
	return err
}

// IRQFD routes writes to eventfd efd to interrupt line gsi.
func (vm *VM) IRQFD(efd int, gsi uint32, flags uint32) error {
	f := irqfd{FD: uint32(efd), GSI: gsi, Flags: flags}
	return ioctlOf(vm.fd, kvmIRQFD, &f)
}

// IOEventFD makes guest writes of length len at addr signal eventfd efd
// without exiting to user space. flags: IOEventFDPIO, IOEventFDDatamatch,
// IOEventFDDeassign.
func (vm *VM) IOEventFD(efd int, addr uint64, length uint32, datamatch uint64, flags uint32) error {
	e := ioeventfd{Datamatch: datamatch, Addr: addr, Len: length, FD: int32(efd), Flags: flags}
	return ioctlOf(vm.fd, kvmIOEventFD, &e)
}

// StatsFD returns the VM's binary statistics fd (KVM_GET_STATS_FD).
func (vm *VM) StatsFD() (*Stats, error) {
	fd, err := ioctlVal(vm.fd, kvmGetStatsFD, 0)
	if err != nil {
		return nil, err
	}
	return newStats(int(fd))
}

// CreateVCPU creates vCPU id and maps its run area.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctlVal(vm.fd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, err
	}
	run, err := unix.Mmap(int(fd), 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("mmap vCPU %d run area: %w", id, err)
	}
	return &VCPU{fd: int(fd), id: id, vm: vm, runMem: run, run: newRunArea(run)}, nil
}
