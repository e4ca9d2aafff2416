package mmu

import (
	"fmt"
	"math/bits"

	"github.com/understudy-vmm/understudy/arch"
)

// DirtyLog collects the guest pages written since the last harvest: KVM's
// dirty log for guest writes (with manual protection, so that harvesting and
// re-protecting are separate, explicit steps) combined with the VMM's own
// dirty bitmap for the writes KVM cannot see.
//
// Dirty logging makes KVM write-protect guest memory and map it with 4 KiB
// pages, so large mappings are lost while it is on.
type DirtyLog struct {
	mem  *Memory
	vm   *arch.VM
	scra []uint64 // per-slot scratch bitmap, reused between harvests
	cnt  []uint64 // whole-backing scratch bitmap for Count
	on   bool
}

// EnableDirtyLog turns on KVM dirty logging with manual protection for every
// slot of m. From now on every guest write is recorded until harvested.
//
// It first waits until no guest page has its access revoked (a sampling
// window ends within its length), and no page is revoked while logging is
// on: the checkpoints copy guest memory through the VMM's mapping.
func (m *Memory) EnableDirtyLog(vm *arch.VM) (*DirtyLog, error) {
	m.startLogging()
	if err := vm.EnableManualDirtyLogProtect(false); err != nil {
		m.logging.Store(false)
		return nil, fmt.Errorf("dirty log: %w", err)
	}
	if err := m.Register(vm, arch.MemLogDirtyPages); err != nil {
		m.logging.Store(false)
		return nil, fmt.Errorf("dirty log: %w", err)
	}
	var max uint64
	for _, r := range m.regions {
		max = maxU64(max, r.Size/PageSize)
	}
	return &DirtyLog{mem: m, vm: vm, scra: make([]uint64, (max+63)/64), cnt: make([]uint64, m.BitmapWords()), on: true}, nil
}

func maxU64(a, b uint64) uint64 {
	if a > b {
		return a
	}
	return b
}

// BitmapWords is the length of a bitmap with one bit per 4 KiB page of the
// backing, as Harvest fills.
func (m *Memory) BitmapWords() int { return len(m.dirty) }

// Harvest ORs the pages written since the last harvest into dst (one bit per
// 4 KiB page of the backing, indexed by backing offset / 4096) and
// write-protects them again in KVM, so later writes are caught. Call it with
// every vCPU paused, and copy the pages before resuming them. It returns the
// number of pages set in dst afterwards.
func (d *DirtyLog) Harvest(dst []uint64) (int, error) {
	if !d.on {
		return 0, fmt.Errorf("dirty log: harvest after Disable")
	}
	if len(dst) < d.mem.BitmapWords() {
		return 0, fmt.Errorf("dirty log: bitmap of %d words, want %d", len(dst), d.mem.BitmapWords())
	}
	if err := d.readKVMLog(dst, true); err != nil {
		return 0, err
	}
	if _, err := d.mem.TakeVMMDirty(dst); err != nil {
		return 0, err
	}
	n := 0
	for _, w := range dst[:d.mem.BitmapWords()] {
		n += bits.OnesCount64(w)
	}
	return n, nil
}

// readKVMLog ORs KVM's dirty log of every slot into dst (indexed like
// Harvest's bitmap) and, if reprotect, write-protects the pages it found
// again (CLEAR_DIRTY_LOG), which resets their bits in the log.
func (d *DirtyLog) readKVMLog(dst []uint64, reprotect bool) error {
	for _, r := range d.mem.regions {
		pages := r.Size / PageSize
		words := d.scra[:(pages+63)/64]
		if err := d.vm.GetDirtyLog(r.Slot, words); err != nil {
			return fmt.Errorf("dirty log of slot %d: %w", r.Slot, err)
		}
		any := false
		first := r.Offset / PageSize // backing page of the slot's first page
		for i, w := range words {
			if w == 0 {
				continue
			}
			any = true
			// Regions start 2 MiB aligned in the backing, so slot word i is
			// backing word first/64 + i.
			dst[first/64+uint64(i)] |= w
		}
		if any && reprotect {
			if err := d.vm.ClearDirtyLog(r.Slot, 0, uint32(pages), words); err != nil {
				return fmt.Errorf("re-protect slot %d: %w", r.Slot, err)
			}
		}
		clear(words)
	}
	return nil
}

// Count returns how many pages were written since the last harvest, without
// harvesting them: with manual protection KVM's GET_DIRTY_LOG only reads the
// log (CLEAR_DIRTY_LOG is what resets it), and the VMM's own bitmap is read,
// not taken. A page in both counts once. The vCPUs may be running, so the
// count is a lower bound of what the next Harvest returns. Count and Harvest
// share a scratch buffer: call them from one goroutine.
func (d *DirtyLog) Count() (int, error) {
	if !d.on {
		return 0, fmt.Errorf("dirty log: count after Disable")
	}
	clear(d.cnt)
	if err := d.readKVMLog(d.cnt, false); err != nil {
		return 0, err
	}
	n := 0
	for i := range d.cnt {
		n += bits.OnesCount64(d.cnt[i] | d.mem.dirty[i].Load())
	}
	return n, nil
}

// Disable turns dirty logging off again (slots re-registered without it).
func (d *DirtyLog) Disable() error {
	if !d.on {
		return nil
	}
	d.on = false
	d.mem.logging.Store(false)
	return d.mem.Register(d.vm, 0)
}
