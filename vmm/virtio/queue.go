package virtio

import (
	"encoding/binary"
	"fmt"
	"math/bits"
)

// Buffer is one descriptor of a chain: Data is guest memory at GPA, already
// checked to lie inside guest RAM. A device that writes into a writable
// buffer through Data must call Memory.MarkDirty for it afterwards.
type Buffer struct {
	GPA  uint64
	Data []byte
}

// Chain is one descriptor chain taken from a queue's available ring: the
// device-readable buffers first, then the device-writable ones.
type Chain struct {
	Head     uint16 // index of the first descriptor, returned in the used ring
	Readable []Buffer
	Writable []Buffer
}

// ReadableLen returns the total length of the readable buffers.
func (c *Chain) ReadableLen() uint64 { return totalLen(c.Readable) }

// WritableLen returns the total length of the writable buffers.
func (c *Chain) WritableLen() uint64 { return totalLen(c.Writable) }

func totalLen(bufs []Buffer) uint64 {
	var n uint64
	for _, b := range bufs {
		n += uint64(len(b.Data))
	}
	return n
}

// gather copies the readable stream, from offset off, into dst and returns
// how many bytes it copied.
func gather(bufs []Buffer, off uint64, dst []byte) int {
	done := 0
	for _, b := range bufs {
		if done == len(dst) {
			break
		}
		if off >= uint64(len(b.Data)) {
			off -= uint64(len(b.Data))
			continue
		}
		done += copy(dst[done:], b.Data[off:])
		off = 0
	}
	return done
}

// scatter writes src into the writable stream at offset off through
// mem.Write (so the pages are marked dirty) and returns how many bytes it
// wrote.
func scatter(mem Memory, bufs []Buffer, off uint64, src []byte) (int, error) {
	done := 0
	for _, b := range bufs {
		if done == len(src) {
			break
		}
		if off >= uint64(len(b.Data)) {
			off -= uint64(len(b.Data))
			continue
		}
		n := min(uint64(len(b.Data))-off, uint64(len(src)-done))
		if err := mem.Write(b.GPA+off, src[done:done+int(n)]); err != nil {
			return done, err
		}
		done += int(n)
		off = 0
	}
	return done, nil
}

// Queue is one split virtqueue of an active device. Its methods may only be
// called with the transport's lock held: from Device.Notify, or inside
// Host.Deliver.
type Queue struct {
	index int
	max   uint16
	st    *QueueState
	mem   Memory
	// used is set when Push added to the used ring; the transport raises
	// the interrupt and clears it.
	used bool
	// seen marks descriptors already visited while walking one chain.
	seen []uint64
}

// Index returns the queue's number within its device.
func (q *Queue) Index() int { return q.index }

// State returns a copy of the queue's state.
func (q *Queue) State() QueueState { return *q.st }

// RAMCheck says whether [gpa, gpa+n) lies inside guest RAM (one region of
// it): nil if it does, else an error saying why not. A live transport asks
// its Memory (memoryRAM); a check of a state without a machine asks the
// state's memory layout (CheckTransportState).
type RAMCheck func(gpa, n uint64) error

// memoryRAM is the RAMCheck of live guest memory.
func memoryRAM(mem Memory) RAMCheck {
	return func(gpa, n uint64) error {
		_, err := mem.Slice(gpa, n)
		return err
	}
}

// validateQueue checks a ready queue's configuration: size, alignment, and
// all three areas inside guest RAM. It is the one check of a queue's
// configuration: the driver's QueueReady, a restore (LoadState) and the
// check of a state without a machine (CheckTransportState) apply it.
func validateQueue(inRAM RAMCheck, st *QueueState, max uint16) error {
	if st.Size == 0 || st.Size > max || bits.OnesCount16(st.Size) != 1 {
		return malformed("queue size %d: want a power of 2 from 1 to %d", st.Size, max)
	}
	n := uint64(st.Size)
	areas := []struct {
		name      string
		gpa, size uint64
		alignment uint64
	}{
		{"descriptor table", st.Desc, descSize * n, 16},
		{"available ring", st.Driver, ringHeaderBytes + 2*n + 2, 2},
		{"used ring", st.Device, ringHeaderBytes + usedElemSize*n + 2, 4},
	}
	for _, a := range areas {
		if a.gpa%a.alignment != 0 {
			return malformed("%s at %#x is not %d-byte aligned", a.name, a.gpa, a.alignment)
		}
		if err := inRAM(a.gpa, a.size); err != nil {
			return malformed("%s at %#x (%d bytes): %v", a.name, a.gpa, a.size, err)
		}
	}
	return nil
}

func (q *Queue) u16(gpa uint64) (uint16, error) {
	b, err := q.mem.Slice(gpa, 2)
	if err != nil {
		return 0, malformed("ring at %#x: %v", gpa, err)
	}
	return binary.LittleEndian.Uint16(b), nil
}

