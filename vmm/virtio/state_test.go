package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"golang.org/x/sys/unix"
)

// capture quiesces the driver's transport, saves its state and resumes it,
// as a checkpoint does.
func (d *testDriver) capture() []byte {
	d.t.Helper()
	if err := d.tr.Quiesce(); err != nil {
		d.t.Fatalf("Quiesce() = %v", err)
	}
	b, err := d.tr.SaveState()
	if err != nil {
		d.t.Fatalf("SaveState() = %v", err)
	}
	return b
}

// restored builds what a restore on another host builds: fresh guest
// memory holding a copy of d's, a transport in front of dev over it, the
// state loaded into it, and a test driver that continues where d was.
// The transport is left quiesced.
func (d *testDriver) restored(dev Device, state []byte) *testDriver {
	d.t.Helper()
	r := newDriver(d.t, dev)
	copy(r.mem.Backing(), d.mem.Backing())
	if err := r.tr.LoadState(state); err != nil {
		d.t.Fatalf("LoadState() = %v", err)
	}
	for _, q := range d.queues {
		c := *q
		r.queues = append(r.queues, &c)
	}
	r.next = d.next
	return r
}

// copyDisk copies the disk file at path to a new temporary file.
func copyDisk(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "copy.img")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func newBlock(t *testing.T, path string, readOnly bool) *Block {
	t.Helper()
	b, err := NewBlock(path, readOnly)
	if err != nil {
		t.Fatalf("NewBlock(%q) = %v", path, err)
	}
	return b
}

// reencode decodes a transport state and its device body and encodes them
// again; a valid state comes back byte for byte.
func reencode(t testing.TB, b []byte) []byte {
	t.Helper()
	s, id, body, err := DecodeTransportState(b)
	if err != nil {
		t.Fatalf("DecodeTransportState() = %v", err)
	}
	var dev []byte
	switch id {
	case DeviceIDBlock:
		bs, err := DecodeBlockState(body)
		if err != nil {
			t.Fatalf("DecodeBlockState() = %v", err)
		}
		dev, err = bs.AppendBinary(nil)
		if err != nil {
			t.Fatalf("BlockState.AppendBinary() = %v", err)
		}
	case DeviceIDNet:
		ns, err := DecodeNetState(body)
		if err != nil {
			t.Fatalf("DecodeNetState() = %v", err)
		}
		dev, err = ns.AppendBinary(nil)
		if err != nil {
			t.Fatalf("NetState.AppendBinary() = %v", err)
		}
	}
	out, err := AppendTransportState(nil, id, &s, dev)
	if err != nil {
		t.Fatalf("AppendTransportState() = %v", err)
	}
	return out
}

// A virtio-blk transport saved after some requests restores on another
// "host" (fresh memory, a copy of the disk) and goes on serving requests
// where it was: same registers and queue indices, and the driver sees the
// used ring continue.
func TestBlockStateRoundTrip(t *testing.T) {
	path := newDisk(t)
	d, b := newBlockDriver(t, path, false)
	payload := bytes.Repeat([]byte{0xab}, 1024)
	if _, st, err := d.request(d.chain(buf{data: append(blkHeader(BlockTOut, 7), payload...)}, buf{n: 1, write: true})); err != nil || st != BlockSOK {
		t.Fatalf("write: status %d, %v", st, err)
	}
	d.mustWrite(regQueueSel, 0) // registers with non-zero values
	d.mustWrite(regDeviceFeaturesSel, 1)
	state := d.capture()
	if !bytes.Equal(reencode(t, state), state) {
		t.Errorf("decoded and re-encoded state differs from SaveState's")
	}
	bs := mustDecodeBlock(t, state)
	if bs.Capacity != diskSectors || bs.ReadOnly || bs.DiskSize != diskSectors*SectorSize || b.Capacity() != diskSectors {
		t.Errorf("block state = %+v, want %d sectors, writable, %d bytes", bs, diskSectors, diskSectors*SectorSize)
	}
	if err := d.tr.Resume(); err != nil {
		t.Fatalf("Resume() = %v", err)
	}

	r := d.restored(newBlock(t, copyDisk(t, path), false), state)
	if got, want := r.tr.State(), d.tr.State(); !reflect.DeepEqual(got, want) {
		t.Errorf("restored transport state = %+v, want %+v", got, want)
	}
	if !r.tr.Quiesced() {
		t.Errorf("a restored transport is not quiesced before Resume")
	}
	if err := r.tr.Resume(); err != nil {
		t.Fatalf("Resume() after restore = %v", err)
	}
	ds := r.chain(buf{data: blkHeader(BlockTIn, 7)}, buf{n: 1024, write: true}, buf{n: 1, write: true})
	u, st, err := r.request(ds)
	if err != nil || st != BlockSOK || u.len != 1025 {
		t.Fatalf("read after restore: status %d len %d err %v", st, u.len, err)
	}
	if got := r.slice(ds[1].addr, 1024); !bytes.Equal(got, payload) {
		t.Errorf("read after restore = %x..., want the data written before the capture", got[:8])
	}
	if got := r.tr.State().Queues[0]; got.LastAvail != 2 || got.UsedIdx != 2 {
		t.Errorf("restored queue indices = %d/%d, want 2/2 (one request before the capture, one after)", got.LastAvail, got.UsedIdx)
	}
}

