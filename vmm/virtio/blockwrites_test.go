package virtio

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// newSizedDisk writes a disk file of size bytes of pseudo-random content
// and returns its path.
func newSizedDisk(t testing.TB, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	r := rand.New(rand.NewPCG(uint64(size), 7))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	p := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, data
}

// Writes through the queue are tracked at 4 KiB with exact, coalesced
// ranges; reads, flushes and GET_ID are not; TakeWrites clears the set; the
// harvested bytes are the file's, and the harvest's fingerprint is the
// file's.
func TestBlockTracksWrites(t *testing.T) {
	path, _ := newSizedDisk(t, 1<<20+3*512) // a last block of 1536 bytes
	d, b := newBlockDriver(t, path, false)
	if got := b.TakeWrites(); got != nil {
		t.Fatalf("TakeWrites() on a fresh disk = %v, want none", got)
	}
	write := func(sector uint64, n int, fill byte) {
		t.Helper()
		d.next = bufBase // reuse the buffer area: each request completes before the next
		ds := d.chain(buf{data: append(blkHeader(BlockTOut, sector), bytes.Repeat([]byte{fill}, n)...)}, buf{n: 1, write: true})
		if _, st, err := d.request(ds); err != nil || st != BlockSOK {
			t.Fatalf("write sector %d: status %d err %v", sector, st, err)
		}
	}
	read := func(sector uint64, n uint32) {
		t.Helper()
		d.next = bufBase
		ds := d.chain(buf{data: blkHeader(BlockTIn, sector)}, buf{n: n, write: true}, buf{n: 1, write: true})
		if _, st, err := d.request(ds); err != nil || st != BlockSOK {
			t.Fatalf("read sector %d: status %d err %v", sector, st, err)
		}
	}
	read(0, 8192)
	d.next = bufBase
	if _, st, err := d.request(d.chain(buf{data: blkHeader(BlockTFlush, 0)}, buf{n: 1, write: true})); err != nil || st != BlockSOK {
		t.Fatalf("flush: status %d err %v", st, err)
	}
	if n := b.PendingWrites(); n != 0 {
		t.Fatalf("after a read and a flush: %d blocks pending, want 0", n)
	}
	write(1, 512, 0xa1)        // block 0
	write(7, 1024, 0xa2)       // sectors 7, 8: blocks 0 and 1
	write(40, 512, 0xa3)       // block 5
	write(48, 4096, 0xa4)      // block 6 exactly
	write(2048, 3*512, 0xa5)   // the partial last block (256)
	write(100*8, 512*16, 0xa6) // blocks 100, 101
	want := []WriteRange{{0, 8192}, {5 * 4096, 8192}, {100 * 4096, 8192}, {1 << 20, 1536}}
	if n := b.PendingWrites(); n != 7 {
		t.Errorf("PendingWrites() = %d, want 7", n)
	}
	w, err := b.HarvestWrites(3)
	if err != nil {
		t.Fatal(err)
	}
	var got []WriteRange
	for _, r := range w.Ranges {
		got = append(got, WriteRange{r.Off, uint64(len(r.Data))})
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("harvested ranges %v, want %v", got, want)
	}
	file, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range w.Ranges {
		if !bytes.Equal(r.Data, file[r.Off:r.Off+uint64(len(r.Data))]) {
			t.Errorf("harvested bytes at %d differ from the file's", r.Off)
		}
	}
	if w.Disk != 3 || w.Size != uint64(len(file)) {
		t.Errorf("harvest disk %d size %d, want 3, %d", w.Disk, w.Size, len(file))
	}
	fp, err := NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	if w.Fingerprint != fp.Root() {
		t.Errorf("harvest fingerprint %x, the file's %x", w.Fingerprint[:8], fp.Root())
	}
	if got := b.TakeWrites(); got != nil {
		t.Errorf("TakeWrites() after a harvest = %v, want none", got)
	}

	// A read is not tracked; a write after the harvest is.
	read(100*8, 4096)
	write(9, 512, 0xb1)
	ranges := b.TakeWrites()
	if want := []WriteRange{{4096, 4096}}; !reflect.DeepEqual(ranges, want) {
		t.Errorf("TakeWrites() = %v, want %v", ranges, want)
	}
	// Ranges put back are harvested again.
	b.RestoreWrites(ranges)
	if got := b.TakeWrites(); !reflect.DeepEqual(got, ranges) {
		t.Errorf("TakeWrites() after RestoreWrites = %v, want %v", got, ranges)
	}

	// The state's fingerprint agrees with the harvest's (one fingerprint,
	// kept up to date by both).
	s, err := b.state()
	if err != nil {
		t.Fatal(err)
	}
	file, _ = os.ReadFile(path)
	fp, _ = NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if s.Fingerprint != fp.Root() {
		t.Errorf("state fingerprint %x, the file's %x", s.Fingerprint[:8], fp.Root())
	}
}

