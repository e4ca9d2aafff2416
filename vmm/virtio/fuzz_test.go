package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"golang.org/x/sys/unix"
)

// Fuzz layout: rings at fixed places, the rest of the first 64 KiB is
// fuzzed data that descriptors may point at.
const (
	fzDesc  = 0x10000
	fzAvail = 0x20000
	fzUsed  = 0x30000
	fzData  = 0x40000
)

// loadRings undoes what the last run wrote into mem, then copies fuzzed
// bytes into the descriptor table, available ring and data area, so that
// every run starts from the same memory.
func loadRings(t testing.TB, mem *watchedMemory, desc, avail, data []byte) {
	for _, w := range mem.writes {
		b, err := mem.Slice(w[0], w[1])
		if err != nil {
			t.Fatal(err)
		}
		clear(b)
	}
	mem.writes = mem.writes[:0]
	for _, a := range []struct {
		gpa uint64
		src []byte
	}{{fzDesc, desc}, {fzAvail, avail}, {fzUsed, nil}, {fzData, data}} {
		b, err := mem.Slice(a.gpa, 0x10000)
		if err != nil {
			t.Fatal(err)
		}
		clear(b)
		copy(b, a.src)
	}
}

// seedChain returns a descriptor table and available ring with one valid
// chain of the given descriptors (addr, len, flags), linked in order.
func seedChain(descs ...[3]uint64) (desc, avail []byte) {
	desc = make([]byte, descSize*len(descs))
	for i, d := range descs {
		e := desc[i*descSize:]
		binary.LittleEndian.PutUint64(e, d[0])
		binary.LittleEndian.PutUint32(e[8:], uint32(d[1]))
		flags := uint16(d[2])
		if i+1 < len(descs) {
			flags |= descFNext
		}
		binary.LittleEndian.PutUint16(e[12:], flags)
		binary.LittleEndian.PutUint16(e[14:], uint16(i+1))
	}
	avail = make([]byte, 8)
	binary.LittleEndian.PutUint16(avail[2:], 1) // idx 1, ring[0] = head 0
	return desc, avail
}

func blkSeed() (desc, avail, data []byte) {
	desc, avail = seedChain([3]uint64{fzData, 16, 0}, [3]uint64{fzData + 0x100, 512, descFWrite}, [3]uint64{fzData + 0x300, 1, descFWrite})
	data = make([]byte, 16)
	binary.LittleEndian.PutUint32(data, BlockTIn)
	return desc, avail, data
}

// FuzzQueuePop walks fuzzed chains with fuzzed ring indices and checks that
// Pop returns only buffers inside guest memory, never more descriptors
// than the queue size, and never moves on after an error.
func FuzzQueuePop(f *testing.F) {
	desc, avail, data := blkSeed()
	f.Add(uint8(8), uint16(0), desc, avail, data)
	loop, lavail := seedChain([3]uint64{fzData, 16, 0}, [3]uint64{fzData, 16, 0})
	binary.LittleEndian.PutUint16(loop[descSize+12:], descFNext) // 1 -> 0
	binary.LittleEndian.PutUint16(loop[descSize+14:], 0)
	f.Add(uint8(4), uint16(0), loop, lavail, data)
	f.Add(uint8(8), uint16(65535), desc, []byte{0, 0, 0, 0, 0, 0}, data)
	mem := &watchedMemory{Memory: newMemory(f)}
	f.Fuzz(func(t *testing.T, sizeLog uint8, lastAvail uint16, desc, avail, data []byte) {
		loadRings(t, mem, desc, avail, data)
		st := QueueState{Size: 1 << (sizeLog % 9), Ready: true, Desc: fzDesc, Driver: fzAvail, Device: fzUsed, LastAvail: lastAvail}
		if err := validateQueue(memoryRAM(mem), &st, DefaultQueueSize); err != nil {
			t.Fatalf("validateQueue(%+v) = %v", st, err)
		}
		q := &Queue{max: DefaultQueueSize, st: &st, mem: mem}
		for range 2 * int(st.Size) {
			before := st.LastAvail
			c, err := q.Pop()
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("Pop() = %v, want ErrMalformed", err)
				}
				if st.LastAvail != before {
					t.Fatalf("Pop failed but moved LastAvail %d -> %d", before, st.LastAvail)
				}
				return
			}
			if c == nil {
				return
			}
			if n := len(c.Readable) + len(c.Writable); n > int(st.Size) {
				t.Fatalf("chain of %d descriptors in a queue of %d", n, st.Size)
			}
			for _, b := range append(c.Readable, c.Writable...) {
				if len(b.Data) == 0 {
					continue
				}
				if _, err := mem.Slice(b.GPA, uint64(len(b.Data))); err != nil {
					t.Fatalf("buffer outside guest memory: %v", err)
				}
			}
			if err := q.Push(c.Head, 0); err != nil {
				t.Fatalf("Push: %v", err)
			}
		}
	})
}