func mustDecodeBlock(t *testing.T, state []byte) BlockState {
	t.Helper()
	_, id, body, err := DecodeTransportState(state)
	if err != nil || id != DeviceIDBlock {
		t.Fatalf("DecodeTransportState() = device %d, %v", id, err)
	}
	bs, err := DecodeBlockState(body)
	if err != nil {
		t.Fatalf("DecodeBlockState() = %v", err)
	}
	return bs
}

// A block request the guest made available but had not notified when the
// machine paused is complete before the capture: on the disk, in the used
// ring, interrupt raised, and its read data dirty in guest memory (so a
// checkpoint carries it).
func TestBlockRequestInFlightAtPause(t *testing.T) {
	path := newDisk(t)
	d, _ := newBlockDriver(t, path, false)
	payload := bytes.Repeat([]byte("in flight"), 512/9+1)[:512]
	write := d.chain(buf{data: append(blkHeader(BlockTOut, 20), payload...)}, buf{n: 1, write: true})
	d.next = 0x300000 // the read lands in pages nothing else touched
	read := d.chain(buf{data: blkHeader(BlockTIn, 5)}, buf{n: 4096, write: true}, buf{n: 1, write: true})
	d.submit(0, write)
	d.submit(0, read) // made available; the vCPU paused before it notified

	bitmap := make([]uint64, d.mem.BitmapWords())
	if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
		t.Fatal(err)
	}
	clear(bitmap)
	irqs := d.irqs.Load()
	state := d.capture()

	if got := d.takeUsed(0); len(got) != 2 {
		t.Fatalf("used entries after Quiesce = %v, want both requests", got)
	}
	if d.irqs.Load() == irqs || d.read(regInterruptStatus)&InterruptUsedBuffer == 0 {
		t.Errorf("no used-buffer interrupt raised by Quiesce")
	}
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file[20*512:21*512], payload) {
		t.Errorf("the write made available before the pause is not on the disk")
	}
	if got := d.slice(read[1].addr, 4096); !bytes.Equal(got[:512], bytes.Repeat([]byte{5}, 512)) || got[512] != 6 {
		t.Errorf("the read made available before the pause did not land: %x...", got[:8])
	}
	if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
		t.Fatal(err)
	}
	for _, gpa := range []uint64{read[1].addr, read[2].addr, d.queues[0].used} {
		if p := gpa / 4096; bitmap[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("page of %#x, written by the completed request, is not in the VMM dirty set", gpa)
		}
	}
	s, _, _, err := DecodeTransportState(state)
	if err != nil {
		t.Fatal(err)
	}
	if q := s.Queues[0]; q.LastAvail != 2 || q.UsedIdx != 2 || s.InterruptStatus&InterruptUsedBuffer == 0 {
		t.Errorf("captured queue %+v, interrupt status %#x: want both requests used and the interrupt pending", q, s.InterruptStatus)
	}
	// The captured fingerprint is the disk's content after the write.
	fp, err := NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	if got := mustDecodeBlock(t, state).Fingerprint; got != fp.Root() {
		t.Errorf("captured fingerprint %x, want the disk's after the write %x", got[:8], fp.Root())
	}
	if err := d.tr.Flush(); err != nil {
		t.Errorf("Flush() = %v", err)
	}
	if err := d.tr.Resume(); err != nil {
		t.Errorf("Resume() = %v", err)
	}
}

