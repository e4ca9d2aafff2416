// Package linuxtest is what tests of Linux machines use on hosts where a
// real Linux guest cannot run (this host's KVM emulates CPL0 code slowly):
// a stand-in bzImage whose 64-bit entry runs a few bytes of code, and a
// virtio-mmio driver that drives a machine's transports from the host side,
// as the guest's driver would, with its rings in guest memory.
package linuxtest

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

var le = binary.LittleEndian

// Setup header offsets (see arch/bootparams.go) for building test images.
const (
	SetupSects = 0x1f1
	SysSize    = 0x1f4
	BootFlag   = 0x1fe
	Jump       = 0x200
	Magic      = 0x202
	Version    = 0x206
	Loader     = 0x210
	LoadFlags  = 0x211
	Ramdisk    = 0x218
	RamdiskLen = 0x21c
	Cmdline    = 0x228
	InitrdMax  = 0x22c
	Align      = 0x230
	XLoadFlags = 0x236
	CmdlineMax = 0x238
	Pref       = 0x258
	InitSize   = 0x260
)

// Kernel builds a bzImage whose protected-mode part holds code at its
// 64-bit entry (offset 0x200): a tiny "kernel" that runs in the long mode
// the VMM sets up. initSize is what the header says the kernel needs.
func Kernel(code []byte, initSize uint32) []byte {
	const sects = 4
	kernel := make([]byte, 0x1000)
	copy(kernel[0x200:], code)
	img := make([]byte, (sects+1)*512, (sects+1)*512+len(kernel))
	img[SetupSects] = sects
	le.PutUint32(img[SysSize:], uint32(len(kernel)/16))
	le.PutUint16(img[BootFlag:], arch.BootFlag)
	img[Jump], img[Jump+1] = 0xeb, 0x6a
	le.PutUint32(img[Magic:], arch.SetupHeaderMagic)
	le.PutUint16(img[Version:], 0x020f)
	img[LoadFlags] = arch.LoadedHigh
	le.PutUint32(img[InitrdMax:], 0x7fffffff)
	le.PutUint32(img[Align:], 0x200000)
	le.PutUint16(img[XLoadFlags:], arch.XLFKernel64|arch.XLFCanBeLoadedAbove4G)
	le.PutUint32(img[CmdlineMax:], 0x7ff)
	le.PutUint64(img[Pref:], 0x1000000)
	le.PutUint32(img[InitSize:], initSize)
	return append(img, kernel...)
}

// CodeSpin spins with interrupts off (jmp $): the devices' interrupts wait
// in the interrupt controllers, and the guest never halts.
var CodeSpin = []byte{0xeb, 0xfe}

// virtio-mmio registers (VIRTIO 1.x section 4.2.2).
const (
	RegDriverFeatures    = 0x020
	RegDriverFeaturesSel = 0x024
	RegQueueSel          = 0x030
	RegQueueNum          = 0x038
	RegQueueReady        = 0x044
	RegQueueNotify       = 0x050
	RegStatus            = 0x070
	RegQueueDescLow      = 0x080
	RegQueueDriverLow    = 0x090
	RegQueueDeviceLow    = 0x0a0
)

// QueueSize is the size of the queues the driver sets up.
const QueueSize = 8

// Descriptor flags.
const (
	DescNext  = 1
	DescWrite = 2
)

// Driver is a minimal virtio driver for one transport: queue q's rings are
// at Base + q*0x1000 (descriptors, then the available ring at +0x400 and
// the used ring at +0x800).
type Driver struct {
	T    testing.TB
	Mem  *mmu.Memory
	Tr   *virtio.Transport
	Base uint64
	// Hdr is where BlockRequest puts slot s's request header (Hdr+16*s).
	Hdr uint64
	// TxBufs is where TxAvail puts slot s's frame (TxBufs + s*0x1000).
	TxBufs uint64
}

// W32 writes a 32-bit transport register.
func (d *Driver) W32(off uint64, v uint32) {
	d.T.Helper()
	if err := d.Tr.Write(off, le.AppendUint32(nil, v)); err != nil {
		d.T.Fatalf("write register %#x: %v", off, err)
	}
}

// W64 writes a 64-bit register pair.
func (d *Driver) W64(off uint64, v uint64) {
	d.W32(off, uint32(v))
	d.W32(off+4, uint32(v>>32))
}