// Pending returns how many chains the driver has made available that the
// device has not taken yet.
func (q *Queue) Pending() (uint16, error) {
	idx, err := q.u16(q.st.Driver + 2)
	if err != nil {
		return 0, err
	}
	n := idx - q.st.LastAvail
	if n > q.st.Size {
		return 0, malformed("available index %d is %d ahead of the device's %d, more than the queue size %d",
			idx, n, q.st.LastAvail, q.st.Size)
	}
	return n, nil
}

// Pop takes the next available chain. It returns nil and no error when the
// driver has made none available. Every descriptor is checked: its index,
// its buffer inside guest memory, no indirect descriptors (not offered), no
// readable descriptor after a writable one, no descriptor twice (a loop) and
// no more descriptors than the queue size. A violation returns an error
// wrapping ErrMalformed and leaves the queue where it was.
func (q *Queue) Pop() (*Chain, error) {
	n, err := q.Pending()
	if err != nil || n == 0 {
		return nil, err
	}
	size := uint64(q.st.Size)
	slot := uint64(q.st.LastAvail) % size
	head, err := q.u16(q.st.Driver + ringHeaderBytes + 2*slot)
	if err != nil {
		return nil, err
	}
	table, err := q.mem.Slice(q.st.Desc, descSize*size)
	if err != nil {
		return nil, malformed("descriptor table at %#x: %v", q.st.Desc, err)
	}
	c := &Chain{Head: head}
	if err := q.walk(c, table); err != nil {
		return nil, fmt.Errorf("chain at available slot %d (head %d): %w", slot, head, err)
	}
	q.st.LastAvail++
	return c, nil
}

func (q *Queue) walk(c *Chain, table []byte) error {
	size := uint64(q.st.Size)
	if words := int(size+63) / 64; len(q.seen) < words {
		q.seen = make([]uint64, words)
	}
	clear(q.seen)
	i := uint64(c.Head)
	for count := uint64(0); ; count++ {
		if i >= size {
			return malformed("descriptor index %d is outside the queue of size %d", i, size)
		}
		if count >= size {
			return malformed("chain is longer than the queue size %d", size)
		}
		if q.seen[i/64]&(1<<(i%64)) != 0 {
			return malformed("descriptor %d appears twice: the chain loops", i)
		}
		q.seen[i/64] |= 1 << (i % 64)
		d := table[i*descSize : (i+1)*descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := uint64(binary.LittleEndian.Uint32(d[8:]))
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&descFIndirect != 0 {
			return malformed("descriptor %d is indirect, but VIRTIO_F_INDIRECT_DESC was not offered", i)
		}
		var data []byte
		if length > 0 {
			if addr+length < addr {
				return malformed("descriptor %d: address %#x + length %#x overflows", i, addr, length)
			}
			b, err := q.mem.Slice(addr, length)
			if err != nil {
				return malformed("descriptor %d: buffer [%#x, +%#x) is not guest memory: %v", i, addr, length, err)
			}
			data = b
		}
		buf := Buffer{GPA: addr, Data: data}
		if flags&descFWrite != 0 {
			c.Writable = append(c.Writable, buf)
		} else {
			if len(c.Writable) > 0 {
				return malformed("descriptor %d is device-readable but follows a device-writable one", i)
			}
			c.Readable = append(c.Readable, buf)
		}
		if flags&descFNext == 0 {
			return nil
		}
		i = uint64(next)
	}
}

// Unpop gives back the chain taken by the last Pop, unused: the next Pop
// returns it again. A device uses it when it cannot use the chain now (say, a
// receive buffer too small for the frame at hand, which it drops instead).
func (q *Queue) Unpop() { q.st.LastAvail-- }

// Push returns the chain with head to the driver through the used ring,
// saying the device wrote written bytes into its writable buffers. The
// transport raises the used-buffer interrupt afterwards.
func (q *Queue) Push(head uint16, written uint32) error {
	var elem [usedElemSize]byte
	binary.LittleEndian.PutUint32(elem[0:], uint32(head))
	binary.LittleEndian.PutUint32(elem[4:], written)
	slot := uint64(q.st.UsedIdx) % uint64(q.st.Size)
	if err := q.mem.Write(q.st.Device+ringHeaderBytes+usedElemSize*slot, elem[:]); err != nil {
		return malformed("used ring at %#x: %v", q.st.Device, err)
	}
	// The element is stored before the index that publishes it (x86 keeps
	// stores in order, and these are separate calls the compiler does not
	// reorder).
	q.st.UsedIdx++
	var idx [2]byte
	binary.LittleEndian.PutUint16(idx[:], q.st.UsedIdx)
	if err := q.mem.Write(q.st.Device+2, idx[:]); err != nil {
		return malformed("used ring at %#x: %v", q.st.Device, err)
	}
	q.used = true
	return nil
}