// A request made available while the transport is quiesced for a restore
// is served when Resume kicks the queue, without a notify.
func TestResumeKicksQueues(t *testing.T) {
	path := newDisk(t)
	d, _ := newBlockDriver(t, path, false)
	state := d.capture()
	r := d.restored(newBlock(t, copyDisk(t, path), false), state)
	ds := r.chain(buf{data: blkHeader(BlockTIn, 9)}, buf{n: 512, write: true}, buf{n: 1, write: true})
	r.submit(0, ds)
	if got := r.takeUsed(0); len(got) != 0 {
		t.Fatalf("a quiesced transport served %v", got)
	}
	irqs := r.irqs.Load()
	if err := r.tr.Resume(); err != nil {
		t.Fatalf("Resume() = %v", err)
	}
	if got := r.takeUsed(0); len(got) != 1 || r.slice(ds[1].addr, 1)[0] != 9 {
		t.Fatalf("after Resume: used %v, data %d; want the request served", got, r.slice(ds[1].addr, 1)[0])
	}
	if r.irqs.Load() == irqs {
		t.Errorf("Resume served a request but raised no interrupt")
	}
}

// SaveState refuses a transport that was not quiesced.
func TestSaveStateNeedsQuiesce(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	if _, err := d.tr.SaveState(); !errors.Is(err, ErrNotQuiesced) {
		t.Errorf("SaveState() on a running transport = %v, want ErrNotQuiesced", err)
	}
}

// The fingerprint after writes, kept up to date chunk by chunk, equals a
// fresh fingerprint of the whole disk.
func TestFingerprintIncremental(t *testing.T) {
	const size = 5*FingerprintChunk + 1000 // a short last chunk, an odd tree
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	fp, err := NewFingerprint(bytes.NewReader(data), size)
	if err != nil {
		t.Fatal(err)
	}
	root := fp.Root()
	if fp.Chunks() != 6 || fp.Size() != size {
		t.Errorf("chunks %d size %d, want 6, %d", fp.Chunks(), fp.Size(), size)
	}
	for _, off := range []int{0, 3*FingerprintChunk + 5, size - 1} {
		data[off]++
		var written [1]uint64
		written[0] = 1 << (off / FingerprintChunk)
		if err := fp.Update(bytes.NewReader(data), written[:]); err != nil {
			t.Fatal(err)
		}
		full, err := NewFingerprint(bytes.NewReader(data), size)
		if err != nil {
			t.Fatal(err)
		}
		if fp.Root() != full.Root() || fp.Root() == root {
			t.Errorf("after a write at %d: incremental root %x, full %x, before %x", off, fp.Root(), full.Root(), root)
		}
		root = fp.Root()
	}
	// Same content, another size: another fingerprint.
	other, err := NewFingerprint(bytes.NewReader(append(data, 0)), size+1)
	if err != nil {
		t.Fatal(err)
	}
	if other.Root() == root {
		t.Errorf("a disk one zero byte longer has the same fingerprint")
	}
	empty, err := NewFingerprint(bytes.NewReader(nil), 0)
	if err != nil || empty.Chunks() != 0 {
		t.Fatalf("fingerprint of an empty disk: %v, %d chunks", err, empty.Chunks())
	}
}