// TakeWrites coalesces runs across bitmap words, fills whole words for long
// writes, splits runs longer than MaxWriteRange, and ends the last block at
// the disk's end.
func TestTakeWritesCoalesces(t *testing.T) {
	const size = 64<<20 + 100
	p := filepath.Join(t.TempDir(), "sparse.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b, err := NewBlock(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	mark := func(off, n int64) { b.markWritten(off, int(n)) }
	mark(63*4096+5, 2*4096)       // blocks 63..65, across a word boundary
	mark(1<<20, 10<<20)           // 10 MiB: split into 4, 4, 2 MiB
	mark(64<<20-4096, 10)         // the last whole block
	mark(64<<20+3, 1)             // the partial last block: 100 bytes
	mark(200*4096, 1)             // a lone block
	mark(200*4096+4095, 1)        // the same block again
	mark(32<<20, 64*4096)         // exactly one bitmap word
	mark(32<<20+64*4096, 64*4096) // and the next: one run
	want := []WriteRange{
		{63 * 4096, 3 * 4096},
		{200 * 4096, 4096},
		{1 << 20, 4 << 20}, {5 << 20, 4 << 20}, {9 << 20, 2 << 20},
		{32 << 20, 128 * 4096},
		{64<<20 - 4096, 4096 + 100},
	}
	got := b.TakeWrites()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("TakeWrites() = %v,\nwant %v", got, want)
	}
	var blocks uint64
	for _, r := range want {
		blocks += (r.Len + WriteBlock - 1) / WriteBlock
	}
	b.RestoreWrites(want)
	if n := b.PendingWrites(); n != blocks {
		t.Errorf("PendingWrites() = %d, want %d", n, blocks)
	}
	if got := b.TakeWrites(); !reflect.DeepEqual(got, want) {
		t.Errorf("TakeWrites() after RestoreWrites = %v", got)
	}
	if _, err := b.ReadWrites(0, []WriteRange{{size - 4096, 8192}}); err == nil {
		t.Errorf("ReadWrites of a range past the disk succeeded")
	}
}

func sampleWrites() *DiskWrites {
	return &DiskWrites{Disk: 1, Size: 5*4096 + 10, Fingerprint: [32]byte{9, 8, 7},
		Ranges: []DiskRange{
			{Off: 0, Data: bytes.Repeat([]byte{1}, 4096)},
			{Off: 4096, Data: bytes.Repeat([]byte{2}, 8192)},
			{Off: 4 * 4096, Data: bytes.Repeat([]byte{3}, 4096+10)},
		}}
}