// watchedMemory is real guest memory that remembers where the device
// wrote.
type watchedMemory struct {
	*mmu.Memory
	writes [][2]uint64
}

func (w *watchedMemory) Write(gpa uint64, p []byte) error {
	w.writes = append(w.writes, [2]uint64{gpa, uint64(len(p))})
	return w.Memory.Write(gpa, p)
}

func (w *watchedMemory) MarkDirty(gpa, n uint64) error {
	w.writes = append(w.writes, [2]uint64{gpa, n})
	return w.Memory.MarkDirty(gpa, n)
}

// startDevice runs the init sequence on tr with queue 0 at the fuzz
// layout.
func startDevice(t testing.TB, tr *Transport, size uint16) { startQueue(t, tr, 0, size) }

// startQueue runs the init sequence on tr with queue sel at the fuzz layout
// (and no other queue ready).
func startQueue(t testing.TB, tr *Transport, sel, size uint16) {
	w := func(off uint64, v uint32) {
		var b [4]byte
		binary.LittleEndian.PutUint32(b[:], v)
		if err := tr.Write(off, b[:]); err != nil {
			t.Fatalf("Write(%#x, %#x) = %v", off, v, err)
		}
	}
	w(regStatus, StatusAcknowledge|StatusDriver)
	w(regDriverFeaturesSel, 1)
	w(regDriverFeatures, 1) // VERSION_1
	w(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	w(regQueueSel, uint32(sel))
	w(regQueueNum, uint32(size))
	w(regQueueDescLow, fzDesc)
	w(regQueueDriverLow, fzAvail)
	w(regQueueDeviceLow, fzUsed)
	w(regQueueReady, 1)
	w(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
}

// FuzzBlockQueue serves fuzzed requests on a real disk file. The device
// must not panic, must write guest memory only in the used ring and in
// buffers the guest marked device-writable, and must keep the disk's size.
func FuzzBlockQueue(f *testing.F) {
	desc, avail, data := blkSeed()
	f.Add(uint8(8), desc, avail, data)
	binary.LittleEndian.PutUint32(data, BlockTOut)
	f.Add(uint8(8), desc, avail, data)
	binary.LittleEndian.PutUint32(data, BlockTGetID)
	f.Add(uint8(8), desc, avail, data)
	mem := &watchedMemory{Memory: newMemory(f)}
	disk := filepath.Join(f.TempDir(), "disk.img")
	if err := os.WriteFile(disk, make([]byte, 16*SectorSize), 0o644); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, sizeLog uint8, desc, avail, data []byte) {
		loadRings(t, mem, desc, avail, data)
		b, err := NewBlock(disk, false)
		if err != nil {
			t.Fatal(err)
		}
		tr := NewMMIO(b, mem, func() error { return nil })
		defer tr.Close()
		size := uint16(1) << (sizeLog % 9)
		startDevice(t, tr, size)
		start := len(mem.writes)
		var b4 [4]byte
		err = tr.Write(regQueueNotify, b4[:])
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrBadRequest) {
			t.Fatalf("notify = %v, want nil, ErrMalformed or ErrBadRequest", err)
		}
		// Every write lands in the used ring or inside a descriptor the
		// guest marked device-writable.
		allowed := [][2]uint64{{fzUsed, ringHeaderBytes + usedElemSize*uint64(size)}}
		table, _ := mem.Slice(fzDesc, descSize*uint64(size))
		for i := 0; i < len(table); i += descSize {
			if binary.LittleEndian.Uint16(table[i+12:])&descFWrite != 0 {
				allowed = append(allowed, [2]uint64{binary.LittleEndian.Uint64(table[i:]), uint64(binary.LittleEndian.Uint32(table[i+8:]))})
			}
		}
	writes:
		for _, w := range mem.writes[start:] {
			for _, a := range allowed {
				if w[0] >= a[0] && w[0]-a[0] <= a[1] && w[1] <= a[1]-(w[0]-a[0]) {
					continue writes
				}
			}
			t.Fatalf("device wrote [%#x, +%#x), outside the used ring and every writable descriptor", w[0], w[1])
		}
		if fi, err := os.Stat(disk); err != nil || fi.Size() != 16*SectorSize {
			t.Fatalf("disk size changed: %v %v", fi.Size(), err)
		}
	})
}

