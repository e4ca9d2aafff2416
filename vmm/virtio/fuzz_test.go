package virtio

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/understudy-vmm/understudy/mmu"
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
		if err := validateQueue(mem, &st, DefaultQueueSize); err != nil {
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

// startDevice runs the init sequence on tr with one queue at the fuzz
// layout.
func startDevice(t *testing.T, tr *Transport, size uint16) {
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
	w(regQueueSel, 0)
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
