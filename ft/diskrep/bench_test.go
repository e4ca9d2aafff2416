package diskrep

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// blkDriver serves write requests to a real virtio-blk device through a
// real virtio-mmio transport and guest memory, one request at a time, as
// a guest's driver would (only what the benchmark needs).
type blkDriver struct {
	tb    testing.TB
	tr    *virtio.Transport
	mem   *mmu.Memory
	avail uint16
}

const (
	bRing   = 0x10000
	bHdr    = 0x20000
	bStatus = 0x20100
	bData   = 0x100000
)

func (d *blkDriver) reg(off uint64, v uint32) {
	if err := d.tr.Write(off, binary.LittleEndian.AppendUint32(nil, v)); err != nil {
		d.tb.Fatalf("register %#x: %v", off, err)
	}
}

func newBlkDriver(tb testing.TB, blk *virtio.Block) *blkDriver {
	mem, err := mmu.New(mmu.Config{Size: 8 << 20})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { mem.Close() })
	d := &blkDriver{tb: tb, tr: virtio.NewMMIO(blk, mem, func() error { return nil }), mem: mem}
	tb.Cleanup(func() { d.tr.Close() })
	d.reg(0x070, virtio.StatusAcknowledge|virtio.StatusDriver)
	d.reg(0x024, 1)
	d.reg(0x020, 1) // VIRTIO_F_VERSION_1
	d.reg(0x070, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK)
	d.reg(0x030, 0)
	d.reg(0x038, 8)
	d.reg(0x080, bRing)
	d.reg(0x090, bRing+0x400)
	d.reg(0x0a0, bRing+0x800)
	d.reg(0x044, 1)
	d.reg(0x070, virtio.StatusAcknowledge|virtio.StatusDriver|virtio.StatusFeaturesOK|virtio.StatusDriverOK)
	return d
}

// write serves one write of data at byte offset off (sector-aligned).
func (d *blkDriver) write(off uint64, data []byte) {
	le := binary.LittleEndian
	must := func(err error) {
		if err != nil {
			d.tb.Fatal(err)
		}
	}
	desc := func(i int, addr uint64, n uint32, flags, next uint16) {
		b := le.AppendUint64(nil, addr)
		b = le.AppendUint32(b, n)
		b = le.AppendUint16(b, flags)
		b = le.AppendUint16(b, next)
		must(d.mem.Write(bRing+uint64(16*i), b))
	}
	h := le.AppendUint32(nil, virtio.BlockTOut)
	h = le.AppendUint32(h, 0)
	h = le.AppendUint64(h, off/virtio.SectorSize)
	must(d.mem.Write(bHdr, h))
	must(d.mem.Write(bData, data))
	desc(0, bHdr, 16, 1, 1)
	desc(1, bData, uint32(len(data)), 1, 2)
	desc(2, bStatus, 1, 2, 0)
	must(d.mem.Write(bRing+0x400+4+2*uint64(d.avail%8), le.AppendUint16(nil, 0)))
	d.avail++
	must(d.mem.Write(bRing+0x400, le.AppendUint32(nil, uint32(d.avail)<<16)))
	d.reg(0x050, 0)
	st, err := d.mem.Slice(bStatus, 1)
	must(err)
	if st[0] != virtio.BlockSOK {
		d.tb.Fatalf("write at %d: status %d", off, st[0])
	}
}