// writesConfined fails t if the device wrote guest memory (since write
// start of mem.writes) anywhere but the used ring of a queue of size and,
// if writable, the descriptors the guest marked device-writable.
func writesConfined(t *testing.T, mem *watchedMemory, start int, size uint16, writable bool) {
	t.Helper()
	allowed := [][2]uint64{{fzUsed, ringHeaderBytes + usedElemSize*uint64(size)}}
	if writable {
		table, _ := mem.Slice(fzDesc, descSize*uint64(size))
		for i := 0; i < len(table); i += descSize {
			if binary.LittleEndian.Uint16(table[i+12:])&descFWrite != 0 {
				allowed = append(allowed, [2]uint64{binary.LittleEndian.Uint64(table[i:]), uint64(binary.LittleEndian.Uint32(table[i+8:]))})
			}
		}
	}
writes:
	for _, w := range mem.writes[start:] {
		for _, a := range allowed {
			if w[0] >= a[0] && w[0]-a[0] <= a[1] && w[1] <= a[1]-(w[0]-a[0]) {
				continue writes
			}
		}
		t.Fatalf("device wrote [%#x, +%#x), outside the used ring and every writable descriptor (writable allowed: %v)", w[0], w[1], writable)
	}
}

// fuzzNet is a virtio-net device whose "tap" is one end of a SOCK_SEQPACKET
// socket pair, which keeps frame boundaries as a tap does: the test reads
// the frames the device transmits at the other end. (A real tap would hand
// fuzzed frames to the host's network stack.) The returned function, called
// once the device has stopped transmitting, closes the device and returns
// the frames, empty ones included (a tap refuses those; the pair passes
// them, so the count stays exact).
func fuzzNet(t *testing.T) (*Net, func() [][]byte) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Non-blocking, the device's end goes to Go's poller, so Close ends
	// its receive goroutine's pending Read.
	n := &Net{tapName: "fuzz-tap", tap: os.NewFile(uintptr(fds[0]), "fuzz-tap"), linkStatus: netStatusLinkUp, done: make(chan struct{})}
	copy(n.mac[:], []byte{0x02, 0, 0, 0, 0, 1})
	go n.receiveLoop()
	peer := fds[1]
	var frames [][]byte
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, NetMaxFrame+NetHeaderSize+1)
		for {
			k, err := unix.Read(peer, buf)
			switch {
			case err == nil:
				frames = append(frames, append([]byte(nil), buf[:k]...))
			case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
				// Nothing queued: done once the device is.
				select {
				case <-stop:
					return
				default:
					time.Sleep(20 * time.Microsecond)
				}
			default:
				t.Errorf("read the frames: %v", err)
				return
			}
		}
	}()
	return n, func() [][]byte {
		close(stop)
		<-done
		n.Close()
		unix.Close(peer)
		return frames
	}
}

// netSeed returns a chain of one header descriptor and one data
// descriptor (device-writable for receive) and the data: a header and a
// small frame.
func netSeed(writable bool) (desc, avail, data []byte) {
	var f uint64
	if writable {
		f = descFWrite
	}
	desc, avail = seedChain([3]uint64{fzData, NetHeaderSize, f}, [3]uint64{fzData + 0x100, 1514, f})
	data = make([]byte, 0x200)
	copy(data[0x100:], "\xff\xff\xff\xff\xff\xff\x02\x00\x00\x00\x00\x02\x88\xb5hello")
	return desc, avail, data
}

