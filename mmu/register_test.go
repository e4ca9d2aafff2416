package mmu

// Host-KVM tests: they use the real /dev/kvm and skip only when it does not
// exist.

import (
	"errors"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch/kvmtest"

	"github.com/understudy-vmm/understudy/arch"
	"golang.org/x/sys/unix"
)

func newVM(t *testing.T) *arch.VM {
	t.Helper()
	kvmtest.Require(t)
	sys, err := arch.Open("")
	if err != nil {
		t.Fatalf("arch.Open() = %v", err)
	}
	t.Cleanup(func() { sys.Close() })
	vm, err := sys.CreateVM()
	if err != nil {
		t.Fatalf("CreateVM() = %v", err)
	}
	t.Cleanup(func() { vm.Close() })
	return vm
}

func TestRegister(t *testing.T) {
	for _, b := range []Backing{Anonymous, Memfd} {
		vm := newVM(t)
		m := newMemory(t, Config{Size: 2 * mib, Backing: b})
		if err := m.Register(vm, 0); err != nil {
			t.Fatalf("Register(%v, 2 MiB) = %v", b, err)
		}
		// Registering the same slot again with another size fails and
		// says which slot.
		other := newMemory(t, Config{Size: 4 * mib, Backing: b})
		err := other.Register(vm, 0)
		var ie *arch.IoctlError
		if err == nil || !strings.Contains(err.Error(), "slot 0") || !errors.As(err, &ie) || !errors.Is(err, unix.EINVAL) {
			t.Errorf("Register(%v, 4 MiB) over slot 0 = %v, want an *arch.IoctlError (EINVAL) naming slot 0", b, err)
		}
		// Registering the identical slot again is a no-op for KVM.
		if err := m.Register(vm, 0); err != nil {
			t.Errorf("Register(%v, 2 MiB) twice = %v, want nil", b, err)
		}
	}
}

// TestRegisterSplit registers 4 GiB of RAM (two slots around the MMIO hole)
// with dirty logging and checks that both slots exist with their sizes.
func TestRegisterSplit(t *testing.T) {
	vm := newVM(t)
	m := newMemory(t, Config{Size: 4 * gib})
	if err := m.Register(vm, arch.MemLogDirtyPages); err != nil {
		t.Fatalf("Register(4 GiB, MemLogDirtyPages) = %v", err)
	}
	for _, r := range m.Regions() {
		bitmap := make([]uint64, r.Size/PageSize/64)
		if err := vm.GetDirtyLog(r.Slot, bitmap); err != nil {
			t.Errorf("GetDirtyLog(slot %d) = %v, want nil (slot registered with logging)", r.Slot, err)
		}
	}
	// The slots cover exactly the regions: a slot of another size at slot 1
	// is refused, and nothing overlaps the hole.
	err := vm.SetUserMemoryRegion(arch.UserMemoryRegion{Slot: 2, GuestPhysAddr: 4*gib + 1*gib - PageSize, MemorySize: PageSize, UserspaceAddr: arch.SliceAddr(m.Backing())})
	if !errors.Is(err, unix.EEXIST) {
		t.Errorf("SetUserMemoryRegion over the last page of slot 1 = %v, want EEXIST", err)
	}
	err = vm.SetUserMemoryRegion(arch.UserMemoryRegion{Slot: 2, GuestPhysAddr: 3 * gib, MemorySize: gib, UserspaceAddr: arch.SliceAddr(m.Backing())})
	if err != nil {
		t.Errorf("SetUserMemoryRegion over the MMIO hole = %v, want nil (the hole is free)", err)
	}
}
