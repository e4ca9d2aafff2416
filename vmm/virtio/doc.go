// Package virtio implements virtio devices for the vmm: the virtio-mmio
// transport (version 2, VIRTIO 1.x section 4.2.2), split virtqueues, a
// virtio-blk device backed by a file and a virtio-net device backed by a tap
// device.
//
// Everything the guest puts into a virtqueue is untrusted. Every descriptor
// address and length is checked against guest memory through Memory.Slice,
// chains are bounded by the queue size, and a malformed ring or chain sets
// DEVICE_NEEDS_RESET instead of panicking or touching memory outside the
// guest. Device writes into guest memory go through Memory.Write or are
// followed by Memory.MarkDirty, so fault-tolerant checkpoints see them.
//
// The package must not import package vmm: vmm imports it. A device is used
// like this:
//
//	blk, err := virtio.NewBlock("disk.img", false) // or virtio.NewNet("tap0", mac)
//	pulse := func() error { ... raise and lower the device's GSI ... }
//	t := virtio.NewMMIO(blk, mem, pulse) // mem is the *mmu.Memory of the guest
//	// on a guest MMIO exit at offset off inside the device's MMIOSize window:
//	err = t.Read(off, data) // or t.Write(off, data); log err, keep running
//	// when the machine stops:
//	t.Close()
//
// The guest finds the device through the kernel command line:
// virtio_mmio.device=4K@<base>:<gsi>.
//
// What the package offers the guest: virtio-mmio version 2 only (a driver
// must accept VIRTIO_F_VERSION_1), split virtqueues of up to 256
// descriptors, no indirect descriptors, no EVENT_IDX (the device interrupts
// after every batch of used buffers and ignores VIRTQ_AVAIL_F_NO_INTERRUPT,
// which the spec allows). Transport state for snapshots is TransportState.
package virtio