// FuzzNetQueues runs virtio-net's receive (place, with the backlog) or
// transmit (send) path over fuzzed rings. The device must not panic, must
// report only ErrMalformed or ErrBadRequest (and, once it needs a reset,
// refuse notifies), must write guest memory only
// in the used ring and, for receive, in device-writable buffers, must give
// a placed frame a used length of header plus frame, and must transmit
// only frames without their header, at most NetMaxFrame bytes, one per
// frame it counts.
func FuzzNetQueues(f *testing.F) {
	desc, avail, data := netSeed(true)
	f.Add(uint8(8), false, desc, avail, data, []byte("\xff\xff\xff\xff\xff\xff\x02\x00\x00\x00\x00\x02\x88\xb5hi"), uint8(2))
	f.Add(uint8(8), false, desc, avail, data, make([]byte, 2000), uint8(1)) // too big for the buffer
	desc, avail, data = netSeed(false)
	f.Add(uint8(8), true, desc, avail, data, []byte(nil), uint8(0))
	f.Add(uint8(8), false, desc, avail, data, []byte("x"), uint8(1)) // readable receive buffers
	// A transmit chain shorter than the header.
	short, savail := seedChain([3]uint64{fzData, 4, 0})
	f.Add(uint8(4), true, short, savail, data, []byte(nil), uint8(0))
	mem := &watchedMemory{Memory: newMemory(f)}
	f.Fuzz(func(t *testing.T, sizeLog uint8, transmit bool, desc, avail, data, frame []byte, deliveries uint8) {
		if len(frame) > NetMaxFrame {
			frame = frame[:NetMaxFrame]
		}
		loadRings(t, mem, desc, avail, data)
		n, sent := fuzzNet(t)
		tr := NewMMIO(n, mem, func() error { return nil })
		defer tr.Close()
		size := uint16(1) << (sizeLog % 9)
		queue := uint16(netRxQueue)
		if transmit {
			queue = netTxQueue
		}
		startQueue(t, tr, queue, size)
		start := len(mem.writes)
		okErr := func(what string, err error) {
			// A malformed ring sets DEVICE_NEEDS_RESET; from then on the
			// guest's notifies are refused.
			if errors.Is(err, ErrBadAccess) && tr.State().Status&StatusDeviceNeedsReset != 0 {
				return
			}
			if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrBadRequest) && !errors.Is(err, ErrInactive) {
				t.Fatalf("%s = %v, want nil, ErrMalformed, ErrBadRequest, ErrInactive or (after DEVICE_NEEDS_RESET) ErrBadAccess", what, err)
			}
		}
		var b4 [4]byte
		binary.LittleEndian.PutUint32(b4[:], uint32(queue))
		if transmit {
			okErr("transmit notify", tr.Write(regQueueNotify, b4[:]))
		} else {
			h := n.active.Load()
			if h == nil {
				t.Fatal("device not active after DRIVER_OK")
			}
			// Frames arrive as from the tap (possibly into the backlog),
			// then the guest notifies that it added buffers.
			for range deliveries % 4 {
				okErr("receive", h.Deliver(func() error { return n.receive(frame) }))
			}
			okErr("receive notify", tr.Write(regQueueNotify, b4[:]))
		}
		writesConfined(t, mem, start, size, !transmit)
		st := n.Stats()
		frames := sent()
		tr.Close()
		if transmit {
			if uint64(len(frames)) != st.TxFrames {
				t.Fatalf("%d frames reached the tap, %d counted", len(frames), st.TxFrames)
			}
			for _, fr := range frames {
				if len(fr) > NetMaxFrame {
					t.Fatalf("transmitted a %d-byte frame", len(fr))
				}
			}
			return
		}
		if len(frames) != 0 || st.TxFrames != 0 {
			t.Fatalf("receive transmitted %d frames", len(frames))
		}
		if st.RxFrames+st.RxDropped+st.RxBacklog > uint64(deliveries%4) {
			t.Fatalf("%d frames delivered, stats %+v", deliveries%4, st)
		}
		// Used elements of placed frames say header plus frame; those of
		// chains given back unused say 0.
		used, _ := mem.Slice(fzUsed, ringHeaderBytes+usedElemSize*uint64(size))
		idx := binary.LittleEndian.Uint16(used[2:])
		for i := uint16(0); i < idx && i < size; i++ {
			l := binary.LittleEndian.Uint32(used[ringHeaderBytes+usedElemSize*uint64(i)+4:])
			if l != 0 && l != uint32(NetHeaderSize+len(frame)) {
				t.Fatalf("used element %d has length %d, want 0 or %d", i, l, NetHeaderSize+len(frame))
			}
		}
	})
}