// Setup negotiates VERSION_1 only and makes queues 0..n-1 ready.
func (d *Driver) Setup(n int) {
	d.W32(RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver)
	d.W32(RegDriverFeaturesSel, 1)
	d.W32(RegDriverFeatures, 1) // VIRTIO_F_VERSION_1
	d.W32(RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)
	for q := range n {
		ring := d.Base + uint64(q)*0x1000
		d.W32(RegQueueSel, uint32(q))
		d.W32(RegQueueNum, QueueSize)
		d.W64(RegQueueDescLow, ring)
		d.W64(RegQueueDriverLow, ring+0x400)
		d.W64(RegQueueDeviceLow, ring+0x800)
		d.W32(RegQueueReady, 1)
	}
	d.W32(RegStatus, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)
}

// Write writes b to guest memory at gpa.
func (d *Driver) Write(gpa uint64, b []byte) {
	d.T.Helper()
	if err := d.Mem.Write(gpa, b); err != nil {
		d.T.Fatal(err)
	}
}

// Read returns a copy of n bytes of guest memory at gpa.
func (d *Driver) Read(gpa, n uint64) []byte {
	d.T.Helper()
	b, err := d.Mem.Slice(gpa, n)
	if err != nil {
		d.T.Fatal(err)
	}
	return bytes.Clone(b)
}

// desc writes descriptor i of queue q.
func (d *Driver) desc(q, i int, addr uint64, n uint32, flags, next uint16) {
	b := le.AppendUint64(nil, addr)
	b = le.AppendUint32(b, n)
	b = le.AppendUint16(b, flags)
	b = le.AppendUint16(b, next)
	d.Write(d.Base+uint64(q)*0x1000+uint64(16*i), b)
}

// BlockRequest makes a virtio-blk request available on queue 0 without
// notifying: chain slot (descriptors 3*slot..3*slot+2), its header at
// Hdr+16*slot, n data bytes at data, the status byte at status, in
// available ring entry avail (the caller then publishes the index).
func (d *Driver) BlockRequest(slot int, avail uint16, typ uint32, sector uint64, data uint64, n uint32, status uint64) {
	hdr := d.Hdr + uint64(slot)*16
	h := le.AppendUint32(nil, typ)
	h = le.AppendUint32(h, 0)
	h = le.AppendUint64(h, sector)
	d.Write(hdr, h)
	d.Write(status, []byte{0xff})
	dataFlags := uint16(DescNext)
	if typ == virtio.BlockTIn {
		dataFlags |= DescWrite
	}
	first := 3 * slot
	d.desc(0, first, hdr, 16, DescNext, uint16(first+1))
	d.desc(0, first+1, data, n, dataFlags, uint16(first+2))
	d.desc(0, first+2, status, 1, DescWrite, 0)
	d.Write(d.Base+0x400+4+2*uint64(avail%QueueSize), le.AppendUint16(nil, uint16(first)))
}

// Publish sets queue 0's available index (flags 0).
func (d *Driver) Publish(idx uint16) {
	d.Write(d.Base+0x400, le.AppendUint32(nil, uint32(idx)<<16))
}

// TxAvail makes frame available on the transmit queue (queue 1) in chain
// slot slot, after a zero virtio-net header, and publishes it, without
// notifying.
func (d *Driver) TxAvail(slot int, frame []byte) {
	ring := d.Base + 0x1000
	gpa := d.TxBufs + uint64(slot)*0x1000
	d.Write(gpa, append(make([]byte, virtio.NetHeaderSize), frame...))
	i := slot % QueueSize
	d.desc(1, i, gpa, uint32(virtio.NetHeaderSize+len(frame)), 0, 0)
	idx := le.Uint16(d.Read(ring+0x400+2, 2))
	d.Write(ring+0x400+4+2*uint64(idx%QueueSize), le.AppendUint16(nil, uint16(i)))
	d.Write(ring+0x400+2, le.AppendUint16(nil, idx+1))
}

// Notify notifies queue q, as the guest's driver would.
func (d *Driver) Notify(q int) { d.W32(RegQueueNotify, uint32(q)) }

// UsedIdx is queue q's used index as the device wrote it.
func (d *Driver) UsedIdx(q int) uint16 {
	return le.Uint16(d.Read(d.Base+uint64(q)*0x1000+0x800+2, 2))
}