// The block device's fingerprint follows the guest's writes: after a
// write the saved fingerprint is the whole disk's, and only the written
// chunk was read again.
func TestBlockFingerprintFollowsWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "big.img")
	if err := os.WriteFile(path, make([]byte, 4*FingerprintChunk), 0o644); err != nil {
		t.Fatal(err)
	}
	d, b := newBlockDriver(t, path, false)
	d.capture()
	if err := d.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	ds := d.chain(buf{data: append(blkHeader(BlockTOut, 2*FingerprintChunk/SectorSize), bytes.Repeat([]byte{1}, 512)...)}, buf{n: 1, write: true})
	if _, st, err := d.request(ds); err != nil || st != BlockSOK {
		t.Fatalf("write: %d, %v", st, err)
	}
	if want := []uint64{1 << 2}; !reflect.DeepEqual(b.written, want) {
		t.Errorf("written chunks = %b, want %b", b.written, want)
	}
	state := d.capture()
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	full, err := NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	if got := mustDecodeBlock(t, state).Fingerprint; got != full.Root() {
		t.Errorf("saved fingerprint %x, want %x", got[:8], full.Root())
	}
	if b.written[0] != 0 {
		t.Errorf("written chunks not cleared by the capture: %b", b.written)
	}
}

// patch returns a copy of state with f applied to its decoded transport
// state, re-encoded (for refusals that a valid encoding can carry).
func patch(t *testing.T, state []byte, f func(s *TransportState)) []byte {
	t.Helper()
	s, id, body, err := DecodeTransportState(state)
	if err != nil {
		t.Fatal(err)
	}
	f(&s)
	out, err := AppendTransportState(nil, id, &s, body)
	if err != nil {
		t.Fatalf("AppendTransportState() = %v", err)
	}
	return out
}

// Restore refuses what cannot be, with one error wrapping ErrBadState, and
// leaves the transport and device as they were: the good state loads into
// them afterwards.
func TestLoadStateRefuses(t *testing.T) {
	path := newDisk(t)
	d, _ := newBlockDriver(t, path, false)
	state := d.capture()
	queueOff := transportStateFixed // queue 0's record

	other := filepath.Join(t.TempDir(), "other.img") // same size, one byte differs
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data[12345]++
	if err := os.WriteFile(other, data, 0o644); err != nil {
		t.Fatal(err)
	}
	longer := filepath.Join(t.TempDir(), "longer.img")
	if err := os.WriteFile(longer, append(data, make([]byte, SectorSize)...), 0o644); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name  string
		state []byte
		disk  string // default: a copy of the disk
		ro    bool
	}{
		{name: "next available more than the queue size ahead of next used", state: func() []byte {
			b := bytes.Clone(state)
			binary.LittleEndian.PutUint16(b[queueOff+4:], binary.LittleEndian.Uint16(b[queueOff+6:])+DefaultQueueSize+1)
			return b
		}()},
		{name: "descriptor table outside guest memory", state: patch(t, state, func(s *TransportState) { s.Queues[0].Desc = testMemory })},
		{name: "used ring across the end of guest memory", state: patch(t, state, func(s *TransportState) { s.Queues[0].Device = testMemory - 64 })},
		{name: "queue larger than the device offers", state: patch(t, state, func(s *TransportState) { s.Queues[0].Size = 2 * DefaultQueueSize })},
		{name: "feature never offered", state: patch(t, state, func(s *TransportState) { s.DriverFeatures |= 1 << 40 })},
		{name: "another device type", state: func() []byte {
			b := bytes.Clone(state)
			binary.LittleEndian.PutUint16(b[6:], DeviceIDNet)
			return b
		}()},
		{name: "disk of another size", state: state, disk: longer},
		{name: "disk with another fingerprint", state: state, disk: other},
		{name: "disk attached read-only", state: state, ro: true},
		{name: "truncated", state: state[:len(state)-1]},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			disk := c.disk
			if disk == "" {
				disk = copyDisk(t, path)
			}
			b := newBlock(t, disk, c.ro)
			r := newDriver(t, b)
			copy(r.mem.Backing(), d.mem.Backing())
			before := r.tr.State()
			err := r.tr.LoadState(c.state)
			if !errors.Is(err, ErrBadState) {
				t.Fatalf("LoadState() = %v, want an error wrapping ErrBadState", err)
			}
			t.Logf("refused: %v", err)
			// The check without a machine (CheckTransportState, the same
			// code) refuses the same states with the same reason, but
			// for those that only the device can refuse.
			backend := c.disk != "" || c.ro
			cerr := CheckTransportState(c.state, memoryRAM(r.mem))
			switch {
			case backend && cerr != nil:
				t.Errorf("CheckTransportState() = %v, want nil: only the device's backend differs", cerr)
			case !backend && !errors.Is(cerr, ErrBadState):
				t.Errorf("CheckTransportState() = %v, want a refusal like LoadState's %q", cerr, err)
			case !backend && c.name != "another device type" && !strings.HasSuffix(err.Error(), cerr.Error()):
				// (Another type: the body does not decode as its device's.)
				t.Errorf("CheckTransportState() = %v, want LoadState's refusal %q", cerr, err)
			}
			if got := r.tr.State(); !reflect.DeepEqual(got, before) || r.tr.Quiesced() || b.h != nil || b.fp != nil {
				t.Errorf("a refused state changed the transport: %+v (quiesced %v), want %+v", got, r.tr.Quiesced(), before)
			}
			if c.disk == "" && !c.ro {
				if err := r.tr.LoadState(state); err != nil {
					t.Errorf("LoadState(good state) after a refusal = %v", err)
				}
			}
		})
	}

	// A missing disk is refused before there is a device to restore into.
	if _, err := NewBlock(filepath.Join(t.TempDir(), "missing.img"), false); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("NewBlock(missing) = %v, want ErrNotExist", err)
	}
	// A transport the guest already uses is refused too.
	if err := d.tr.LoadState(state); !errors.Is(err, ErrBadState) {
		t.Errorf("LoadState() into a transport in use = %v, want ErrBadState", err)
	}
}

