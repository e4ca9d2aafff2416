package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/testutil"
	"golang.org/x/sys/unix"
)

var tapSeq atomic.Int32

// makeTunTap creates a persistent tun or tap interface (flags IFF_TAP or
// IFF_TUN) with a unique name, brings it up with IPv6 off (so the host
// sends nothing on its own), and deletes it when the test ends. It skips
// the test when the process lacks CAP_NET_ADMIN.
func makeTunTap(t *testing.T, kind uint16) string {
	t.Helper()
	name := fmt.Sprintf("uvt%d_%d", os.Getpid()%100000, tapSeq.Add(1))
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/net/tun: %v", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(kind | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("cannot create tap device %s: %v (needs CAP_NET_ADMIN)", name, err)
		}
		t.Fatalf("TUNSETIFF %s: %v", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		t.Fatalf("TUNSETPERSIST %s: %v", name, err)
	}
	t.Cleanup(func() {
		// Runs after the device under test let go of the interface.
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Errorf("delete %s: %v", name, err)
			return
		}
		defer unix.Close(fd)
		ifr, _ := unix.NewIfreq(name)
		ifr.SetUint16(kind | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			t.Errorf("delete %s: TUNSETIFF: %v", name, err)
			return
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0); err != nil {
			t.Errorf("delete %s: TUNSETPERSIST 0: %v", name, err)
		}
	})
	if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("disable IPv6 on %s: %v", name, err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatalf("SIOCGIFFLAGS %s: %v", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		t.Fatalf("bring %s up: %v", name, err)
	}
	return name
}

// packetSocket is the host's side of the tap: an AF_PACKET socket bound to
// it sees the frames the guest sends, and frames written to it go to the
// guest.
type packetSocket struct {
	t  *testing.T
	fd int
}

