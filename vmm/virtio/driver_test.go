package virtio

import (
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/understudy-vmm/understudy/mmu"
)

// mmu.Memory is the guest RAM the vmm hands to devices.
var _ Memory = (*mmu.Memory)(nil)

// Guest-physical layout the test driver uses in its 4 MiB of RAM.
const (
	ringBase   = 0x10000 // queue q's rings at ringBase + q*ringStride
	ringStride = 0x10000
	bufBase    = 0x100000 // data buffers from here up
	testMemory = 4 << 20
)

// testDriver is a virtio driver written against the spec, talking to a
// Transport through its registers and to the device through rings in real
// guest memory, the way the Linux driver does.
type testDriver struct {
	t      *testing.T
	tr     *Transport
	mem    *mmu.Memory
	irqs   atomic.Int64
	queues []*driverQueue
	next   uint64 // bump allocator for buffers
}

type driverQueue struct {
	index              int
	size               uint16
	desc, avail, used  uint64
	nextDesc, availIdx uint16
	usedSeen           uint16
}

func newMemory(t testing.TB) *mmu.Memory {
	t.Helper()
	mem, err := mmu.New(mmu.Config{Size: testMemory})
	if err != nil {
		t.Fatalf("mmu.New: %v", err)
	}
	t.Cleanup(func() { mem.Close() })
	return mem
}

// newDriver puts dev behind a transport over fresh guest memory; it does
// not initialise the device.
func newDriver(t *testing.T, dev Device) *testDriver {
	t.Helper()
	d := &testDriver{t: t, mem: newMemory(t), next: bufBase}
	d.tr = NewMMIO(dev, d.mem, func() error { d.irqs.Add(1); return nil })
	t.Cleanup(func() {
		if err := d.tr.Close(); err != nil {
			t.Errorf("Transport.Close() = %v", err)
		}
	})
	return d
}

func (d *testDriver) read(off uint64) uint32 {
	d.t.Helper()
	var b [4]byte
	if err := d.tr.Read(off, b[:]); err != nil {
		d.t.Fatalf("Read(%#x) = %v", off, err)
	}
	return binary.LittleEndian.Uint32(b[:])
}

// write writes a register and returns the transport's error, which the
// caller checks.
func (d *testDriver) write(off uint64, v uint32) error {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	return d.tr.Write(off, b[:])
}

func (d *testDriver) mustWrite(off uint64, v uint32) {
	d.t.Helper()
	if err := d.write(off, v); err != nil {
		d.t.Fatalf("Write(%#x, %#x) = %v", off, v, err)
	}
}

func (d *testDriver) status() uint32 { return d.read(regStatus) }