// FuzzMMIO drives the register interface with fuzzed accesses (offset,
// width, value) over guest memory holding fuzzed rings. It checks that
// nothing panics, the identity registers never change, and FEATURES_OK is
// never shown for features the device did not offer or without VERSION_1.
func FuzzMMIO(f *testing.F) {
	desc, avail, data := blkSeed()
	// A script that initialises the device and notifies queue 0: each op is
	// kind (0 read, 1 write), offset (2 bytes), width selector, value (4).
	var script []byte
	op := func(kind byte, off uint16, v uint32) {
		script = append(script, kind, byte(off), byte(off>>8), 2)
		script = binary.LittleEndian.AppendUint32(script, v)
	}
	op(1, regStatus, StatusAcknowledge|StatusDriver)
	op(1, regDriverFeaturesSel, 1)
	op(1, regDriverFeatures, 1)
	op(1, regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	op(1, regQueueNum, 8)
	op(1, regQueueDescLow, fzDesc)
	op(1, regQueueDriverLow, fzAvail)
	op(1, regQueueDeviceLow, fzUsed)
	op(1, regQueueReady, 1)
	op(1, regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
	op(1, regQueueNotify, 0)
	op(0, regInterruptStatus, 0)
	op(0, regConfig, 0)
	f.Add(script, desc, avail, data)
	mem := &watchedMemory{Memory: newMemory(f)}
	disk := filepath.Join(f.TempDir(), "disk.img")
	if err := os.WriteFile(disk, make([]byte, 16*SectorSize), 0o644); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, script, desc, avail, data []byte) {
		loadRings(t, mem, desc, avail, data)
		b, err := NewBlock(disk, false)
		if err != nil {
			t.Fatal(err)
		}
		offered := b.Features()
		tr := NewMMIO(b, mem, func() error { return nil })
		defer tr.Close()
		for len(script) >= 8 {
			kind, off, width, v := script[0], uint64(binary.LittleEndian.Uint16(script[1:])), script[3], script[4:8]
			script = script[8:]
			p := make([]byte, []int{1, 2, 4, 8, 3}[int(width)%5])
			copy(p, v)
			if kind%2 == 0 {
				tr.Read(off, p)
			} else {
				tr.Write(off, p)
			}
			st := tr.State()
			if st.Status&StatusFeaturesOK != 0 && (st.DriverFeatures&^offered != 0 || st.DriverFeatures&FeatureVersion1 == 0 || st.DriverFeaturesBeyond64) {
				t.Fatalf("FEATURES_OK with driver features %#x (offered %#x)", st.DriverFeatures, offered)
			}
			if st.Status&StatusDriverOK != 0 && st.Status&StatusFeaturesOK == 0 {
				t.Fatalf("DRIVER_OK without FEATURES_OK: %#x", st.Status)
			}
		}
		var m [4]byte
		if err := tr.Read(regMagicValue, m[:]); err != nil || binary.LittleEndian.Uint32(m[:]) != MagicValue {
			t.Fatalf("MagicValue = %x, %v", m, err)
		}
	})
}

// fuzzDisk writes a small disk file for the state fuzz targets.
func fuzzDisk(f *testing.F) string {
	disk := filepath.Join(f.TempDir(), "disk.img")
	data := make([]byte, 16*SectorSize)
	for i := range data {
		data[i] = byte(i / SectorSize)
	}
	if err := os.WriteFile(disk, data, 0o644); err != nil {
		f.Fatal(err)
	}
	return disk
}

// savedBlockState returns the state of a block device on disk, started at
// the fuzz layout with a queue of size 8, after serving the seed request.
func savedBlockState(f *testing.F, mem *watchedMemory, disk string) []byte {
	desc, avail, data := blkSeed()
	loadRings(f, mem, desc, avail, data)
	b, err := NewBlock(disk, false)
	if err != nil {
		f.Fatal(err)
	}
	tr := NewMMIO(b, mem, func() error { return nil })
	defer tr.Close()
	startDevice(f, tr, 8)
	if err := tr.Quiesce(); err != nil {
		f.Fatal(err)
	}
	state, err := tr.SaveState()
	if err != nil {
		f.Fatal(err)
	}
	return state
}