func TestDiskWritesEncoding(t *testing.T) {
	w := sampleWrites()
	b, err := w.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != w.EncodedLen() {
		t.Errorf("encoding is %d bytes, EncodedLen %d", len(b), w.EncodedLen())
	}
	got, err := DecodeDiskWrites(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, w) {
		t.Errorf("decoded %+v, want %+v", got, w)
	}
	empty := &DiskWrites{Disk: 0, Size: 1}
	eb, err := empty.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeDiskWrites(eb); err != nil || len(got.Ranges) != 0 {
		t.Errorf("empty writes: %v, %v", got, err)
	}

	// Refusals, each a change to a good encoding.
	rangeAt := func(i int) int { // offset of range i's header
		o := diskWritesHeader
		for _, r := range w.Ranges[:i] {
			o += diskRangeHeader + len(r.Data)
		}
		return o
	}
	// reencode re-encodes w changed by fn with correct crcs.
	reencode := func(fn func(w *DiskWrites)) []byte {
		c := sampleWrites()
		fn(c)
		var out []byte
		out = append(out, b[:diskWritesHeader]...)
		le.PutUint32(out[8:], c.Disk)
		le.PutUint32(out[12:], uint32(len(c.Ranges)))
		le.PutUint64(out[16:], c.Size)
		for _, r := range c.Ranges {
			out = le.AppendUint64(out, r.Off)
			out = le.AppendUint32(out, uint32(len(r.Data)))
			out = le.AppendUint32(out, RangeSum(c.Disk, r.Off, r.Data))
			out = append(out, r.Data...)
		}
		return out
	}
	for _, c := range []struct {
		name string
		b    []byte
		want string
	}{
		{"short", b[:10], "header"},
		{"magic", setByte(b, 0, 'X'), "magic"},
		{"version", setByte(b, 4, 2), "version"},
		{"reserved", setByte(b, 6, 1), "reserved"},
		{"block size", setByte(b, 25, 0x20), "block size"},
		{"bad crc", setByte(b, rangeAt(1)+diskRangeHeader+5, 0xff), "crc"},
		{"other disk", setByte(b, 8, 2), "crc"},
		{"count too big", setByte(b, 14, 1), "ranges in"},
		{"count past the data", setByte(b, 12, 200), "shorter than a range header"},
		{"count too small", setByte(b, 12, 2), "after the last range"},
		{"truncated", b[:len(b)-1], "data bytes"},
		{"trailing", append(bytes.Clone(b), 0), "after the last range"},
		{"zero size", reencode(func(w *DiskWrites) { w.Size = 0; w.Ranges = nil }), "disk size"},
		{"misaligned", reencode(func(w *DiskWrites) { w.Ranges[1].Off = 4097 }), "aligned"},
		{"overlap", reencode(func(w *DiskWrites) { w.Ranges[1].Off = 0 }), "overlaps"},
		{"descending", reencode(func(w *DiskWrites) { w.Ranges[0], w.Ranges[1] = w.Ranges[1], w.Ranges[0] }), "overlaps"},
		{"past the end", reencode(func(w *DiskWrites) { w.Size = 5 * 4096 }), "past the disk"},
		{"partial block inside", reencode(func(w *DiskWrites) { w.Ranges[1].Data = w.Ranges[1].Data[:100] }), "multiple"},
		{"too long", reencode(func(w *DiskWrites) {
			w.Size = 2 * MaxWriteRange
			w.Ranges = []DiskRange{{Off: 0, Data: make([]byte, MaxWriteRange+4096)}}
		}), "bytes, want 1 to"},
	} {
		_, err := DecodeDiskWrites(c.b)
		if !errors.Is(err, ErrBadDiskWrites) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: DecodeDiskWrites = %v, want ErrBadDiskWrites with %q", c.name, err, c.want)
		}
	}
	bad := sampleWrites()
	bad.Ranges[0].Off = 4096
	if _, err := bad.AppendBinary(nil); !errors.Is(err, ErrBadDiskWrites) {
		t.Errorf("AppendBinary of overlapping ranges = %v, want ErrBadDiskWrites", err)
	}
}

func setByte(b []byte, at int, v byte) []byte {
	c := bytes.Clone(b)
	c[at] = v
	return c
}

// FuzzDecodeDiskWrites decodes fuzzed DiskWrites: what decodes follows
// every rule and re-encodes to the same bytes.
func FuzzDecodeDiskWrites(f *testing.F) {
	b, err := sampleWrites().AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	for _, w := range []*DiskWrites{
		{Size: 4096},
		{Disk: 2, Size: 10, Ranges: []DiskRange{{Off: 0, Data: []byte("0123456789")}}},
	} {
		e, err := w.AppendBinary(nil)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(e)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		w, err := DecodeDiskWrites(b)
		if err != nil {
			if !errors.Is(err, ErrBadDiskWrites) {
				t.Fatalf("DecodeDiskWrites() = %v, want ErrBadDiskWrites", err)
			}
			return
		}
		var prev uint64
		for _, r := range w.Ranges {
			n := uint64(len(r.Data))
			if r.Off%WriteBlock != 0 || r.Off < prev || r.Off+n > w.Size || n == 0 || n > MaxWriteRange {
				t.Fatalf("decoded a range that breaks the rules: [%d, +%d) of %d, previous end %d", r.Off, n, w.Size, prev)
			}
			prev = r.Off + n
		}
		if enc, err := w.AppendBinary(nil); err != nil || !bytes.Equal(enc, b) {
			t.Fatalf("re-encoded disk writes differ (%v)", err)
		}
	})
}

