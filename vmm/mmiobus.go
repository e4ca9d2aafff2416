package vmm

import (
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/arch"
)

// mmioDevice is a device on the MMIO bus.
type mmioDevice interface {
	// read fills data for a guest read at offset within the device's range.
	read(offset uint64, data []byte) error
	// write handles a guest write at offset within the device's range.
	write(offset uint64, data []byte) error
}

// mmioRegion is one device's guest-physical range.
type mmioRegion struct {
	base, size uint64
	name       string
	dev        mmioDevice
	// errs counts the device's errors; the first is logged at warning
	// level, later ones at debug level.
	errs atomic.Uint64
}

// mmioBus dispatches KVM_EXIT_MMIO to devices by address. For a payload
// machine an access outside every device is an error (nothing should be
// there); a Linux machine's bus is lenient like its port bus.
type mmioBus struct {
	regions []*mmioRegion
	lenient *unknownMMIO
}

// add registers dev at [base, base+size); ranges must not overlap.
func (b *mmioBus) add(name string, base, size uint64, dev mmioDevice) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("MMIO device %s: bad range [%#x, +%#x)", name, base, size)
	}
	for _, r := range b.regions {
		if base < r.base+r.size && r.base < base+size {
			return fmt.Errorf("MMIO device %s at [%#x, +%#x) overlaps %s at [%#x, +%#x)", name, base, size, r.name, r.base, r.size)
		}
	}
	b.regions = append(b.regions, &mmioRegion{base: base, size: size, name: name, dev: dev})
	return nil
}

// find returns the region holding addr, or nil.
func (b *mmioBus) find(addr uint64) *mmioRegion {
	for _, r := range b.regions {
		if addr >= r.base && addr-r.base < r.size {
			return r
		}
	}
	return nil
}

func (b *mmioBus) handle(m *Machine, v *vcpu, mm arch.MMIOExit) error {
	dir := "read"
	if mm.Write {
		dir = "write"
	}
	r := b.find(mm.Addr)
	if r == nil || uint64(len(mm.Data)) > r.size-(mm.Addr-r.base) {
		if b.lenient != nil {
			b.lenient.access(m, mm)
			return nil
		}
		return m.exitError(v, "guest accessed unbacked guest-physical memory",
			fmt.Sprintf("%d-byte %s at GPA %#x (no device there)", len(mm.Data), dir, mm.Addr))
	}
	var err error
	if mm.Write {
		err = r.dev.write(mm.Addr-r.base, mm.Data)
	} else {
		err = r.dev.read(mm.Addr-r.base, mm.Data)
	}
	if err != nil {
		// Device errors are about what the guest asked for (the device
		// already answered it as the hardware would): log them, go on.
		lvl := m.log.Debug
		if r.errs.Add(1) == 1 {
			lvl = m.log.Warn
		}
		lvl("guest MMIO access failed", "device", r.name, "access", dir,
			"gpa", fmt.Sprintf("%#x", mm.Addr), "size", len(mm.Data), "err", err)
	}
	return nil
}

// unknownMMIO answers a Linux guest's MMIO accesses where no device is:
// reads return all ones, writes are ignored; the first access to each 4 KiB
// page is logged at debug level.
type unknownMMIO struct {
	// mu guards pages.
	mu    sync.Mutex
	pages map[uint64]uint64
}

func newUnknownMMIO() *unknownMMIO { return &unknownMMIO{pages: map[uint64]uint64{}} }

func (u *unknownMMIO) access(m *Machine, mm arch.MMIOExit) {
	if !mm.Write {
		for i := range mm.Data {
			mm.Data[i] = 0xff
		}
	}
	page := mm.Addr &^ (arch.PageSize - 1)
	u.mu.Lock()
	n := u.pages[page]
	u.pages[page] = n + 1
	u.mu.Unlock()
	if n == 0 {
		dir := "read"
		if mm.Write {
			dir = "write"
		}
		m.log.Debug("guest MMIO where no device is (reads return all ones, writes are ignored)",
			"gpa", fmt.Sprintf("%#x", mm.Addr), "access", dir, "size", len(mm.Data))
	}
}