const testEtherType = 0x88b5 // IEEE 802 local experimental

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func newPacketSocket(t *testing.T, ifname string) *packetSocket {
	t.Helper()
	ifi, err := net.InterfaceByName(ifname)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
		t.Fatalf("bind AF_PACKET to %s: %v", ifname, err)
	}
	tv := unix.NsecToTimeval((200 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return &packetSocket{t: t, fd: fd}
}

// frame builds an Ethernet frame of the test EtherType.
func frame(dst, src net.HardwareAddr, payload string) []byte {
	f := append(append(append([]byte(nil), dst...), src...), byte(testEtherType>>8), byte(testEtherType&0xff))
	return append(f, payload...)
}

func (p *packetSocket) send(f []byte) {
	p.t.Helper()
	if _, err := unix.Write(p.fd, f); err != nil {
		p.t.Fatalf("send frame on the tap: %v", err)
	}
}

// recv returns the next incoming frame of the test EtherType, or fails
// after 5 s.
func (p *packetSocket) recv() []byte {
	p.t.Helper()
	buf := make([]byte, 65536)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(p.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			p.t.Fatalf("recvfrom: %v", err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if n >= 14 && binary.BigEndian.Uint16(buf[12:]) == testEtherType {
			return append([]byte(nil), buf[:n]...)
		}
	}
	p.t.Fatalf("no frame from the guest within 5 s")
	return nil
}

var (
	guestMAC = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	hostMAC  = net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}
)

func newNetDriver(t *testing.T, tap string) (*testDriver, *Net) {
	t.Helper()
	n, err := NewNet(tap, guestMAC)
	if err != nil {
		t.Fatalf("NewNet(%q) = %v", tap, err)
	}
	d := newDriver(t, n)
	d.init(16)
	return d, n
}

// postRx makes count receive buffers of size bytes available and returns
// their descriptors by head.
func (d *testDriver) postRx(count int, size uint32) map[uint16]desc {
	out := map[uint16]desc{}
	for range count {
		ds := d.chain(buf{n: size, write: true})
		out[d.submit(netRxQueue, ds)] = ds[0]
	}
	if err := d.notify(netRxQueue); err != nil {
		d.t.Fatalf("notify rx: %v", err)
	}
	return out
}

// waitUsed polls the used ring of queue qi until want entries arrived.
func (d *testDriver) waitUsed(qi, want int) []usedElem {
	d.t.Helper()
	var got []usedElem
	deadline := time.Now().Add(5 * time.Second)
	for len(got) < want && time.Now().Before(deadline) {
		got = append(got, d.takeUsed(qi)...)
		time.Sleep(time.Millisecond)
	}
	if len(got) != want {
		d.t.Fatalf("queue %d: %d used entries, want %d", qi, len(got), want)
	}
	return got
}

func TestNetConfig(t *testing.T) {
	d, n := newNetDriver(t, makeTunTap(t, unix.IFF_TAP))
	if got := d.read(regDeviceID); got != DeviceIDNet {
		t.Errorf("DeviceID = %d, want %d", got, DeviceIDNet)
	}
	if f := d.deviceFeatures(); f&NetFMAC == 0 || f&FeatureVersion1 == 0 {
		t.Errorf("features = %#x, want MAC and VERSION_1", f)
	}
	cfg := make([]byte, 8)
	for i := range cfg {
		if err := d.tr.Read(regConfig+uint64(i), cfg[i:i+1]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(cfg[:6], guestMAC) || !bytes.Equal(n.MAC(), guestMAC) {
		t.Errorf("config MAC = %v, want %v", net.HardwareAddr(cfg[:6]), guestMAC)
	}
	if st := binary.LittleEndian.Uint16(cfg[6:]); st != netStatusLinkUp {
		t.Errorf("config status = %d, want link up", st)
	}
}

func TestNetTransmit(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)

	want := frame(hostMAC, guestMAC, "hello from the guest")
	hdr := make([]byte, NetHeaderSize)
	// Header and frame in one descriptor, then split over three.
	d.submit(netTxQueue, d.chain(buf{data: append(hdr, want...)}))
	if err := d.notify(netTxQueue); err != nil {
		t.Fatalf("notify tx: %v", err)
	}
	if got := ps.recv(); !bytes.Equal(got, want) {
		t.Errorf("tap got %x, want %x", got, want)
	}
	want2 := frame(hostMAC, guestMAC, "second frame, in pieces")
	d.submit(netTxQueue, d.chain(buf{data: hdr}, buf{data: want2[:10]}, buf{data: want2[10:]}))
	if err := d.notify(netTxQueue); err != nil {
		t.Fatalf("notify tx: %v", err)
	}
	if got := ps.recv(); !bytes.Equal(got, want2) {
		t.Errorf("tap got %x, want %x", got, want2)
	}
	used := d.takeUsed(netTxQueue)
	if len(used) != 2 || used[0].len != 0 || used[1].len != 0 {
		t.Errorf("tx used entries = %+v, want two of length 0", used)
	}
	if s := d.ackInterrupt(); s&InterruptUsedBuffer == 0 {
		t.Errorf("InterruptStatus = %#x, want the used-buffer bit", s)
	}

	// A transmit chain with a device-writable descriptor is dropped.
	d.submit(netTxQueue, d.chain(buf{data: append(hdr, want...)}, buf{n: 64, write: true}))
	wantErr(t, "notify tx with a writable descriptor", d.notify(netTxQueue), ErrBadRequest)
	// So is one shorter than the header.
	d.submit(netTxQueue, d.chain(buf{data: hdr[:4]}))
	wantErr(t, "notify tx with a short header", d.notify(netTxQueue), ErrBadRequest)
	if used := d.takeUsed(netTxQueue); len(used) != 2 {
		t.Errorf("bad tx chains: %d used entries, want 2 (returned unused)", len(used))
	}
	if s := n.Stats(); s.TxFrames != 2 || s.TxErrors != 2 {
		t.Errorf("stats = %+v, want 2 frames and 2 errors", s)
	}
}

func TestNetReceive(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)

	bufs := d.postRx(2, 1526)
	irqs := d.irqs.Load()
	want := frame(guestMAC, hostMAC, "hello from the host")
	ps.send(want)
	used := d.waitUsed(netRxQueue, 1)
	b, ok := bufs[uint16(used[0].id)]
	if !ok || used[0].len != uint32(NetHeaderSize+len(want)) {
		t.Fatalf("rx used entry %+v, want one of our buffers with length %d", used[0], NetHeaderSize+len(want))
	}
	got := d.slice(b.addr, uint64(used[0].len))
	wantHdr := make([]byte, NetHeaderSize)
	wantHdr[10] = 1 // num_buffers
	if !bytes.Equal(got[:NetHeaderSize], wantHdr) || !bytes.Equal(got[NetHeaderSize:], want) {
		t.Errorf("guest received %x, want header %x and frame %x", got, wantHdr, want)
	}
	testutil.WaitFor(t, "the receive interrupt", func() bool { return d.irqs.Load() > irqs })
	if s := d.ackInterrupt(); s&InterruptUsedBuffer == 0 {
		t.Errorf("InterruptStatus = %#x, want the used-buffer bit", s)
	}

	// Fill the remaining buffer, then frames wait in the backlog until the
	// guest posts buffers.
	ps.send(frame(guestMAC, hostMAC, "fills the last buffer"))
	d.waitUsed(netRxQueue, 1)
	for i := range 3 {
		ps.send(frame(guestMAC, hostMAC, fmt.Sprintf("backlog %d", i)))
	}
	testutil.WaitFor(t, "3 frames in the backlog", func() bool { return n.Stats().RxBacklog == 3 })
	bufs = d.postRx(3, 1526)
	used = d.waitUsed(netRxQueue, 3)
	for i, u := range used {
		got := d.slice(bufs[uint16(u.id)].addr+NetHeaderSize, uint64(u.len)-NetHeaderSize)
		if want := fmt.Sprintf("backlog %d", i); !strings.HasSuffix(string(got), want) {
			t.Errorf("backlog frame %d = %q, want it to end in %q", i, got, want)
		}
	}
	if s := n.Stats(); s.RxFrames != 5 || s.RxBacklog != 0 || s.RxDropped != 0 {
		t.Errorf("stats = %+v, want 5 received, empty backlog, none dropped", s)
	}

	// A frame too big for the buffer is dropped; the buffer takes the next.
	d.postRx(1, 100)
	ps.send(frame(guestMAC, hostMAC, strings.Repeat("x", 200)))
	testutil.WaitFor(t, "the big frame dropped", func() bool { return n.Stats().RxDropped == 1 })
	ps.send(frame(guestMAC, hostMAC, "small"))
	if used = d.waitUsed(netRxQueue, 1); used[0].len != NetHeaderSize+14+5 {
		t.Errorf("used entry after the dropped frame = %+v", used[0])
	}

	// No buffers left: beyond the backlog, frames are dropped and counted.
	before := n.Stats().RxDropped
	for i := range NetBacklog + 5 {
		ps.send(frame(guestMAC, hostMAC, fmt.Sprint("flood ", i)))
	}
	testutil.WaitFor(t, "5 frames dropped beyond the backlog", func() bool {
		s := n.Stats()
		return s.RxBacklog == NetBacklog && s.RxDropped == before+5
	})
}

// Receive stops with the device: after a reset frames are dropped, after
// Close the goroutine is gone and the tap can be attached again.
func TestNetResetAndClose(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	d.postRx(2, 1526)
	d.mustWrite(regStatus, 0)
	ps.send(frame(guestMAC, hostMAC, "after reset"))
	testutil.WaitFor(t, "the frame dropped", func() bool { return n.Stats().RxDropped == 1 })

	done := make(chan error)
	go func() { done <- d.tr.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Close() = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("Close() did not return within 5 s: receive goroutine stuck")
	}
	n2, err := NewNet(tap, guestMAC)
	if err != nil {
		t.Fatalf("NewNet(%q) after Close = %v; the tap was not released", tap, err)
	}
	if err := n2.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
}

func TestNewNetErrors(t *testing.T) {
	_, err := NewNet("uvt-missing0", guestMAC)
	wantErr(t, `NewNet("uvt-missing0")`, err, ErrNoTap)
	if !strings.Contains(err.Error(), `"uvt-missing0"`) {
		t.Errorf("error %q does not name the tap", err)
	}
	if _, err := os.Stat("/sys/class/net/uvt-missing0"); err == nil {
		t.Errorf("NewNet created the missing tap")
	}
	_, err = NewNet("lo", guestMAC)
	wantErr(t, `NewNet("lo")`, err, ErrNotTap)
	for _, name := range []string{"", "../eth0", "a-name-that-is-too-long"} {
		if _, err := NewNet(name, guestMAC); err == nil || !strings.Contains(err.Error(), "not a valid interface name") {
			t.Errorf("NewNet(%q) = %v, want an invalid-name error", name, err)
		}
	}
	tap := makeTunTap(t, unix.IFF_TAP)
	if _, err := NewNet(tap, net.HardwareAddr{1, 2, 3}); err == nil {
		t.Errorf("NewNet with a 3-byte MAC succeeded")
	}
	tun := makeTunTap(t, unix.IFF_TUN)
	_, err = NewNet(tun, guestMAC)
	wantErr(t, "NewNet(tun device)", err, ErrNotTap)
	// A tap someone else has attached is busy.
	n, err := NewNet(tap, guestMAC)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if _, err := NewNet(tap, guestMAC); err == nil || !errors.Is(err, unix.EBUSY) {
		t.Errorf("second NewNet(%q) = %v, want EBUSY", tap, err)
	}
}