// A frame received while the machine is paused waits in the backlog (guest
// memory does not change during the capture), travels in the state with
// the MAC, and is placed into the guest's receive buffer after the restore
// on another tap, where the device keeps the guest's MAC.
func TestNetStateRoundTrip(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	d.postRx(1, 1526)
	if err := d.tr.Quiesce(); err != nil {
		t.Fatal(err)
	}
	want := frame(guestMAC, hostMAC, "sent during the pause")
	ps.send(want)
	testutil.WaitFor(t, "the frame held in the backlog", func() bool { return n.Stats().RxBacklog == 1 })
	if got := d.takeUsed(netRxQueue); len(got) != 0 {
		t.Fatalf("a quiesced device placed a frame: %v", got)
	}
	state, err := d.tr.SaveState()
	if err != nil {
		t.Fatalf("SaveState() = %v", err)
	}
	if !bytes.Equal(reencode(t, state), state) {
		t.Errorf("decoded and re-encoded state differs from SaveState's")
	}
	_, id, body, err := DecodeTransportState(state)
	if err != nil || id != DeviceIDNet {
		t.Fatalf("DecodeTransportState() = %d, %v", id, err)
	}
	ns, err := DecodeNetState(body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ns.MAC, guestMAC) || ns.LinkStatus != netStatusLinkUp || len(ns.Backlog) != 1 || !bytes.Equal(ns.Backlog[0], want) {
		t.Errorf("net state = MAC %v link %d backlog %d frames, want %v, up, the held frame", ns.MAC, ns.LinkStatus, len(ns.Backlog), guestMAC)
	}

	tap2 := makeTunTap(t, unix.IFF_TAP)
	n2, err := NewNet(tap2, hostMAC) // the MAC given on the new host is replaced by the guest's
	if err != nil {
		t.Fatal(err)
	}
	r := d.restored(n2, state)
	var mac [6]byte
	if err := r.tr.Read(regConfig, mac[:4]); err != nil {
		t.Fatal(err)
	}
	if err := r.tr.Read(regConfig+4, mac[4:]); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mac[:], guestMAC) || !bytes.Equal(n2.MAC(), guestMAC) {
		t.Errorf("restored MAC = %x, want the guest's %v", mac, guestMAC)
	}
	if err := r.tr.Resume(); err != nil {
		t.Fatalf("Resume() = %v", err)
	}
	used := r.waitUsed(netRxQueue, 1)
	got := r.slice(r.queues[netRxQueue].desc, descSize) // the one posted buffer is descriptor 0
	addr := binary.LittleEndian.Uint64(got)
	if data := r.slice(addr+NetHeaderSize, uint64(used[0].len)-NetHeaderSize); !bytes.Equal(data, want) {
		t.Errorf("after restore the guest received %q, want the held frame %q", data, want)
	}
	// The original goes on too once resumed.
	if err := d.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	d.waitUsed(netRxQueue, 1)
}

