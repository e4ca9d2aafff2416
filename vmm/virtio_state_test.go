package vmm

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/internal/linuxtest"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// The tests here drive a Linux machine's virtio-mmio transports from the
// host side, as a driver in the guest would (the stand-in kernel spins),
// with the rings in guest memory: a real virtio-blk disk file and a real
// tap device.

// makeTap creates a tap device that is up, deleted when the test ends
// (linuxtest.MakeTap).
func makeTap(t *testing.T) string { return linuxtest.MakeTap(t, "uvm") }

// Guest-physical addresses the tests use (the stand-in kernel is at 1 MiB).
const (
	tBlkRings = 0x2000000
	tNetRings = 0x2100000
	tHdr      = 0x2200000
	tData     = 0x2201000 // a page of its own
	tStatus   = 0x2202000
)

// TestLinuxVirtioSnapshotRoundTrip runs a Linux machine with a virtio-blk
// and a virtio-net device, makes a block read available without notifying,
// and pauses: the read completes at the pause, before the dirty pages are
// harvested, so its data is both in guest memory and in the harvested set.
// A snapshot of the machine then restores, with the disk and the tap given
// again, into a machine whose transports have the same state; a disk of
// another size or content, or another MAC, is refused with no machine.
func TestLinuxVirtioSnapshotRoundTrip(t *testing.T) {
	requireKVM(t)
	tap := makeTap(t)
	dir := t.TempDir()
	disk := make([]byte, 1<<20)
	for i := range 512 {
		disk[3*512+i] = byte(i*7 + 1)
	}
	diskPath := writeTemp(t, dir, "disk.img", disk)
	cfg := linuxConfig(t, linuxtest.CodeSpin)
	cfg.Linux.Disks = []DiskConfig{{Path: diskPath}}
	cfg.Linux.Nets = []NetConfig{{Tap: tap}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	blk := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: tBlkRings, Hdr: tHdr, TxBufs: tTxBufs}
	nic := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(1), Base: tNetRings, Hdr: tHdr, TxBufs: tTxBufs}
	blk.Setup(1)
	nic.Setup(2)
	dl, err := m.Memory().EnableDirtyLog(m.VM())
	if err != nil {
		t.Fatal(err)
	}
	bitmap := make([]uint64, m.Memory().BitmapWords())
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()

	blk.BlockRequest(0, 0, virtio.BlockTIn, 3, tData, 512, tStatus)
	blk.Publish(1)
	if _, err := dl.Harvest(bitmap); err != nil { // what the "guest" wrote so far
		t.Fatal(err)
	}
	clear(bitmap)
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	if _, err := dl.Harvest(bitmap); err != nil {
		t.Fatal(err)
	}
	if got := blk.UsedIdx(0); got != 1 {
		t.Fatalf("used index %d after the pause, want 1: the available read did not complete", got)
	}
	if got := blk.Read(tData, 512); !bytes.Equal(got, disk[3*512:4*512]) {
		t.Errorf("read data in guest memory differs from sector 3")
	}
	if s := blk.Read(tStatus, 1)[0]; s != 0 {
		t.Errorf("request status %d, want 0 (OK)", s)
	}
	if page := tData / 4096; bitmap[page/64]&(1<<(page%64)) == 0 {
		t.Errorf("the read data's page %#x is not in the harvested dirty set", uint64(tData))
	}
	var snap bytes.Buffer
	if err := m.SaveSnapshot(&snap); err != nil {
		t.Fatal(err)
	}
	st, _, err := ReadSnapshot(bytes.NewReader(snap.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Devices.Virtio) != 2 {
		t.Fatalf("snapshot has %d virtio sections, want 2", len(st.Devices.Virtio))
	}
	for i, id := range []uint32{virtio.DeviceIDBlock, virtio.DeviceIDNet} {
		if _, got, _, err := virtio.DecodeTransportState(st.Devices.Virtio[i]); err != nil || got != id {
			t.Errorf("virtio section %d: device %d, %v; want device %d", i, got, err, id)
		}
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	if m.VirtioTransport(0).Quiesced() {
		t.Errorf("the transport is still quiesced after Resume")
	}
	m.Stop(0)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mac := m.linux.virtio[1].dev.(*virtio.Net).MAC()
	m.Close() // lets go of the tap

	restore := func(disks []DiskConfig, nets []NetConfig) (*Machine, error) {
		return RestoreSnapshot(RestoreConfig{Disks: disks, Nets: nets}, bytes.NewReader(snap.Bytes()))
	}
	// Refusals: one error, no machine.
	short := writeTemp(t, dir, "short.img", disk[:1<<19])
	other := bytes.Clone(disk)
	other[5*512] ^= 1
	otherPath := writeTemp(t, dir, "other.img", other)
	for _, c := range []struct {
		name  string
		disks []DiskConfig
		nets  []NetConfig
		want  string
	}{
		{"other size", []DiskConfig{{Path: short}}, []NetConfig{{Tap: tap}}, "524288 bytes"},
		{"other content", []DiskConfig{{Path: otherPath}}, []NetConfig{{Tap: tap}}, "fingerprint"},
		{"missing disk", []DiskConfig{{Path: dir + "/none.img"}}, []NetConfig{{Tap: tap}}, "none.img"},
		{"no disk given", nil, []NetConfig{{Tap: tap}}, "1 disks and 1 network interfaces"},
		{"read-only", []DiskConfig{{Path: diskPath, ReadOnly: true}}, []NetConfig{{Tap: tap}}, "read-only"},
		{"other MAC", []DiskConfig{{Path: diskPath}}, []NetConfig{{Tap: tap, MAC: net.HardwareAddr{2, 0, 0, 0, 0, 9}}}, "MAC"},
	} {
		r, err := restore(c.disks, c.nets)
		if err == nil || r != nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: restore = %v, %v; want one line of error with %q and no machine", c.name, r, err, c.want)
		}
		if r != nil {
			r.Close()
		}
	}

	rarps := countRARP(t, tap, mac)
	r, err := restore([]DiskConfig{{Path: diskPath}}, []NetConfig{{Tap: tap, MAC: mac}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The restored NIC announces itself: announceRounds RARP frames.
	var seen int
	testutil.WaitFor(t, "the restored NIC's RARP announcements", func() bool {
		seen += rarps()
		return seen >= announceRounds
	}, func() string { return fmt.Sprintf("%d RARP frames seen", seen) })
	if got := r.linux.virtio[1].dev.(*virtio.Net).MAC(); !bytes.Equal(got, mac) {
		t.Errorf("restored MAC %s, want the snapshot's %s", got, mac)
	}
	if r.linux.virtio[0].t.Quiesced() {
		t.Errorf("restored transport still quiesced: restore must resume it")
	}
	if got := le.Uint16(must(r.Memory().Slice(tBlkRings+0x802, 2))); got != 1 {
		t.Errorf("restored used index %d, want 1", got)
	}
	for i, s := range r.linux.virtio {
		if err := s.t.Quiesce(); err != nil {
			t.Fatal(err)
		}
		b, err := s.t.SaveState()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, st.Devices.Virtio[i]) {
			t.Errorf("virtio device %d: restored state differs from the snapshot's", i)
		}
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// countRARP opens a packet socket on tap and returns a function that counts
// the RARP frames from mac that have arrived since its last call.
func countRARP(t *testing.T, tap string, mac net.HardwareAddr) func() int {
	t.Helper()
	ifi, err := net.InterfaceByName(tap)
	if err != nil {
		t.Fatal(err)
	}
	proto := uint16(unix.ETH_P_ALL<<8&0xff00 | unix.ETH_P_ALL>>8)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, int(proto))
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		t.Fatalf("bind AF_PACKET to %s: %v", tap, err)
	}
	buf := make([]byte, 65536)
	return func() int {
		n := 0
		for {
			k, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				return n
			}
			if k >= 22 && bytes.Equal(buf[6:12], mac) && buf[12] == 0x80 && buf[13] == 0x35 && bytes.Equal(buf[22:28], mac) {
				n++
			}
		}
	}
}