// negotiate runs the init sequence up to FEATURES_OK with the given driver
// features and returns the status read back.
func (d *testDriver) negotiate(features uint64) uint32 {
	d.t.Helper()
	if got := d.read(regMagicValue); got != MagicValue {
		d.t.Fatalf("MagicValue = %#x, want %#x", got, MagicValue)
	}
	if got := d.read(regVersion); got != Version {
		d.t.Fatalf("Version = %d, want %d", got, Version)
	}
	d.mustWrite(regStatus, 0)
	d.mustWrite(regStatus, StatusAcknowledge)
	d.mustWrite(regStatus, StatusAcknowledge|StatusDriver)
	d.mustWrite(regDriverFeaturesSel, 0)
	d.mustWrite(regDriverFeatures, uint32(features))
	d.mustWrite(regDriverFeaturesSel, 1)
	d.mustWrite(regDriverFeatures, uint32(features>>32))
	// A refusal comes back as an error and as FEATURES_OK missing.
	d.write(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	return d.status()
}

func (d *testDriver) deviceFeatures() uint64 {
	d.mustWrite(regDeviceFeaturesSel, 0)
	lo := d.read(regDeviceFeatures)
	d.mustWrite(regDeviceFeaturesSel, 1)
	return uint64(d.read(regDeviceFeatures))<<32 | uint64(lo)
}

// init runs the whole init sequence, accepting every offered feature, with
// queues of size size.
func (d *testDriver) init(size uint16) {
	d.t.Helper()
	if st := d.negotiate(d.deviceFeatures()); st&StatusFeaturesOK == 0 {
		d.t.Fatalf("status after FEATURES_OK = %#x: refused", st)
	}
	d.queues = nil
	for i := 0; ; i++ {
		d.mustWrite(regQueueSel, uint32(i))
		max := d.read(regQueueNumMax)
		if max == 0 {
			break
		}
		if d.read(regQueueReady) != 0 {
			d.t.Fatalf("queue %d ready before setup", i)
		}
		base := uint64(ringBase + i*ringStride)
		q := &driverQueue{index: i, size: size, desc: base, avail: base + 0x1000, used: base + 0x2000}
		clear(d.slice(base, ringStride))
		d.mustWrite(regQueueNum, uint32(size))
		d.mustWrite(regQueueDescLow, uint32(q.desc))
		d.mustWrite(regQueueDescHigh, uint32(q.desc>>32))
		d.mustWrite(regQueueDriverLow, uint32(q.avail))
		d.mustWrite(regQueueDriverHigh, 0)
		d.mustWrite(regQueueDeviceLow, uint32(q.used))
		d.mustWrite(regQueueDeviceHigh, 0)
		d.mustWrite(regQueueReady, 1)
		if d.read(regQueueReady) != 1 {
			d.t.Fatalf("queue %d not ready after QueueReady=1", i)
		}
		d.queues = append(d.queues, q)
	}
	d.mustWrite(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
	if st := d.status(); st != StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK {
		d.t.Fatalf("status after DRIVER_OK = %#x", st)
	}
}

func (d *testDriver) slice(gpa, n uint64) []byte {
	d.t.Helper()
	b, err := d.mem.Slice(gpa, n)
	if err != nil {
		d.t.Fatalf("Slice(%#x, %d): %v", gpa, n, err)
	}
	return b
}

// alloc returns n bytes of zeroed guest memory for a buffer.
func (d *testDriver) alloc(n uint64) uint64 {
	gpa := d.next
	d.next = (d.next + n + 15) &^ 15
	if d.next > testMemory {
		d.t.Fatalf("test driver out of buffer memory")
	}
	clear(d.slice(gpa, n))
	return gpa
}

// desc is one descriptor the test driver writes.
type desc struct {
	addr  uint64
	len   uint32
	flags uint16 // descFWrite, descFIndirect; NEXT is added for chaining
	next  int    // -1: the following descriptor of the list
}

// buf describes a buffer to chain: data to copy in (readable) or a length
// to leave for the device (writable).
type buf struct {
	data  []byte
	n     uint32
	write bool
}

// chain writes bufs as a fresh chain and returns its descriptors.
func (d *testDriver) chain(bufs ...buf) []desc {
	var ds []desc
	for _, b := range bufs {
		n := uint32(len(b.data))
		if b.write {
			n = b.n
		}
		gpa := d.alloc(uint64(n))
		copy(d.slice(gpa, uint64(n)), b.data)
		var flags uint16
		if b.write {
			flags = descFWrite
		}
		ds = append(ds, desc{addr: gpa, len: n, flags: flags, next: -1})
	}
	return ds
}

// submit writes ds into free descriptor slots (linked with NEXT, unless a
// desc names its own next) and makes the chain available. It returns the
// head index.
func (d *testDriver) submit(qi int, ds []desc) uint16 {
	q := d.queues[qi]
	idx := make([]uint16, len(ds))
	for i := range ds {
		idx[i] = q.nextDesc % q.size
		q.nextDesc++
	}
	for i, de := range ds {
		flags := de.flags
		next := uint16(0)
		if de.next >= 0 {
			flags |= descFNext
			next = uint16(de.next)
		} else if i+1 < len(ds) {
			flags |= descFNext
			next = idx[i+1]
		}
		e := d.slice(q.desc+uint64(idx[i])*descSize, descSize)
		binary.LittleEndian.PutUint64(e[0:], de.addr)
		binary.LittleEndian.PutUint32(e[8:], de.len)
		binary.LittleEndian.PutUint16(e[12:], flags)
		binary.LittleEndian.PutUint16(e[14:], next)
	}
	d.publish(qi, idx[0])
	return idx[0]
}

// publish puts head into the available ring and advances its idx.
func (d *testDriver) publish(qi int, head uint16) {
	q := d.queues[qi]
	binary.LittleEndian.PutUint16(d.slice(q.avail+4+2*uint64(q.availIdx%q.size), 2), head)
	q.availIdx++
	binary.LittleEndian.PutUint16(d.slice(q.avail+2, 2), q.availIdx)
}

func (d *testDriver) notify(qi int) error { return d.write(regQueueNotify, uint32(qi)) }

// usedElem is one entry of the used ring.
type usedElem struct {
	id, len uint32
}

// takeUsed returns the used entries the driver has not seen yet.
func (d *testDriver) takeUsed(qi int) []usedElem {
	q := d.queues[qi]
	idx := binary.LittleEndian.Uint16(d.slice(q.used+2, 2))
	var out []usedElem
	for ; q.usedSeen != idx; q.usedSeen++ {
		e := d.slice(q.used+4+8*uint64(q.usedSeen%q.size), 8)
		out = append(out, usedElem{binary.LittleEndian.Uint32(e), binary.LittleEndian.Uint32(e[4:])})
	}
	return out
}

// ackInterrupt reads and acknowledges InterruptStatus.
func (d *testDriver) ackInterrupt() uint32 {
	s := d.read(regInterruptStatus)
	d.mustWrite(regInterruptACK, s)
	return s
}

func wantErr(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("%s = %v, want an error wrapping %v", what, err, target)
	}
}