// Every byte the devices write into guest memory is in the VMM dirty set:
// guest memory before and after a device's work differs only in dirty
// pages. Covers block reads, GET_ID, status bytes, used rings, network
// receive, and the work Quiesce and Resume do.
func TestDeviceWritesAreDirty(t *testing.T) {
	check := func(t *testing.T, d *testDriver, what string, work func()) {
		t.Helper()
		bitmap := make([]uint64, d.mem.BitmapWords())
		if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
			t.Fatal(err)
		}
		clear(bitmap)
		before := bytes.Clone(d.mem.Backing())
		work()
		if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
			t.Fatal(err)
		}
		after := d.mem.Backing()
		changed := 0
		for p := 0; p < len(after)/4096; p++ {
			if bytes.Equal(before[p*4096:(p+1)*4096], after[p*4096:(p+1)*4096]) {
				continue
			}
			changed++
			if bitmap[p/64]&(1<<(p%64)) == 0 {
				t.Errorf("%s: page %#x changed but is not in the VMM dirty set", what, p*4096)
			}
		}
		if changed == 0 {
			t.Errorf("%s changed no page", what)
		}
	}
	t.Run("block", func(t *testing.T) {
		d, _ := newBlockDriver(t, newDisk(t), false)
		// The driver's own writes (descriptors, data) happen before the
		// work; only the device's writes happen inside it.
		read := d.chain(buf{data: blkHeader(BlockTIn, 3)}, buf{n: 8192, write: true}, buf{n: 1, write: true})
		d.submit(0, read)
		check(t, d, "block read", func() { d.notify(0) })
		id := d.chain(buf{data: blkHeader(BlockTGetID, 0)}, buf{n: BlockIDBytes, write: true}, buf{n: 1, write: true})
		d.submit(0, id)
		check(t, d, "block GET_ID", func() { d.notify(0) })
		read = d.chain(buf{data: blkHeader(BlockTIn, 4)}, buf{n: 512, write: true}, buf{n: 1, write: true})
		d.submit(0, read)
		check(t, d, "block read completed by Quiesce", func() { d.tr.Quiesce() })
		d.tr.Resume()
		d.capture()
		read = d.chain(buf{data: blkHeader(BlockTIn, 5)}, buf{n: 512, write: true}, buf{n: 1, write: true})
		d.submit(0, read)
		check(t, d, "block read served by Resume", func() { d.tr.Resume() })
	})
	t.Run("net", func(t *testing.T) {
		tap := makeTunTap(t, unix.IFF_TAP)
		d, n := newNetDriver(t, tap)
		ps := newPacketSocket(t, tap)
		d.postRx(1, 1526)
		check(t, d, "net receive", func() {
			ps.send(frame(guestMAC, hostMAC, "dirty"))
			d.waitUsed(netRxQueue, 1)
		})
		d.tr.Quiesce()
		ps.send(frame(guestMAC, hostMAC, "held"))
		testutil.WaitFor(t, "the held frame", func() bool { return n.Stats().RxBacklog == 1 })
		d.postRx(1, 1526) // a notify while quiesced waits for Resume
		if got := d.takeUsed(netRxQueue); len(got) != 0 {
			t.Fatalf("a quiesced device placed a frame on notify: %v", got)
		}
		check(t, d, "net backlog placed by Resume", func() {
			d.tr.Resume()
			d.waitUsed(netRxQueue, 1)
		})
	})
}