// BenchmarkDiskWrites runs epochs of guest disk writes (256 scattered
// 4 KiB blocks and one 1 MiB run: 2 MiB an epoch) on a 64 MiB disk served
// by a real virtio-blk device, harvests each epoch and stages and commits
// it into a replica. It prints
//
//	bench disk-writes: mib_per_epoch=X track_overhead=R stage_commit_ratio=Q ...
//
// track_overhead is the primary's cost of replication (marking the written
// blocks, TakeWrites, reading the ranges back and updating the disk's
// fingerprint) over the cost of the same writes as plain pwrites to a file;
// track_overhead_without_fingerprint leaves out the fingerprint update,
// which each checkpoint's SaveState paid before write tracking existed
// (the harvest now does it, and SaveState finds nothing left to hash);
// stage_commit_ratio is the backup's Stage+Commit over writing the same
// bytes to a file with one fdatasync. Both baselines run in the same
// epochs, on the same file system.
func BenchmarkDiskWrites(b *testing.B) {
	const size = 64 << 20
	dir := b.TempDir()
	content := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < size; i += 8 {
		binary.LittleEndian.PutUint64(content[i:], rng.Uint64())
	}
	primary := filepath.Join(dir, "primary.img")
	for _, p := range []string{primary, filepath.Join(dir, "mark.img")} {
		if err := os.WriteFile(p, content, 0o644); err != nil {
			b.Fatal(err)
		}
	}
	blk, err := virtio.NewBlock(primary, false)
	if err != nil {
		b.Fatal(err)
	}
	drv := newBlkDriver(b, blk)
	marker, err := virtio.NewBlock(filepath.Join(dir, "mark.img"), false)
	if err != nil {
		b.Fatal(err)
	}
	defer marker.Close()
	w0, err := blk.HarvestWrites(0) // the seed's fingerprint
	if err != nil {
		b.Fatal(err)
	}
	r, err := Open(filepath.Join(dir, "replica.img"), size)
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	src, err := os.Open(primary)
	if err != nil {
		b.Fatal(err)
	}
	if err := r.Seed(1, src, size, w0.Fingerprint); err != nil {
		b.Fatal(err)
	}
	src.Close()
	plain, err := os.OpenFile(filepath.Join(dir, "plain.img"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.WriteAt(content, 0); err != nil {
		b.Fatal(err)
	}
	synced, err := os.OpenFile(filepath.Join(dir, "synced.img"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		b.Fatal(err)
	}
	defer synced.Close()
	if _, err := synced.WriteAt(content, 0); err != nil {
		b.Fatal(err)
	}

	// The fingerprint work of a harvest, measured on its own: the same
	// update on a fingerprint of the baseline file, which holds the same
	// bytes as the primary's disk.
	pf, err := os.Open(primary)
	if err != nil {
		b.Fatal(err)
	}
	defer pf.Close()
	fpOnly, err := virtio.NewFingerprint(pf, size)
	if err != nil {
		b.Fatal(err)
	}
	var tFP time.Duration

	type write struct {
		off  uint64
		data []byte
	}
	data := make([]byte, 1<<20)
	var tPwrite, tTrack, tStageCommit, tSynced time.Duration
	var bytesTotal uint64
	epoch := uint64(1)
	for b.Loop() {
		epoch++
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		var ws []write
		for i := range 256 {
			ws = append(ws, write{rng.Uint64N(size/4096) * 4096, data[i*4096 : (i+1)*4096]})
		}
		ws = append(ws, write{rng.Uint64N(size/4096-256) * 4096, data})
		for _, w := range ws {
			drv.write(w.off, w.data) // the guest's write, tracked
		}
		start := time.Now()
		for _, w := range ws {
			if _, err := plain.WriteAt(w.data, int64(w.off)); err != nil {
				b.Fatal(err)
			}
		}
		tPwrite += time.Since(start)

		// Marking, on a device of its own (the same bitmap code as the
		// request path), then the harvest of the real device.
		start = time.Now()
		for _, w := range ws {
			marker.RestoreWrites([]virtio.WriteRange{{Off: w.off, Len: uint64(len(w.data))}})
		}
		marker.TakeWrites()
		dw, err := blk.HarvestWrites(0)
		if err != nil {
			b.Fatal(err)
		}
		tTrack += time.Since(start)
		bytesTotal += dw.Bytes()
		var rs []virtio.WriteRange
		for _, rg := range dw.Ranges {
			rs = append(rs, virtio.WriteRange{Off: rg.Off, Len: uint64(len(rg.Data))})
		}
		start = time.Now()
		if err := fpOnly.UpdateRanges(pf, rs); err != nil {
			b.Fatal(err)
		}
		tFP += time.Since(start)

		start = time.Now()
		if err := r.Stage(epoch, dw); err != nil {
			b.Fatal(err)
		}
		if err := r.Commit(epoch); err != nil {
			b.Fatal(err)
		}
		tStageCommit += time.Since(start)

		start = time.Now()
		for _, rg := range dw.Ranges {
			if _, err := synced.WriteAt(rg.Data, int64(rg.Off)); err != nil {
				b.Fatal(err)
			}
		}
		if err := datasync(synced); err != nil {
			b.Fatal(err)
		}
		tSynced += time.Since(start)
	}
	last, err := blk.HarvestWrites(0)
	if err != nil {
		b.Fatal(err)
	}
	if r.Fingerprint() != last.Fingerprint {
		b.Fatalf("the replica's fingerprint differs from the primary's disk")
	}
	epochs := float64(epoch - 1)
	if fpOnly.Root() != last.Fingerprint {
		b.Fatalf("the fingerprint measured alone differs from the harvest's")
	}
	fmt.Printf("bench disk-writes: mib_per_epoch=%.2f track_overhead=%.2f stage_commit_ratio=%.2f track_overhead_without_fingerprint=%.2f epochs=%.0f track_ms=%.2f fingerprint_ms=%.2f pwrite_ms=%.2f stage_commit_ms=%.2f write_fsync_ms=%.2f (64 MiB disk, 256x4KiB+1MiB an epoch)\n",
		float64(bytesTotal)/epochs/(1<<20), float64(tTrack)/float64(tPwrite), float64(tStageCommit)/float64(tSynced),
		float64(tTrack-tFP)/float64(tPwrite), epochs,
		ms(tTrack)/epochs, ms(tFP)/epochs, ms(tPwrite)/epochs, ms(tStageCommit)/epochs, ms(tSynced)/epochs)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