// savedNetState returns the encoding of a virtio-net state with both
// queues ready and two frames in the backlog.
func savedNetState(f *testing.F) []byte {
	s := TransportState{
		Status:         StatusAcknowledge | StatusDriver | StatusFeaturesOK | StatusDriverOK,
		DriverFeatures: FeatureVersion1 | NetFMAC | NetFStatus, InterruptStatus: InterruptUsedBuffer,
		Queues: []QueueState{
			{Size: 8, Ready: true, Desc: fzDesc, Driver: fzAvail, Device: fzUsed, LastAvail: 3, UsedIdx: 3},
			{Size: 8, Ready: true, Desc: fzDesc + 0x1000, Driver: fzAvail + 0x1000, Device: fzUsed + 0x1000, LastAvail: 65535, UsedIdx: 65534},
		},
	}
	ns := NetState{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, LinkStatus: netStatusLinkUp, Backlog: [][]byte{[]byte("frame one"), make([]byte, 60)}}
	dev, err := ns.AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	b, err := AppendTransportState(nil, DeviceIDNet, &s, dev)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzDecodeTransportState decodes fuzzed transport states. A state that
// decodes re-encodes to the same bytes, and so does its device body. A
// state restored into a fresh transport (virtio-blk on the disk the seed
// was saved from, or virtio-net) is refused with ErrBadState and nothing
// changed, or loads and saves back to the same bytes.
func FuzzDecodeTransportState(f *testing.F) {
	mem := &watchedMemory{Memory: newMemory(f)}
	disk := fuzzDisk(f)
	f.Add(savedBlockState(f, mem, disk))
	f.Add(savedNetState(f))
	f.Add([]byte("USVT\x01\x00\x02\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, id, body, err := DecodeTransportState(b)
		if err != nil {
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("DecodeTransportState() = %v, want ErrBadState", err)
			}
			return
		}
		again, err := AppendTransportState(nil, id, &s, body)
		if err != nil || !bytes.Equal(again, b) {
			t.Fatalf("re-encoded state differs (%v):\n%x\n%x", err, again, b)
		}
		var dev Device
		var done func() [][]byte
		switch id {
		case DeviceIDBlock:
			bs, err := DecodeBlockState(body)
			if err == nil {
				if enc, err := bs.AppendBinary(nil); err != nil || !bytes.Equal(enc, body) {
					t.Fatalf("re-encoded block state differs (%v)", err)
				}
			}
			blk, err := NewBlock(disk, false)
			if err != nil {
				t.Fatal(err)
			}
			dev = blk
		case DeviceIDNet:
			ns, err := DecodeNetState(body)
			if err == nil {
				if enc, err := ns.AppendBinary(nil); err != nil || !bytes.Equal(enc, body) {
					t.Fatalf("re-encoded net state differs (%v)", err)
				}
			}
			dev, done = fuzzNet(t)
		default:
			t.Fatalf("DecodeTransportState() returned device ID %d", id)
		}
		tr := NewMMIO(dev, mem, func() error { return nil })
		before := tr.State()
		// The check without a machine is LoadState's without the
		// device's backend: it never refuses what LoadState accepts.
		cerr := CheckTransportState(b, memoryRAM(mem))
		if cerr != nil && !errors.Is(cerr, ErrBadState) {
			t.Fatalf("CheckTransportState() = %v, want ErrBadState", cerr)
		}
		lerr := tr.LoadState(b)
		if lerr == nil && cerr != nil {
			t.Fatalf("LoadState() accepted what CheckTransportState refuses: %v", cerr)
		}
		if err := lerr; err != nil {
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("LoadState() = %v, want ErrBadState", err)
			}
			if got := tr.State(); !reflect.DeepEqual(got, before) || tr.Quiesced() {
				t.Fatalf("a refused state changed the transport: %+v", got)
			}
		} else {
			saved, err := tr.SaveState()
			if err != nil || !bytes.Equal(saved, b) {
				t.Fatalf("SaveState() after LoadState() = %v, %x; want the loaded bytes %x", err, saved, b)
			}
		}
		if done != nil {
			done() // stops the frame reader before the device's end closes
		}
		tr.Close()
	})
}