// The fingerprint's cost: a full one of a 64 MiB disk (the first capture,
// and every restore), and an update after 16 chunks were written (a
// checkpoint after 1 MiB of scattered writes).
func BenchmarkFingerprint(b *testing.B) {
	const size = 64 << 20
	path := filepath.Join(b.TempDir(), "disk.img")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i ^ i>>9)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		b.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	b.Run("full-64MiB", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			if _, err := NewFingerprint(f, size); err != nil {
				b.Fatal(err)
			}
		}
	})
	fp, err := NewFingerprint(f, size)
	if err != nil {
		b.Fatal(err)
	}
	written := make([]uint64, size/FingerprintChunk/64)
	for i := range 16 {
		c := i * 61 % (size / FingerprintChunk)
		written[c/64] |= 1 << (c % 64)
	}
	b.Run("update-16-chunks", func(b *testing.B) {
		b.SetBytes(16 * FingerprintChunk)
		for b.Loop() {
			if err := fp.Update(f, written); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// The cost of one checkpoint's device work for a virtio-blk transport with
// nothing in flight and nothing written: Quiesce, SaveState, Resume.
func BenchmarkBlockCheckpoint(b *testing.B) {
	path := filepath.Join(b.TempDir(), "disk.img")
	if err := os.WriteFile(path, make([]byte, 64<<20), 0o644); err != nil {
		b.Fatal(err)
	}
	blk, err := NewBlock(path, false)
	if err != nil {
		b.Fatal(err)
	}
	tr := NewMMIO(blk, newMemory(b), nil)
	defer tr.Close()
	startQueue(b, tr, 0, 64)
	for b.Loop() {
		if err := tr.Quiesce(); err != nil {
			b.Fatal(err)
		}
		if _, err := tr.SaveState(); err != nil {
			b.Fatal(err)
		}
		if err := tr.Resume(); err != nil {
			b.Fatal(err)
		}
	}
}

// After a restore, Resume raises an interrupt the state shows pending (the
// new machine's interrupt controller never saw it); after a checkpoint it
// raises none the guest has not already had.
func TestResumeRaisesPendingInterrupt(t *testing.T) {
	path := newDisk(t)
	d, _ := newBlockDriver(t, path, false)
	d.request(d.chain(buf{data: blkHeader(BlockTIn, 1)}, buf{n: 512, write: true}, buf{n: 1, write: true}))
	// The guest has not acknowledged the interrupt yet.
	state := d.capture()
	irqs := d.irqs.Load()
	if err := d.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	if got := d.irqs.Load(); got != irqs {
		t.Errorf("Resume after a checkpoint raised %d interrupts, want none", got-irqs)
	}
	r := d.restored(newBlock(t, copyDisk(t, path), false), state)
	if err := r.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	if got := r.irqs.Load(); got != 1 {
		t.Errorf("Resume after a restore with an interrupt pending raised %d interrupts, want 1", got)
	}
	if s := r.ackInterrupt(); s != InterruptUsedBuffer {
		t.Errorf("restored InterruptStatus = %#x, want the used-buffer bit", s)
	}
}

// Announce puts a RARP frame from the guest's MAC (the restored one) on the
// tap, as QEMU does after a migration.
func TestNetAnnounce(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, _ := newNetDriver(t, tap)
	state := d.capture()
	tap2 := makeTunTap(t, unix.IFF_TAP)
	ps := newPacketSocket(t, tap2)
	n2, err := NewNet(tap2, hostMAC)
	if err != nil {
		t.Fatal(err)
	}
	d.restored(n2, state)
	if err := n2.Announce(); err != nil {
		t.Fatalf("Announce() = %v", err)
	}
	buf := make([]byte, 2048)
	for range 50 {
		k, _, err := unix.Recvfrom(ps.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		f := buf[:k]
		if k < 42 || binary.BigEndian.Uint16(f[12:]) != etherTypeRARP {
			continue
		}
		broadcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		if !bytes.Equal(f[0:6], broadcast) || !bytes.Equal(f[6:12], guestMAC) ||
			binary.BigEndian.Uint16(f[20:]) != rarpRequestRev || !bytes.Equal(f[22:28], guestMAC) || !bytes.Equal(f[32:38], guestMAC) {
			t.Fatalf("announce frame %x: want a broadcast RARP request-reverse from and for %v", f, guestMAC)
		}
		return
	}
	t.Fatalf("no RARP frame on the tap")
}
