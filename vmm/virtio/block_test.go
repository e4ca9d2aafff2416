package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

const diskSectors = 64

// newDisk writes a disk file of diskSectors sectors, sector i filled with
// byte i, and returns its path.
func newDisk(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	data := make([]byte, diskSectors*SectorSize)
	for i := range data {
		data[i] = byte(i / SectorSize)
	}
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func newBlockDriver(t *testing.T, path string, readOnly bool) (*testDriver, *Block) {
	t.Helper()
	b, err := NewBlock(path, readOnly)
	if err != nil {
		t.Fatalf("NewBlock(%q, %v) = %v", path, readOnly, err)
	}
	d := newDriver(t, b)
	d.init(DefaultQueueSize)
	return d, b
}

func blkHeader(typ uint32, sector uint64) []byte {
	h := make([]byte, blockHeaderSize)
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

// request submits one chain, notifies, and returns the used entry and the
// status byte (the last byte of the last writable descriptor).
func (d *testDriver) request(ds []desc) (usedElem, byte, error) {
	d.t.Helper()
	head := d.submit(0, ds)
	err := d.notify(0)
	used := d.takeUsed(0)
	if len(used) != 1 {
		d.t.Fatalf("after notify: %d used entries, want 1 (notify error: %v)", len(used), err)
	}
	if used[0].id != uint32(head) {
		d.t.Fatalf("used id = %d, want head %d", used[0].id, head)
	}
	last := ds[len(ds)-1]
	return used[0], d.slice(last.addr+uint64(last.len)-1, 1)[0], err
}

func TestBlockConfigAndFeatures(t *testing.T) {
	d, b := newBlockDriver(t, newDisk(t), false)
	if got := d.read(regDeviceID); got != DeviceIDBlock {
		t.Errorf("DeviceID = %d, want %d", got, DeviceIDBlock)
	}
	if got := d.read(regVendorID); got != VendorID {
		t.Errorf("VendorID = %#x, want %#x", got, VendorID)
	}
	f := d.deviceFeatures()
	if f&FeatureVersion1 == 0 || f&BlockFFlush == 0 || f&BlockFRO != 0 {
		t.Errorf("features = %#x, want VERSION_1|FLUSH and no RO", f)
	}
	var capb [8]byte
	if err := d.tr.Read(regConfig, capb[:]); err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(capb[:]); got != diskSectors || b.Capacity() != diskSectors {
		t.Errorf("capacity = %d (Capacity() %d), want %d", got, b.Capacity(), diskSectors)
	}
	// Narrow config reads work; beyond the config reads zero.
	var one [1]byte
	if err := d.tr.Read(regConfig, one[:]); err != nil || one[0] != diskSectors {
		t.Errorf("1-byte config read = %d, %v; want %d", one[0], err, diskSectors)
	}
	var hi [4]byte
	if err := d.tr.Read(regConfig+0x200, hi[:]); err != nil || hi != [4]byte{} {
		t.Errorf("config read past the end = %v, %v; want zeros", hi, err)
	}
}

func TestBlockReadWriteFlushGetID(t *testing.T) {
	path := newDisk(t)
	d, _ := newBlockDriver(t, path, false)

	// Read sectors 3 and 4 into two data descriptors.
	ds := d.chain(buf{data: blkHeader(BlockTIn, 3)}, buf{n: 512, write: true}, buf{n: 512, write: true}, buf{n: 1, write: true})
	u, st, err := d.request(ds)
	if err != nil || st != BlockSOK || u.len != 1025 {
		t.Fatalf("read: status %d len %d err %v; want OK, 1025", st, u.len, err)
	}
	if got := d.slice(ds[1].addr, 512); !bytes.Equal(got, bytes.Repeat([]byte{3}, 512)) {
		t.Errorf("sector 3 read %x..., want 03...", got[:8])
	}
	if got := d.slice(ds[2].addr, 512); !bytes.Equal(got, bytes.Repeat([]byte{4}, 512)) {
		t.Errorf("sector 4 read %x..., want 04...", got[:8])
	}
	if s := d.ackInterrupt(); s&InterruptUsedBuffer == 0 || d.irqs.Load() == 0 {
		t.Errorf("InterruptStatus = %#x after %d interrupts; want the used-buffer bit", s, d.irqs.Load())
	}
	if s := d.read(regInterruptStatus); s != 0 {
		t.Errorf("InterruptStatus after ACK = %#x, want 0", s)
	}

	// Write sectors 10..11, with the header and the data in one descriptor
	// (any layout is allowed with VERSION_1).
	payload := bytes.Repeat([]byte("understudy-block!"), 1024*2/17+1)[:1024]
	ds = d.chain(buf{data: append(blkHeader(BlockTOut, 10), payload...)}, buf{n: 1, write: true})
	u, st, err = d.request(ds)
	if err != nil || st != BlockSOK || u.len != 1 {
		t.Fatalf("write: status %d len %d err %v; want OK, 1", st, u.len, err)
	}
	ds = d.chain(buf{data: blkHeader(BlockTFlush, 0)}, buf{n: 1, write: true})
	if _, st, err = d.request(ds); err != nil || st != BlockSOK {
		t.Fatalf("flush: status %d err %v; want OK", st, err)
	}
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file[10*512:12*512], payload) {
		t.Errorf("file sectors 10-11 = %q..., want the payload", file[10*512:10*512+16])
	}
	if file[9*512] != 9 || file[12*512] != 12 {
		t.Errorf("write touched neighbouring sectors: %d, %d", file[9*512], file[12*512])
	}

	// GET_ID: the file's base name, NUL-padded to 20 bytes.
	ds = d.chain(buf{data: blkHeader(BlockTGetID, 0)}, buf{n: BlockIDBytes, write: true}, buf{n: 1, write: true})
	u, st, err = d.request(ds)
	if err != nil || st != BlockSOK || u.len != BlockIDBytes+1 {
		t.Fatalf("GET_ID: status %d len %d err %v; want OK, 21", st, u.len, err)
	}
	if got := strings.TrimRight(string(d.slice(ds[1].addr, BlockIDBytes)), "\x00"); got != "disk.img" {
		t.Errorf("GET_ID = %q, want %q", got, "disk.img")
	}
}

// The device's writes into guest memory are in the VMM dirty bitmap, which
// fault-tolerant checkpoints harvest.
func TestBlockMarksDirty(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	bitmap := make([]uint64, (testMemory/4096+63)/64)
	if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
		t.Fatal(err)
	}
	clear(bitmap)
	d.next = 0x300000 // a page-aligned, untouched area
	ds := d.chain(buf{data: blkHeader(BlockTIn, 1)}, buf{n: 8192, write: true}, buf{n: 1, write: true})
	if _, st, err := d.request(ds); err != nil || st != BlockSOK {
		t.Fatalf("read: status %d err %v", st, err)
	}
	if _, err := d.mem.TakeVMMDirty(bitmap); err != nil {
		t.Fatal(err)
	}
	dirty := func(gpa uint64) bool { p := gpa / 4096; return bitmap[p/64]&(1<<(p%64)) != 0 }
	for _, gpa := range []uint64{ds[1].addr, ds[1].addr + 4096, ds[2].addr, d.queues[0].used} {
		if !dirty(gpa) {
			t.Errorf("page of %#x is not marked dirty after the device wrote it", gpa)
		}
	}
}

