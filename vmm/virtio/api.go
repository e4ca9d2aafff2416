package virtio

// Memory is guest RAM as devices see it; *mmu.Memory satisfies it. Every
// device write into guest memory goes through Write, or is followed by
// MarkDirty, so fault-tolerant checkpoints see it.
type Memory interface {
	// Slice returns a bounds-checked view of [gpa, gpa+n).
	Slice(gpa, n uint64) ([]byte, error)
	// Write copies p into guest memory at gpa and marks it dirty.
	Write(gpa uint64, p []byte) error
	// MarkDirty records that [gpa, gpa+n) was written by other means.
	MarkDirty(gpa, n uint64) error
}

// Interrupt raises the device's interrupt line (an edge; the vmm pulses
// KVM_IRQ_LINE).
type Interrupt func() error

// MMIOSize is the size in bytes of one virtio-mmio register window.
const MMIOSize = 0x1000