// FuzzDecodeBlockState decodes fuzzed virtio-blk states: what decodes
// re-encodes to the same bytes.
func FuzzDecodeBlockState(f *testing.F) {
	s := BlockState{Capacity: 16, DiskSize: 16*SectorSize + 7, ReadOnly: true, Fingerprint: [32]byte{1, 2, 3}}
	b, err := s.AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeBlockState(b)
		if err != nil {
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("DecodeBlockState() = %v, want ErrBadState", err)
			}
			return
		}
		if enc, err := s.AppendBinary(nil); err != nil || !bytes.Equal(enc, b) {
			t.Fatalf("re-encoded block state differs (%v)", err)
		}
	})
}

// FuzzDecodeNetState decodes fuzzed virtio-net states: what decodes
// re-encodes to the same bytes, with at most NetBacklog frames of at most
// NetMaxFrame bytes.
func FuzzDecodeNetState(f *testing.F) {
	s := NetState{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, LinkStatus: netStatusLinkUp, Backlog: [][]byte{[]byte("a frame"), {1}}}
	b, err := s.AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeNetState(b)
		if err != nil {
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("DecodeNetState() = %v, want ErrBadState", err)
			}
			return
		}
		if len(s.Backlog) > NetBacklog {
			t.Fatalf("decoded a backlog of %d frames", len(s.Backlog))
		}
		if enc, err := s.AppendBinary(nil); err != nil || !bytes.Equal(enc, b) {
			t.Fatalf("re-encoded net state differs (%v)", err)
		}
	})
}

// FuzzSaveRestore drives a virtio-blk transport through fuzzed register
// accesses over fuzzed rings (as FuzzMMIO does), then checkpoints it:
// every state a transport can reach quiesces, saves, and restores into a
// fresh transport on the same disk and memory, which saves the same bytes.
func FuzzSaveRestore(f *testing.F) {
	desc, avail, data := blkSeed()
	var script []byte
	op := func(off uint16, v uint32) {
		script = append(script, byte(off), byte(off>>8))
		script = binary.LittleEndian.AppendUint32(script, v)
	}
	op(regStatus, StatusAcknowledge|StatusDriver)
	op(regDriverFeaturesSel, 1)
	op(regDriverFeatures, 1)
	op(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK)
	op(regQueueNum, 8)
	op(regQueueDescLow, fzDesc)
	op(regQueueDriverLow, fzAvail)
	op(regQueueDeviceLow, fzUsed)
	op(regQueueReady, 1)
	op(regStatus, StatusAcknowledge|StatusDriver|StatusFeaturesOK|StatusDriverOK)
	f.Add(script, desc, avail, data)
	mem := &watchedMemory{Memory: newMemory(f)}
	disk := fuzzDisk(f)
	f.Fuzz(func(t *testing.T, script, desc, avail, data []byte) {
		loadRings(t, mem, desc, avail, data)
		b, err := NewBlock(disk, false)
		if err != nil {
			t.Fatal(err)
		}
		tr := NewMMIO(b, mem, func() error { return nil })
		defer tr.Close()
		for ; len(script) >= 6; script = script[6:] {
			var v [4]byte
			copy(v[:], script[2:6])
			tr.Write(uint64(binary.LittleEndian.Uint16(script))%regConfig, v[:])
		}
		if err := tr.Quiesce(); err != nil {
			t.Fatalf("Quiesce() = %v", err)
		}
		state, err := tr.SaveState()
		if err != nil {
			t.Fatalf("SaveState() of a reachable state = %v", err)
		}
		b2, err := NewBlock(disk, false)
		if err != nil {
			t.Fatal(err)
		}
		r := NewMMIO(b2, mem, func() error { return nil })
		defer r.Close()
		if err := r.LoadState(state); err != nil {
			t.Fatalf("LoadState() of a saved state = %v", err)
		}
		if got, want := r.State(), tr.State(); !reflect.DeepEqual(got, want) {
			t.Fatalf("restored state %+v, want %+v", got, want)
		}
		if again, err := r.SaveState(); err != nil || !bytes.Equal(again, state) {
			t.Fatalf("restored transport saves %v, other bytes", err)
		}
	})
}