func TestBlockReadOnly(t *testing.T) {
	path := newDisk(t)
	before, _ := os.ReadFile(path)
	d, b := newBlockDriver(t, path, true)
	if !b.ReadOnly() || d.deviceFeatures()&BlockFRO == 0 {
		t.Fatalf("read-only disk does not offer VIRTIO_BLK_F_RO")
	}
	ds := d.chain(buf{data: blkHeader(BlockTOut, 0)}, buf{data: bytes.Repeat([]byte{0xee}, 512)}, buf{n: 1, write: true})
	_, st, err := d.request(ds)
	if st != BlockSIOErr {
		t.Errorf("write to read-only disk: status %d, want IOERR", st)
	}
	wantErr(t, "write to read-only disk", err, ErrBadRequest)
	ds = d.chain(buf{data: blkHeader(BlockTIn, 5)}, buf{n: 512, write: true}, buf{n: 1, write: true})
	if _, st, err := d.request(ds); err != nil || st != BlockSOK || d.slice(ds[1].addr, 1)[0] != 5 {
		t.Errorf("read from read-only disk: status %d err %v", st, err)
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Errorf("read-only disk file changed")
	}
}

func TestBlockBadRequests(t *testing.T) {
	d, _ := newBlockDriver(t, newDisk(t), false)
	tests := []struct {
		name   string
		bufs   []buf
		status byte
	}{
		{"read past the end", []buf{{data: blkHeader(BlockTIn, diskSectors)}, {n: 512, write: true}, {n: 1, write: true}}, BlockSIOErr},
		{"read crossing the end", []buf{{data: blkHeader(BlockTIn, diskSectors-1)}, {n: 1024, write: true}, {n: 1, write: true}}, BlockSIOErr},
		{"huge sector", []buf{{data: blkHeader(BlockTIn, 1<<63)}, {n: 512, write: true}, {n: 1, write: true}}, BlockSIOErr},
		{"write past the end", []buf{{data: blkHeader(BlockTOut, diskSectors)}, {data: make([]byte, 512)}, {n: 1, write: true}}, BlockSIOErr},
		{"partial sector", []buf{{data: blkHeader(BlockTIn, 0)}, {n: 100, write: true}, {n: 1, write: true}}, BlockSIOErr},
		{"read into readable data", []buf{{data: blkHeader(BlockTIn, 0)}, {data: make([]byte, 512)}, {n: 1, write: true}}, BlockSIOErr},
		{"write from writable data", []buf{{data: blkHeader(BlockTOut, 0)}, {n: 512, write: true}, {n: 1, write: true}}, BlockSIOErr},
		{"short header", []buf{{data: make([]byte, 8)}, {n: 1, write: true}}, BlockSIOErr},
		{"unknown type", []buf{{data: blkHeader(99, 0)}, {n: 1, write: true}}, BlockSUnsupp},
		{"discard", []buf{{data: blkHeader(11, 0)}, {data: make([]byte, 16)}, {n: 1, write: true}}, BlockSUnsupp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d.t = t
			_, st, err := d.request(d.chain(tt.bufs...))
			if st != tt.status {
				t.Errorf("status = %d, want %d", st, tt.status)
			}
			wantErr(t, "notify", err, ErrBadRequest)
			if s := d.status(); s&StatusDeviceNeedsReset != 0 {
				t.Errorf("status = %#x: a failed request must not need a reset", s)
			}
		})
	}
}