// CloneTo copies the disk as it is; a restore into a device given a
// fingerprint (SetFingerprint) checks the state against that one, without
// reading the disk.
func TestCloneToAndSetFingerprint(t *testing.T) {
	path, _ := newSizedDisk(t, 1<<20)
	d, b := newBlockDriver(t, path, false)
	d.next = bufBase
	ds := d.chain(buf{data: append(blkHeader(BlockTOut, 8), bytes.Repeat([]byte{0x5a}, 4096)...)}, buf{n: 1, write: true})
	if _, st, err := d.request(ds); err != nil || st != BlockSOK {
		t.Fatalf("write: status %d err %v", st, err)
	}
	dst := filepath.Join(t.TempDir(), "clone.img")
	if err := b.CloneTo(dst); err != nil {
		t.Fatal(err)
	}
	file, _ := os.ReadFile(path)
	clone, _ := os.ReadFile(dst)
	if !bytes.Equal(file, clone) {
		t.Errorf("the clone differs from the disk")
	}
	if err := b.CloneTo(dst); err == nil {
		t.Errorf("CloneTo over an existing file succeeded")
	}

	if err := d.tr.Quiesce(); err != nil {
		t.Fatal(err)
	}
	state, err := d.tr.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	right, err := NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	other := bytes.Clone(file)
	other[0] ^= 1
	wrong, _ := NewFingerprint(bytes.NewReader(other), int64(len(other)))
	restore := func(fp *Fingerprint) error {
		b2, err := NewBlock(path, false)
		if err != nil {
			t.Fatal(err)
		}
		tr := NewMMIO(b2, d.mem, func() error { return nil })
		defer tr.Close()
		if fp != nil {
			if err := b2.SetFingerprint(fp); err != nil {
				t.Fatal(err)
			}
		}
		return tr.LoadState(state)
	}
	if err := restore(nil); err != nil {
		t.Errorf("restore, disk read: %v", err)
	}
	if err := restore(right); err != nil {
		t.Errorf("restore with the disk's fingerprint given: %v", err)
	}
	if err := restore(wrong); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), "fingerprint") {
		t.Errorf("restore with another fingerprint given = %v, want a fingerprint refusal", err)
	}
	small, _ := NewFingerprint(bytes.NewReader(file[:4096]), 4096)
	if err := b.SetFingerprint(small); err == nil {
		t.Errorf("SetFingerprint of another size succeeded")
	}
}

func TestSplitJoinDiskWrites(t *testing.T) {
	w := &DiskWrites{Disk: 2, Size: 64 << 20, Fingerprint: [32]byte{4}}
	for i := range 12 {
		w.Ranges = append(w.Ranges, DiskRange{Off: uint64(i) * (5 << 20), Data: bytes.Repeat([]byte{byte(i)}, (i%4+1)<<20)})
	}
	const limit = 6 << 20
	parts, err := w.Split(limit)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range parts {
		if p.EncodedLen() > limit || len(p.Ranges) == 0 {
			t.Errorf("part %d: %d bytes, %d ranges", i, p.EncodedLen(), len(p.Ranges))
		}
	}
	got, err := JoinDiskWrites(parts)
	if err != nil || !reflect.DeepEqual(got, w) {
		t.Errorf("JoinDiskWrites(Split) = %v; want the original", err)
	}
	if _, err := w.Split(1 << 20); err == nil {
		t.Errorf("Split(1 MiB) succeeded")
	}
	parts[0], parts[1] = parts[1], parts[0]
	if _, err := JoinDiskWrites(parts); !errors.Is(err, ErrBadDiskWrites) {
		t.Errorf("JoinDiskWrites of parts out of order = %v", err)
	}
	parts[0].Fingerprint[0] = 9
	if _, err := JoinDiskWrites(parts); !errors.Is(err, ErrBadDiskWrites) {
		t.Errorf("JoinDiskWrites of parts of two fingerprints = %v", err)
	}
}

// Harvests that run while requests are served (the machine is not paused:
// not how a checkpoint harvests, but the set must stay consistent) lose no
// write: the union of every harvest is every block written.
func TestTakeWritesConcurrent(t *testing.T) {
	path, _ := newSizedDisk(t, 1<<20)
	d, b := newBlockDriver(t, path, false)
	const writes = 200
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range writes {
			d.next = bufBase
			sector := uint64(i*37%256) * 8
			ds := d.chain(buf{data: append(blkHeader(BlockTOut, sector), make([]byte, 512)...)}, buf{n: 1, write: true})
			d.submit(0, ds)
			if err := d.notify(0); err != nil {
				t.Errorf("write %d: %v", i, err)
				return
			}
			d.takeUsed(0)
		}
	}()
	seen := make(map[uint64]bool)
	take := func() {
		for _, r := range b.TakeWrites() {
			for off := r.Off; off < r.End(); off += WriteBlock {
				seen[off/WriteBlock] = true
			}
		}
	}
	for running := true; running; {
		select {
		case <-done:
			running = false
		default:
		}
		take()
	}
	take()
	for i := range writes {
		if blk := uint64(i*37%256) * 8 * SectorSize / WriteBlock; !seen[blk] {
			t.Errorf("block %d was written but never harvested", blk)
		}
	}
}
