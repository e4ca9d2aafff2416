package ft

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Guest-physical layout of the host-side virtio-blk driver's rings and
// buffers (the stand-in kernel spins and never touches them).
const (
	dkRings  = 0x2000000
	dkHdr    = 0x2200000
	dkData   = 0x2201000
	dkStatus = 0x2280000
	dkTx     = 0x2300000
)

// diskGuest is a Linux machine (the stand-in kernel) with one disk, and
// the host-side driver of that disk.
type diskGuest struct {
	m     *vmm.Machine
	blk   *linuxtest.Driver
	disk  string
	avail uint16
}

func newDiskGuest(t testing.TB, memSize uint64, diskSize int) *diskGuest {
	t.Helper()
	dir := t.TempDir()
	kernel := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(kernel, linuxtest.Kernel(linuxtest.CodeSpin, 0x100000), 0o600); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk.img")
	content := make([]byte, diskSize)
	for i := range content {
		content[i] = byte(i / 4096)
	}
	if err := os.WriteFile(disk, content, 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := vmm.New(vmm.Config{MemSize: memSize, Linux: &vmm.LinuxConfig{Kernel: kernel, Disks: []vmm.DiskConfig{{Path: disk}}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	blk := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: dkRings, Hdr: dkHdr, TxBufs: dkTx}
	blk.Setup(1)
	return &diskGuest{m: m, blk: blk, disk: disk}
}

// write makes a write of data at block (4 KiB) available to the device,
// which completes it at the machine's next pause (a checkpoint's), and
// waits for that.
func (g *diskGuest) write(t *testing.T, block uint64, data []byte) {
	t.Helper()
	g.blk.Write(dkData, data)
	g.blk.BlockRequest(0, g.avail, virtio.BlockTOut, block*8, dkData, uint32(len(data)), dkStatus)
	g.avail++
	g.blk.Publish(g.avail)
	waitFor(t, "the write's completion at a pause", func() bool { return g.blk.UsedIdx(0) == g.avail })
	if st := g.blk.Read(dkStatus, 1); st[0] != virtio.BlockSOK {
		t.Fatalf("write of block %d: status %d", block, st[0])
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// diskRound writes n blocks, each in its own epoch, tagged with round.
func diskRound(t *testing.T, g *diskGuest, round, n int) {
	t.Helper()
	for i := range n {
		data := bytes.Repeat(fmt.Appendf(nil, "round %d write %d ", round, i), 4096)[:2*4096]
		g.write(t, uint64((round*37+i*11)%250), data)
	}
}

// waitDiskCaughtUp waits until the backup has committed, memory and
// every disk, the primary's last taken epoch (no write is in flight), and
// checks that its replica is then byte for byte the primary's disk.
func waitDiskCaughtUp(t *testing.T, p *Primary, bk *Backup, replica, primaryDisk string) uint64 {
	t.Helper()
	// The last write completed at a checkpoint's pause, of an epoch at
	// most the one open now (seal moves it on during the pause).
	e := p.open.Load()
	waitFor(t, "the backup to commit the primary's epoch", func() bool {
		d := bk.DiskEpochs()
		return bk.Committed() >= e && len(d) == 1 && d[0] == bk.Committed()
	})
	// No write is in flight: the primary's disk is as of every epoch
	// from e on, and the replica is at one of them.
	if got, want := readFile(t, replica), readFile(t, primaryDisk); !bytes.Equal(got, want) {
		t.Fatalf("backup replica at epoch %d differs from the primary's disk (epoch >= %d)", bk.DiskEpochs()[0], e)
	}
	return e
}

// TestDiskReplication protects a Linux machine with a disk (the stand-in
// kernel; the host-side driver writes the disk) over real mTLS links:
// primary, intermediary, backup. Writes made in epochs 1..n reach the
// backup's replica exactly as of its committed epoch; a second backup,
// attached after the first is lost, is seeded with the whole disk (its
// fingerprint checked) and follows; after the primary is cut off, a write
// it made later is not on the activated backup's disk, which equals the
// primary's disk as of the activated epoch, byte for byte, and the
// restored machine takes it (with the replica's fingerprint).
//
// It runs with every epoch forwarded whole, and with hold-back (the
// backup commits several epochs at a time in syncs, each of them staged
// on its disk first).
func TestDiskReplication(t *testing.T) {
	kvmtest.Require(t)
	holdBack, err := ParseHoldBack("threshold=0.5,max-lag-epochs=8,max-lag=100ms")
	if err != nil {
		t.Fatal(err)
	}
	t.Run("forward-every", func(t *testing.T) { testDiskReplication(t, nil) })
	t.Run("hold-back", func(t *testing.T) { testDiskReplication(t, holdBack) })
}

func testDiskReplication(t *testing.T, policy ForwardPolicy) {
	const (
		memSize  = 64 << 20
		diskSize = 1 << 20
	)
	g := newDiskGuest(t, memSize, diskSize)
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetDiskDir(t.TempDir())
	if policy != nil {
		in.SetForwardPolicy(policy)
	}
	go in.ServePrimary(ic)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	replicas := t.TempDir()
	attach := func(name string) (*Backup, string, closer, chan served) {
		ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
		replica := filepath.Join(replicas, name+".img")
		bk, err := NewBackup(memSize, BackupConfig{Disks: []string{replica}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { bk.Close() })
		go in.ServeBackup(ctx, ib)
		done := make(chan served, 1)
		go func() { m, err := bk.Serve(bi); done <- served{m, err} }()
		return bk, replica, bi, done
	}
	bk1, replica1, link1, done1 := attach("backup1")

	p, err := NewPrimary(g.m, pc, PrimaryConfig{Interval: 5 * time.Millisecond, DiskSeedDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	pctx, kill := context.WithCancel(ctx)
	defer kill()
	machineDone := make(chan error, 1)
	go func() { _, err := g.m.Run(pctx); machineDone <- err }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(pctx) }()

	// Epochs 1..n with writes: the replica follows, epoch by epoch.
	waitFor(t, "the backup's seed", func() bool { return bk1.Committed() > 0 })
	diskRound(t, g, 1, 5)
	waitDiskCaughtUp(t, p, bk1, replica1, g.disk)
	diskRound(t, g, 2, 5)
	waitDiskCaughtUp(t, p, bk1, replica1, g.disk)
	// Ten writes of 8 KiB travelled in the epochs' checkpoints (the seed
	// is not counted; a write the seed covered is not sent again).
	if n := p.diskSentB.Load(); n < 5*8192 || n%4096 != 0 {
		t.Errorf("disk bytes sent after two rounds of 5 writes of 8 KiB = %d, want at least one round's and whole blocks", n)
	}

	// The backup is lost; a new one (or, under hold-back, the same one
	// returning on its replica, which Open recovers) is seeded with the
	// whole disk.
	link1.Close()
	<-done1
	waitFor(t, "the intermediary to drop the lost backup", func() bool { return attachedBackup(in) == nil })
	diskRound(t, g, 3, 3) // while no backup is attached
	name := "backup2"
	if policy != nil {
		if err := bk1.Close(); err != nil {
			t.Fatal(err)
		}
		name = "backup1"
	}
	bk2, replica2, _, done2 := attach(name)
	waitFor(t, "the new backup's seed", func() bool { return bk2.Committed() > 0 })
	diskRound(t, g, 4, 5)
	waitDiskCaughtUp(t, p, bk2, replica2, g.disk)
	if n := in.reseeds.Load(); n < 2 {
		t.Errorf("the intermediary re-seeded %d times, want at least 2 (one per backup)", n)
	}
	diskRound(t, g, 5, 3)
	committed := waitDiskCaughtUp(t, p, bk2, replica2, g.disk)
	asCommitted := readFile(t, g.disk)

	// The primary is cut off; its guest writes once more (the pause
	// completes the write on its disk), which no checkpoint carries.
	pc.Close()
	if err := <-primaryDone; err == nil {
		t.Errorf("Primary.Run after its link was cut = nil, want an error")
	}
	later := bytes.Repeat([]byte("LATER WRITE "), 700)[:8192]
	g.blk.Write(dkData, later)
	g.blk.BlockRequest(0, g.avail, virtio.BlockTOut, 3*8, dkData, 8192, dkStatus)
	g.avail++
	g.blk.Publish(g.avail)
	if _, err := g.m.Pause(); err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, g.disk); bytes.Equal(got, asCommitted) || !bytes.Equal(got[3*4096:5*4096], later) {
		t.Fatalf("the later write did not reach the primary's disk")
	}
	kill()
	<-machineDone

	epoch, err := in.Failover(ctx)
	if err != nil {
		t.Fatalf("Failover() = %v", err)
	}
	b := <-done2
	if b.err != nil || b.m == nil {
		t.Fatalf("Backup.Serve() = %v, %v, want a machine", b.m, b.err)
	}
	defer b.m.Close()
	if epoch < committed {
		t.Errorf("failover at epoch %d, before the epoch %d the backup had committed", epoch, committed)
	}
	got := readFile(t, replica2)
	if !bytes.Equal(got, asCommitted) {
		t.Errorf("the activated disk differs from the primary's disk as of epoch %d", epoch)
	}
	if bytes.Contains(got, later[:12]) {
		t.Errorf("the activated disk holds the write the primary made after it was cut off")
	}
	// The restored guest reads the committed disk: a read of the blocks
	// the primary wrote after it was cut off, through the restored
	// device, whose rings are where the primary's driver left them as of
	// the activated epoch.
	rd := &linuxtest.Driver{T: t, Mem: b.m.Memory(), Tr: b.m.VirtioTransport(0), Base: dkRings, Hdr: dkHdr, TxBufs: dkTx}
	avail := binary.LittleEndian.Uint16(rd.Read(dkRings+0x400+2, 2))
	rd.BlockRequest(1, avail, virtio.BlockTIn, 3*8, dkData+0x10000, 8192, dkStatus+1)
	rd.Publish(avail + 1)
	rctx, stop := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { _, err := b.m.Run(rctx); runDone <- err }()
	if _, err := b.m.Pause(); err != nil { // completes the read
		t.Fatal(err)
	}
	if st := rd.Read(dkStatus+1, 1); st[0] != virtio.BlockSOK || rd.UsedIdx(0) != avail+1 {
		t.Errorf("the restored guest's read: status %d, used index %d; want OK and %d", st[0], rd.UsedIdx(0), avail+1)
	} else if data := rd.Read(dkData+0x10000, 8192); !bytes.Equal(data, asCommitted[3*4096:5*4096]) {
		t.Errorf("the restored guest reads blocks 3-4 as %q..., want the committed %q...", data[:16], asCommitted[3*4096:3*4096+16])
	}
	stop()
	<-runDone
	sum := sha256.Sum256(got)
	t.Logf("failover at epoch %d (backup had caught up at %d); disk sha256 %x; intermediary re-seeds %d, syncs %d",
		epoch, committed, sum[:8], in.reseeds.Load(), in.syncs.Load())
	if policy != nil && in.syncs.Load() == 0 {
		t.Errorf("hold-back: no sync was sent")
	}
	if m := metricValue(in.Metrics(), "understudy_intermediary_disk_bytes_total"); m < 21*8192 {
		t.Errorf("understudy_intermediary_disk_bytes_total = %v, want at least the %d bytes written", m, 21*8192)
	}
}

type served struct {
	m   *vmm.Machine
	err error
}

// closer is the backup's link end, closed to lose the backup.
type closer interface{ Close() error }

// seedFor writes a disk seed of content for a checkpoint built by hand.
func seedFor(t *testing.T, content []byte) *DiskSeed {
	t.Helper()
	path := filepath.Join(t.TempDir(), "seed")
	if err := os.WriteFile(path, content, 0o600); err != nil {
		t.Fatal(err)
	}
	fp, err := virtio.NewFingerprint(bytes.NewReader(content), int64(len(content)))
	if err != nil {
		t.Fatal(err)
	}
	return &DiskSeed{Disks: []SeedDisk{{Path: path, Size: uint64(len(content)), Fingerprint: fp.Root()}}}
}

// writesOn returns the DiskWrites of data written at off on content (which
// it updates), with the disk's fingerprint after it.
func writesOn(t *testing.T, content []byte, off uint64, data []byte) *virtio.DiskWrites {
	t.Helper()
	copy(content[off:], data)
	fp, err := virtio.NewFingerprint(bytes.NewReader(content), int64(len(content)))
	if err != nil {
		t.Fatal(err)
	}
	return &virtio.DiskWrites{Size: uint64(len(content)), Fingerprint: fp.Root(), Ranges: []virtio.DiskRange{{Off: off, Data: data}}}
}

// TestDiskWritesRefused: a checkpoint whose disk writes arrive corrupt (a
// range's data no longer matches its CRC) is refused by the intermediary
// (an Error, ErrRefused: no failover) and changes nothing, neither its
// image nor its disks; so is one with writes missing for a disk, and a
// full image whose disk seed does not have the fingerprint it came with.
// The primary then goes on from a full image. Writes whose CRCs are right
// but that do not give the primary's fingerprint are refused by the
// backup's replica, which commits nothing of the epoch.
func TestDiskWritesRefused(t *testing.T) {
	const memSize = 4 << 20
	content := make([]byte, 256<<10)
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetDiskDir(t.TempDir())
	done := make(chan error, 1)
	go func() { done <- in.ServePrimary(ic) }()

	full := testCheckpoint(1, true, 0, 1, 2)
	full.Seed = seedFor(t, content)
	sendAcked(t, pc, full, 0)
	cp := testCheckpoint(2, false, 1)
	cp.Disk = &DiskEpoch{Epoch: 2, Writes: []*virtio.DiskWrites{writesOn(t, content, 8192, bytes.Repeat([]byte{7}, 4096))}}
	sendAcked(t, pc, cp, 1)
	stored := readFile(t, filepath.Join(in.diskDir(), "disk0"))
	if !bytes.Equal(stored, content) {
		t.Fatalf("the intermediary's disk differs from the primary's after epoch 2")
	}

	bad := testCheckpoint(3, false, 2)
	bad.Disk = &DiskEpoch{Epoch: 3, Writes: []*virtio.DiskWrites{writesOn(t, bytes.Clone(content), 0, bytes.Repeat([]byte{9}, 8192))}}
	if err := SendCheckpoint(&diskCorruptingConn{MessageConn: pc}, bad, 2); err != nil {
		t.Fatal(err)
	}
	if we := readError(t, pc); we == nil || we.Code != wire.CodeIncomplete {
		t.Fatalf("reply to corrupt disk writes = %v, want an Error (incomplete)", we)
	}
	if err := <-done; !errors.Is(err, ErrRefused) {
		t.Errorf("ServePrimary after corrupt disk writes = %v, want ErrRefused (no failover)", err)
	}
	if e := in.Image().Epoch(); e != 2 {
		t.Errorf("intermediary epoch %d after the refusal, want 2", e)
	}
	if got := readFile(t, filepath.Join(in.diskDir(), "disk0")); !bytes.Equal(got, content) {
		t.Errorf("the refused checkpoint changed the intermediary's disk")
	}

	// A reconnected primary: a delta without a disk's writes, and a full
	// image whose seed is not what its fingerprint says, are refused too.
	for i, send := range []func(c MessageConn) error{
		func(c MessageConn) error { return SendCheckpoint(c, testCheckpoint(3, false, 2), 2) },
		func(c MessageConn) error {
			cp := testCheckpoint(3, true, 0, 1)
			cp.Seed = seedFor(t, content)
			cp.Seed.Disks[0].Fingerprint[0] ^= 1
			return SendCheckpoint(c, cp, 0)
		},
	} {
		pc, ic := link(t, memSize)
		go func() { done <- in.ServePrimary(ic) }()
		if err := send(pc); err != nil {
			t.Fatal(err)
		}
		if we := readError(t, pc); we == nil {
			t.Fatalf("case %d: no refusal", i)
		}
		if err := <-done; !errors.Is(err, ErrRefused) {
			t.Errorf("case %d: ServePrimary = %v, want ErrRefused", i, err)
		}
		if e := in.Image().Epoch(); e != 2 {
			t.Errorf("case %d: intermediary epoch %d after the refusal, want 2", i, e)
		}
	}

	// The backup's replica checks the fingerprint: writes that are
	// intact on the wire but do not give the primary's disk are refused,
	// and nothing of the epoch is committed.
	bk, err := NewBackup(memSize, BackupConfig{Disks: []string{filepath.Join(t.TempDir(), "replica.img")}})
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	bcontent := make([]byte, len(content))
	seedCp := testCheckpoint(1, true, 0)
	seedCp.Seed = seedFor(t, bcontent)
	if err := bk.commit(seedCp, 0); err != nil {
		t.Fatalf("backup seed: %v", err)
	}
	w := writesOn(t, bytes.Clone(bcontent), 4096, bytes.Repeat([]byte{1}, 4096))
	w.Fingerprint[5] ^= 1
	if err := bk.stageDisks(&DiskEpoch{Epoch: 2, Writes: []*virtio.DiskWrites{w}}); !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("staging writes with the wrong fingerprint = %v, want ErrBadCheckpoint", err)
	}
	if err := bk.commit(testCheckpoint(2, false, 1), 1); err == nil {
		t.Errorf("the backup committed epoch 2 without its disk writes")
	}
	if got := bk.DiskEpochs(); len(got) != 1 || got[0] != 1 || bk.Committed() != 1 {
		t.Errorf("backup at memory epoch %d, disks %v; want 1 and [1]", bk.Committed(), got)
	}
}

// FuzzDiskAssembly feeds arbitrary DiskWrites frames to the receiver's
// assembly: never a panic; what it accepts decodes and joins.
func FuzzDiskAssembly(f *testing.F) {
	w := &virtio.DiskWrites{Size: 1 << 20, Ranges: []virtio.DiskRange{{Off: 4096, Data: make([]byte, 4096)}}}
	enc, err := w.AppendBinary(nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(uint32(0), uint32(1), uint32(0), uint32(1), enc, []byte{})
	f.Add(uint32(0), uint32(2), uint32(0), uint32(2), enc, enc)
	f.Fuzz(func(t *testing.T, disk, disks, part, parts uint32, a, b []byte) {
		var asm diskAssembly
		for _, data := range [][]byte{a, b} {
			m := &wire.DiskWrites{Epoch: 3, Disk: disk, Disks: disks, Part: part, Parts: parts, Data: data}
			body, err := m.MarshalBinary()
			if err != nil {
				return
			}
			var got wire.DiskWrites
			if err := got.UnmarshalBinary(body); err != nil {
				t.Fatalf("a message that encodes does not decode: %v", err)
			}
			if err := asm.add(&got); err != nil {
				if !errors.Is(err, ErrBadCheckpoint) {
					t.Fatalf("add: %v, want ErrBadCheckpoint", err)
				}
				return
			}
			part++
			if part == parts {
				disk, part = disk+1, 0
			}
		}
		if asm.complete() {
			for _, w := range asm.result().Writes {
				if _, err := w.AppendBinary(nil); err != nil {
					t.Fatalf("accepted writes do not encode: %v", err)
				}
			}
		}
	})
}

// TestDiskDirectToBackup: a primary replicating straight to the backup
// (its policy for a lost intermediary) sends each epoch's disk writes
// inside its checkpoints, and the full image's disks as a seed; the
// backup stages and commits them with each checkpoint. When the primary
// is lost, the backup activates its committed epoch by itself on a disk
// equal, byte for byte, to the primary's as of that epoch, without a
// write the primary made after its link was cut.
func TestDiskDirectToBackup(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 64 << 20
	g := newDiskGuest(t, memSize, 1<<20)
	pc, bc := roleLink(t, memSize, wire.RolePrimary, wire.RoleBackup)
	replica := filepath.Join(t.TempDir(), "replica.img")
	bk, err := NewBackup(memSize, BackupConfig{Disks: []string{replica}})
	if err != nil {
		t.Fatal(err)
	}
	defer bk.Close()
	done := make(chan served, 1)
	go func() { m, err := bk.ServeDirect(bc); done <- served{m, err} }()
	p, err := NewPrimary(g.m, pc, PrimaryConfig{Interval: 5 * time.Millisecond, DiskSeedDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, kill := context.WithCancel(context.Background())
	defer kill()
	machineDone := make(chan error, 1)
	go func() { _, err := g.m.Run(ctx); machineDone <- err }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(ctx) }()
	waitFor(t, "the backup's seed", func() bool { return bk.Committed() > 0 })
	diskRound(t, g, 1, 6)
	waitDiskCaughtUp(t, p, bk, replica, g.disk)
	diskRound(t, g, 2, 4)
	committed := waitDiskCaughtUp(t, p, bk, replica, g.disk)
	asCommitted := readFile(t, g.disk)

	pc.Close()
	<-primaryDone
	g.blk.Write(dkData, bytes.Repeat([]byte{0xee}, 4096))
	g.blk.BlockRequest(0, g.avail, virtio.BlockTOut, 8, dkData, 4096, dkStatus)
	g.avail++
	g.blk.Publish(g.avail)
	if _, err := g.m.Pause(); err != nil {
		t.Fatal(err)
	}
	kill()
	<-machineDone
	// The link ends (nil), or breaks under the backup's acknowledgement
	// of the last checkpoint (an error): either way no machine.
	if b := <-done; b.m != nil || errors.Is(b.err, ErrProtectionEnded) {
		t.Fatalf("ServeDirect after the primary was lost = %v, %v; want no machine and no end of protection", b.m, b.err)
	}
	epoch := bk.Committed()
	m, err := bk.Activate(epoch)
	if err != nil {
		t.Fatalf("Activate(%d) = %v", epoch, err)
	}
	defer m.Close()
	if epoch < committed {
		t.Errorf("activated epoch %d, before the %d the backup had committed", epoch, committed)
	}
	if got := readFile(t, replica); !bytes.Equal(got, asCommitted) {
		t.Errorf("the activated disk differs from the primary's as of epoch %d", epoch)
	}
}

func metricValue(ms []Metric, name string) float64 {
	for _, m := range ms {
		if m.Name == name {
			return m.Value
		}
	}
	return -1
}

// TestDiskCorruptFromPrimary: a live primary whose checkpoint's disk
// writes arrive corrupt (the corrupt-disk failpoint flips a byte after the
// ranges' CRCs were computed) is refused by the intermediary: its Run
// ends with the intermediary's Error, the intermediary stays at the epoch
// before, does not fence the primary (no failover) and its disks are as
// of that epoch.
func TestDiskCorruptFromPrimary(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 64 << 20
	g := newDiskGuest(t, memSize, 1<<20)
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetDiskDir(t.TempDir())
	served := make(chan error, 1)
	go func() { served <- in.ServePrimary(ic) }()
	p, err := NewPrimary(g.m, pc, PrimaryConfig{Interval: 5 * time.Millisecond, DiskSeedDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	const bad = 12
	failAt = armedFailpoint{failCorruptDisk, bad}
	defer func() { failAt = armedFailpoint{} }()
	ctx, kill := context.WithCancel(context.Background())
	defer kill()
	machineDone := make(chan error, 1)
	go func() { _, err := g.m.Run(ctx); machineDone <- err }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(ctx) }()
	var we *wire.Error
	if err := <-primaryDone; !errors.As(err, &we) || we.Code != wire.CodeIncomplete {
		t.Errorf("Primary.Run with corrupt disk writes at epoch %d = %v, want the intermediary's refusal", bad, err)
	}
	if err := <-served; !errors.Is(err, ErrRefused) {
		t.Errorf("ServePrimary = %v, want ErrRefused", err)
	}
	kill()
	<-machineDone
	if e := in.Image().Epoch(); e != bad-1 {
		t.Errorf("intermediary at epoch %d after refusing epoch %d, want %d", e, bad, bad-1)
	}
	if in.Fenced() {
		t.Errorf("the intermediary fenced the primary after a refusal")
	}
	if in.disks.epoch != bad-1 || len(in.disks.disks) != 1 {
		t.Errorf("intermediary disks at epoch %d (%d disks), want %d", in.disks.epoch, len(in.disks.disks), bad-1)
	}
}

// FuzzSeedReceiver feeds arbitrary DiskSeed frames to the receiver of a
// checkpoint's disk seed: never a panic; a refusal is ErrBadCheckpoint;
// what it accepts is a seed of the disks announced, each file of its size.
func FuzzSeedReceiver(f *testing.F) {
	f.Add(uint32(0), uint32(1), uint64(8192), uint64(0), uint64(4096), []byte{1, 2, 3})
	f.Add(uint32(0), uint32(2), uint64(4096), uint64(0), uint64(0), []byte{1})
	f.Fuzz(func(t *testing.T, disk, disks uint32, size, off1, off2 uint64, data []byte) {
		if size > 1<<20 {
			size %= 1 << 20 // keep the files small
		}
		r := seedReceiver{dirOf: func() string { return t.TempDir() }}
		defer r.abort()
		for i, off := range []uint64{off1, off2} {
			m := &wire.DiskSeed{Epoch: 4, Disk: disk + uint32(i)*(disks-disk-1)%2, Disks: disks, Size: size, Offset: off, Data: data}
			body, err := m.MarshalBinary()
			if err != nil {
				return
			}
			var got wire.DiskSeed
			if err := got.UnmarshalBinary(body); err != nil {
				t.Fatalf("a message that encodes does not decode: %v", err)
			}
			if err := r.add(4, &got); err != nil {
				if !errors.Is(err, ErrBadCheckpoint) {
					t.Fatalf("add: %v, want ErrBadCheckpoint", err)
				}
				return
			}
		}
		seed, err := r.finish()
		if err != nil {
			if !errors.Is(err, ErrBadCheckpoint) {
				t.Fatalf("finish: %v", err)
			}
			return
		}
		if seed == nil || len(seed.Disks) != int(disks) {
			t.Fatalf("finish() = %v, want a seed of %d disks", seed, disks)
		}
		for _, d := range seed.Disks {
			if fi, err := os.Stat(d.Path); err != nil || uint64(fi.Size()) != d.Size {
				t.Fatalf("seed file %s: %v, want %d bytes", d.Path, err, d.Size)
			}
		}
		seed.Remove()
	})
}

// TestDiskAssemblyParts: an epoch's writes split into parts (as a sender
// splits them below the frame limit) are put back together exactly; a
// part out of order, one of another epoch, or one overlapping the part
// before is refused.
func TestDiskAssemblyParts(t *testing.T) {
	const mib = 1 << 20
	w := &virtio.DiskWrites{Disk: 0, Size: 64 * mib, Fingerprint: [32]byte{7}}
	for i := range 3 {
		w.Ranges = append(w.Ranges, virtio.DiskRange{Off: uint64(i) * 8 * mib, Data: bytes.Repeat([]byte{byte(i + 1)}, virtio.MaxWriteRange)})
	}
	parts, err := w.Split(virtio.MaxWriteRange + 100)
	if err != nil || len(parts) != 3 {
		t.Fatalf("Split = %d parts, %v; want 3", len(parts), err)
	}
	frames := func(epoch uint64) []*wire.DiskWrites {
		var out []*wire.DiskWrites
		for j, p := range parts {
			b, err := p.AppendBinary(nil)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, &wire.DiskWrites{Epoch: epoch, Disk: 0, Disks: 1, Part: uint32(j), Parts: uint32(len(parts)), Data: b})
		}
		return out
	}
	var a diskAssembly
	for _, f := range frames(9) {
		if err := a.add(f); err != nil {
			t.Fatal(err)
		}
	}
	if !a.complete() {
		t.Fatal("not complete after every part")
	}
	got := a.result()
	if got.Epoch != 9 || len(got.Writes) != 1 || len(got.Writes[0].Ranges) != 3 || got.Writes[0].Bytes() != w.Bytes() {
		t.Fatalf("assembled %+v, want the 3 ranges of epoch 9", got)
	}
	for i, r := range got.Writes[0].Ranges {
		if r.Off != w.Ranges[i].Off || !bytes.Equal(r.Data, w.Ranges[i].Data) {
			t.Errorf("range %d differs", i)
		}
	}
	fs := frames(9)
	other := frames(10)
	overlap := *fs[1]
	overlap.Data = bytes.Clone(fs[0].Data) // part 1 holding part 0's range again
	overlap.Part = 1
	for name, seq := range map[string][]*wire.DiskWrites{
		"out of order":    {fs[1]},
		"skipped part":    {fs[0], fs[2]},
		"another epoch":   {fs[0], other[1]},
		"overlapping":     {fs[0], &overlap},
		"after the epoch": {fs[0], fs[1], fs[2], fs[0]},
	} {
		var a diskAssembly
		var err error
		for _, f := range seq {
			if err = a.add(f); err != nil {
				break
			}
		}
		if !errors.Is(err, ErrBadCheckpoint) {
			t.Errorf("%s: add = %v, want ErrBadCheckpoint", name, err)
		}
	}
}