// Malformed rings and chains set DEVICE_NEEDS_RESET with a configuration
// interrupt, touch nothing, and the device works again after a reset.
func TestBlockMalformedChains(t *testing.T) {
	path := newDisk(t)
	before, _ := os.ReadFile(path)
	tests := []struct {
		name string
		make func(d *testDriver)
	}{
		{"loop", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 512, write: true})
			ds[1].next = 0 // back to the head
			d.submit(0, ds)
		}},
		{"self loop", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)})
			ds[0].next = 0
			d.submit(0, ds)
		}},
		{"address outside memory", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 1, write: true})
			ds[1].addr = testMemory
			d.submit(0, ds)
		}},
		{"buffer crossing the end of memory", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 1, write: true})
			ds[1].addr, ds[1].len = testMemory-512, 1024
			d.submit(0, ds)
		}},
		{"address+length overflow", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 1, write: true})
			ds[1].addr, ds[1].len = ^uint64(0)-10, 512
			d.submit(0, ds)
		}},
		{"readable after writable", func(d *testDriver) {
			d.submit(0, d.chain(buf{data: blkHeader(BlockTIn, 0)}, buf{n: 512, write: true}, buf{data: []byte{1}}))
		}},
		{"no writable status", func(d *testDriver) {
			d.submit(0, d.chain(buf{data: blkHeader(BlockTFlush, 0)}))
		}},
		{"indirect descriptor", func(d *testDriver) {
			ds := d.chain(buf{data: make([]byte, 32)})
			ds[0].flags = descFIndirect
			d.submit(0, ds)
		}},
		{"next outside the table", func(d *testDriver) {
			ds := d.chain(buf{data: blkHeader(BlockTIn, 0)})
			ds[0].next = 300
			d.submit(0, ds)
		}},
		{"head outside the table", func(d *testDriver) { d.publish(0, DefaultQueueSize) }},
		{"avail idx jumps", func(d *testDriver) {
			q := d.queues[0]
			binary.LittleEndian.PutUint16(d.slice(q.avail+2, 2), q.availIdx+DefaultQueueSize+1)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, _ := newBlockDriver(t, path, false)
			usedBefore := append([]byte(nil), d.slice(d.queues[0].used, 4+8*DefaultQueueSize)...)
			tt.make(d)
			err := d.notify(0)
			wantErr(t, "notify", err, ErrMalformed)
			if s := d.status(); s&StatusDeviceNeedsReset == 0 {
				t.Errorf("status = %#x, want DEVICE_NEEDS_RESET", s)
			}
			if s := d.read(regInterruptStatus); s&InterruptConfigChange == 0 || d.irqs.Load() == 0 {
				t.Errorf("InterruptStatus = %#x after %d interrupts, want the config-change bit", s, d.irqs.Load())
			}
			if !bytes.Equal(usedBefore, d.slice(d.queues[0].used, 4+8*DefaultQueueSize)) {
				t.Errorf("used ring changed for a malformed chain")
			}
			// Further notifies are refused until a reset.
			wantErr(t, "notify while needing reset", d.notify(0), ErrBadAccess)
			d.init(DefaultQueueSize)
			ds := d.chain(buf{data: blkHeader(BlockTIn, 7)}, buf{n: 512, write: true}, buf{n: 1, write: true})
			if _, st, err := d.request(ds); err != nil || st != BlockSOK || d.slice(ds[1].addr, 1)[0] != 7 {
				t.Errorf("read after reset: status %d err %v", st, err)
			}
		})
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Errorf("malformed requests changed the disk file")
	}
}

