package vmm

import (
	"bytes"
	"context"
	"errors"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"os"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// TestTakeDiskWrites drives a Linux machine's virtio-blk disk from the host
// side (the stand-in kernel spins): writes made available before a pause
// complete at the pause and are harvested there with their exact 4 KiB
// ranges and the file's bytes; a read is not harvested; a second harvest
// is empty; returned writes are harvested again; a running machine is
// refused.
func TestTakeDiskWrites(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	disk := make([]byte, 1<<20)
	for i := range disk {
		disk[i] = byte(i / 512)
	}
	diskPath := writeTemp(t, dir, "disk.img", disk)
	cfg := linuxConfig(t, linuxtest.CodeSpin)
	cfg.Linux.Disks = []DiskConfig{{Path: writeTemp(t, dir, "ro.img", disk[:65536]), ReadOnly: true}, {Path: diskPath}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	blk := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(1), Base: tBlkRings, Hdr: tHdr, TxBufs: tTxBufs}
	blk.Setup(1)
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	if _, err := m.TakeDiskWrites(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("TakeDiskWrites() of a running machine = %v, want ErrNotPaused", err)
	}

	// Epoch 1: a write of sectors 9..16 (blocks 1 and 2) and a read.
	data1 := bytes.Repeat([]byte("epoch one "), 410)[:4096]
	blk.Write(tData, data1)
	blk.BlockRequest(0, 0, virtio.BlockTOut, 9, tData, 4096, tStatus)
	blk.BlockRequest(1, 1, virtio.BlockTIn, 100, tData+0x2000, 512, tStatus+1)
	blk.Publish(2)
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	if got := blk.UsedIdx(0); got != 2 {
		t.Fatalf("used index %d after the pause, want 2", got)
	}
	ws, err := m.TakeDiskWrites()
	if err != nil {
		t.Fatal(err)
	}
	if len(ws) != 2 || ws[0].Disk != 0 || ws[1].Disk != 1 || len(ws[0].Ranges) != 0 {
		t.Fatalf("TakeDiskWrites() = %d disks %+v, want 2, the read-only one without writes", len(ws), ws)
	}
	w := ws[1]
	if len(w.Ranges) != 1 || w.Ranges[0].Off != 4096 || len(w.Ranges[0].Data) != 8192 {
		t.Fatalf("disk 1 ranges %v, want one of [4096, +8192)", rangesOf(w))
	}
	file, err := os.ReadFile(diskPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(file[9*512:9*512+4096], data1) {
		t.Fatalf("the write did not reach the disk file")
	}
	if !bytes.Equal(w.Ranges[0].Data, file[4096:12288]) {
		t.Errorf("harvested bytes differ from the file's")
	}
	fp, err := virtio.NewFingerprint(bytes.NewReader(file), int64(len(file)))
	if err != nil {
		t.Fatal(err)
	}
	if w.Fingerprint != fp.Root() {
		t.Errorf("harvested fingerprint %x, the file's %x", w.Fingerprint[:8], fp.Root())
	}
	// The encoding round-trips what the harvest produced.
	enc, err := w.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := virtio.DecodeDiskWrites(enc); err != nil {
		t.Errorf("DecodeDiskWrites(harvest) = %v", err)
	}
	if ws, err := m.TakeDiskWrites(); err != nil || len(ws[1].Ranges) != 0 {
		t.Errorf("second TakeDiskWrites() = %v, %v; want no ranges", ws, err)
	}
	m.ReturnDiskWrites([]*virtio.DiskWrites{w})
	if n := m.PendingDiskWrites(); n != 2 {
		t.Errorf("PendingDiskWrites() after ReturnDiskWrites = %d, want 2", n)
	}
	if ws, err := m.TakeDiskWrites(); err != nil || len(ws[1].Ranges) != 1 || !bytes.Equal(ws[1].Ranges[0].Data, file[4096:12288]) {
		t.Errorf("TakeDiskWrites() after ReturnDiskWrites = %v, %v; want the returned range again", ws, err)
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}

	// Epoch 2: only a read.
	blk.BlockRequest(0, 2, virtio.BlockTIn, 0, tData, 4096, tStatus)
	blk.Publish(3)
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	if got := blk.UsedIdx(0); got != 3 {
		t.Fatalf("used index %d after the pause, want 3", got)
	}
	if ws, err := m.TakeDiskWrites(); err != nil || len(ws[1].Ranges) != 0 {
		t.Errorf("TakeDiskWrites() after a read = %v, %v; want no ranges", ws, err)
	}
	// The state's fingerprint is the harvest's: one fingerprint, kept up
	// to date by both.
	st, err := m.VirtioTransport(1).SaveState()
	if err != nil {
		t.Fatal(err)
	}
	_, _, body, err := virtio.DecodeTransportState(st)
	if err != nil {
		t.Fatal(err)
	}
	bs, err := virtio.DecodeBlockState(body)
	if err != nil {
		t.Fatal(err)
	}
	if bs.Fingerprint != w.Fingerprint {
		t.Errorf("state fingerprint %x, harvest's %x", bs.Fingerprint[:8], w.Fingerprint[:8])
	}
	// A seed's copy of the disk, at this pause.
	clone := dir + "/clone.img"
	if err := m.CloneDisk(1, clone); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(clone); !bytes.Equal(got, file) {
		t.Errorf("CloneDisk(1) differs from the disk")
	}
	if err := m.CloneDisk(2, dir+"/none.img"); err == nil {
		t.Errorf("CloneDisk(2) of a machine with 2 disks succeeded")
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := m.CloneDisk(1, dir+"/running.img"); !errors.Is(err, ErrNotPaused) {
		t.Errorf("CloneDisk of a running machine = %v, want ErrNotPaused", err)
	}
	m.Stop(0)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A restore given the disk's fingerprint (DiskConfig.Fingerprint, as the
// backup's replica knows it) checks the state against that one: the right
// one restores, another is refused although the disk itself matches.
func TestRestoreWithGivenFingerprint(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	disk := make([]byte, 1<<20)
	for i := range disk {
		disk[i] = byte(i/4096 + 3)
	}
	diskPath := writeTemp(t, dir, "disk.img", disk)
	cfg := linuxConfig(t, linuxtest.CodeSpin)
	cfg.Linux.Disks = []DiskConfig{{Path: diskPath}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	var snap bytes.Buffer
	if err := m.SaveSnapshot(&snap); err != nil {
		t.Fatal(err)
	}
	m.Stop(0)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	m.Close()

	right, err := virtio.NewFingerprint(bytes.NewReader(disk), int64(len(disk)))
	if err != nil {
		t.Fatal(err)
	}
	other := bytes.Clone(disk)
	other[100] ^= 1
	wrong, _ := virtio.NewFingerprint(bytes.NewReader(other), int64(len(other)))
	for _, c := range []struct {
		name string
		fp   *virtio.Fingerprint
		ok   bool
	}{
		{"read from the disk", nil, true},
		{"given, the disk's", right, true},
		{"given, another disk's", wrong, false},
	} {
		r, err := RestoreSnapshot(RestoreConfig{Disks: []DiskConfig{{Path: diskPath, Fingerprint: c.fp}}}, bytes.NewReader(snap.Bytes()))
		if c.ok && err != nil {
			t.Errorf("%s: restore = %v", c.name, err)
		}
		if !c.ok && (err == nil || !strings.Contains(err.Error(), "fingerprint")) {
			t.Errorf("%s: restore = %v, want a fingerprint refusal", c.name, err)
		}
		if r != nil {
			r.Close()
		}
	}
}
