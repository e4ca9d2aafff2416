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
// which the spec allows).
//
// # Snapshots and checkpoints
//
// Each transport saves and restores itself and its device; the state lives
// beside each device (mmio_state.go, block_state.go, net_state.go) and is one
// opaque, versioned byte string per transport. The machine, paused (no vCPU
// runs), does for every transport:
//
//	err := t.Quiesce()        // complete in-flight work; no guest-memory writes until Resume
//	err = t.Flush()           // only for a snapshot to a file: fsync the disk
//	state, err := t.SaveState() // registers, queues, device state, disk fingerprint
//	// ... capture memory (KVM dirty log ∪ the VMM's MarkDirty set), vCPUs ...
//	err = t.Resume()          // kick every queue; the guest goes on
//
// and to restore, on a transport fresh from NewMMIO (with the disk and tap
// named again on the new host), after guest memory holds the snapshot:
//
//	err := t.LoadState(state) // refuses, changing nothing, what cannot be
//	// ... restore vCPUs, irqchip ...
//	err = t.Resume()          // kick every queue, raise a pending interrupt
//	err = netDev.Announce()   // virtio-net: RARP from the guest's MAC; repeat a few times
//
// Without a machine (a fault-tolerance intermediary checking a checkpoint
// before it acknowledges it), CheckTransportState applies LoadState's
// checks that need only the memory layout, with the same code:
//
//	err := virtio.CheckTransportState(state, inRAM) // queues vs guest RAM, features vs the device type
//
// In-flight block requests are completed at the pause, not recorded for
// replay. The device serves every request completely on the vCPU that
// notifies (pread/pwrite straight between the file and guest memory), so at
// a pause the only unfinished requests are those the guest made available
// but had not notified yet; Quiesce serves them (data on the disk or in
// guest memory, used ring written, interrupt raised), and a checkpoint
// never holds a request at all. That costs one read of each queue's
// available index when nothing is pending (BenchmarkBlockCheckpoint:
// Quiesce, SaveState and Resume of an idle virtio-blk transport take 50 to
// 70 µs here, so 40 checkpoints a second cost under 0.3% of a core), while
// replay would need a request format in the state, a second code path on
// restore, and the disk rolled back to before each recorded write.
// Between Quiesce and Resume the transport writes nothing into guest
// memory: a notify is deferred to Resume's kick, and virtio-net keeps the
// frames that arrive in its backlog, which the state carries. A received
// frame is placed and returned in one step under the transport's lock, so
// none is ever half placed; a frame not in the used ring is delivered again
// after a restore.
//
// Every byte the devices write into guest memory (used rings, receive
// buffers, block read data, status bytes, GET_ID) goes through Memory.Write
// or Memory.MarkDirty, so a checkpoint harvests it with the guest's own
// writes (TestDeviceWritesAreDirty compares guest memory before and after).
//
// A block device's state identifies its disk by size and a Fingerprint: a
// SHA-256 per 64 KiB chunk in a binary hash tree. The device records which
// chunks the guest writes, and each SaveState rehashes only those and their
// paths to the root; the first SaveState and every restore hash the whole
// disk. Measured on this machine (2 cores shared with other work, so the
// figures vary by a factor of 2 between runs): BenchmarkFingerprint
// full-64MiB 67 to 139 ms (0.5 to 1 GB/s, reads from the page cache
// included), update-16-chunks (1 MiB written in an epoch) 0.6 to 1.5 ms,
// which at 40 checkpoints a second is 2.4 to 6% of a core. Memory: 64 bytes
// per 64 KiB chunk (the leaves and the tree), 1 MiB for a 1 GiB disk.
// SHA-256 ran at 730 MB/s and CRC-32C at 15.9 GB/s in the same conditions,
// so a CRC-32C leaf would make the fingerprint about 20 times cheaper, but
// it misses a changed chunk with probability 2^-32 and anyone can forge it;
// the checkpoint path hashes only written chunks, so SHA-256 was kept (the
// encoding names the chunk size; a leaf change needs a new version).
//
// # Output commit for packets
//
// A protected guest's transmitted frames are output, held until the
// checkpoint that covers them is acknowledged (Remus's rule, as Linux's
// sch_plug qdisc does it). With Net.HoldOutput the device copies each frame
// the guest transmits into a queue and returns the chain to the guest at
// once; the frames wait there, open, until SealOutput(e), called while the
// machine is paused for checkpoint e, stamps them with e. ReleaseOutput(e),
// on e's acknowledgement, writes every frame of an epoch <= e to the tap,
// in order. Received frames are not held. The device takes transmit chains
// only under the transport's lock and never while it is quiesced, so the
// frames sealed with e are exactly those whose chains the checkpoint's
// used ring shows as sent.
//
//	n.HoldOutput(virtio.EgressBounds{})      // before the guest runs
//	frames, err := n.SealOutput(e)           // paused for checkpoint e: carry frames
//	err = n.ReleaseOutput(e)                 // checkpoint e acknowledged
//	// the activated backup, after LoadState and before Resume:
//	err = n.SendCarried(data)                // the frames checkpoint e carried
//
// Bounds (EgressBounds, per device: 16 MiB and 8192 frames by default):
// past either one the device applies backpressure, not loss. It stops
// taking transmit chains, which wait in the available ring; the guest's
// ring fills and its qdisc holds further packets. A release that makes room
// takes the waiting chains itself (the guest, its ring full, will not
// notify) and raises the interrupt; while the transport is quiesced it
// leaves them to Resume's kick. EgressStats counts held frames and bytes,
// released frames, the stalls at a bound and the frames that waited there,
// and the added latency (frame taken to frame written) as a histogram.
//
// The frames a checkpoint carries (HeldFrame, AppendHeldFrames,
// DecodeHeldFrames: a versioned, validated encoding) travel beside the
// device state, not in NetState: see HeldFrame.
//
// # Disk replication
//
// For fault tolerance the primary writes its disk at once and ships, with
// each checkpoint, the blocks the guest wrote in the epoch (blockwrites.go).
// Every completed write request marks the 4 KiB blocks (WriteBlock) it
// touched in a bitmap the device owns, beside the fingerprint's chunk set;
// reads, flushes and GET_ID mark nothing, and the device offers no DISCARD
// or WRITE_ZEROES. At the checkpoint's pause (requests completed by
// Quiesce) Block.HarvestWrites takes the set (coalesced ascending ranges of
// at most MaxWriteRange), reads the ranges' current bytes from the disk
// file, and brings the fingerprint up to date, which hashes only the 64 KiB
// chunks written since the last one (so a SaveState at the same pause finds
// nothing left to hash). The result, a DiskWrites, has a versioned
// encoding (blockwrites_encoding.go) with a CRC-32C per range over the
// disk index, offset, length and data; decoding refuses misaligned,
// overlapping, out-of-order or out-of-range ranges, bad sums and trailing
// bytes. The backup's side is package ft/diskrep. BenchmarkDiskWrites (in
// ft/diskrep) measures both sides against plain file writes.
package virtio