func TestNewBlockErrors(t *testing.T) {
	if _, err := NewBlock(filepath.Join(t.TempDir(), "missing.img"), true); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("NewBlock(missing) = %v, want an error wrapping ErrNotExist", err)
	}
	if _, err := NewBlock(t.TempDir(), true); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("NewBlock(directory) = %v, want a 'not a regular file' error", err)
	}

	// Mode 0444: refused for writing (also as root, who could open it),
	// accepted read-only.
	path := newDisk(t)
	if err := os.Chmod(path, 0o444); err != nil {
		t.Fatal(err)
	}
	_, err := NewBlock(path, false)
	wantErr(t, "NewBlock(mode 0444, readOnly=false)", err, ErrNotWritable)
	if !strings.Contains(err.Error(), "read-only") {
		t.Errorf("error %q does not suggest attaching read-only", err)
	}
	b, err := NewBlock(path, true)
	if err != nil {
		t.Fatalf("NewBlock(mode 0444, readOnly=true) = %v", err)
	}
	b.Close()
}

// An immutable file (chattr +i) cannot be opened for writing even by root:
// the kernel refuses with EPERM, whatever the mode bits say.
func TestNewBlockImmutable(t *testing.T) {
	path := newDisk(t)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() }) // after the chattr -i cleanup below
	flags, err := unix.IoctlGetUint32(int(f.Fd()), unix.FS_IOC_GETFLAGS)
	if err == nil {
		err = unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags|fsImmutableFL))
	}
	if errors.Is(err, unix.EPERM) {
		t.Skipf("cannot make %s immutable: %v (needs CAP_LINUX_IMMUTABLE)", path, err)
	}
	if errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP) {
		t.Skipf("the file system of %s has no immutable flag: %v", path, err)
	}
	if err != nil {
		t.Fatalf("chattr +i %s: %v", path, err)
	}
	t.Cleanup(func() {
		if err := unix.IoctlSetPointerInt(int(f.Fd()), unix.FS_IOC_SETFLAGS, int(flags)); err != nil {
			t.Errorf("chattr -i %s: %v", path, err)
		}
	})
	_, err = NewBlock(path, false)
	wantErr(t, "NewBlock(immutable, readOnly=false)", err, ErrNotWritable)
	wantErr(t, "NewBlock(immutable, readOnly=false)", err, unix.EPERM)
	b, err := NewBlock(path, true)
	if err != nil {
		t.Fatalf("NewBlock(immutable, readOnly=true) = %v", err)
	}
	b.Close()
}

// fsImmutableFL is FS_IMMUTABLE_FL from linux/fs.h (chattr +i).
const fsImmutableFL = 0x10
