package linuxtest

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var tapSeq atomic.Uint32

// MakeTap creates a persistent tap device named prefix + a number unique in
// this process, with IPv6 off (no router solicitations on it) and up,
// deleted when the test ends; it skips the test without CAP_NET_ADMIN.
func MakeTap(t testing.TB, prefix string) string {
	t.Helper()
	name := fmt.Sprintf("%s%d_%d", prefix, os.Getpid()%100000, tapSeq.Add(1))
	set := func(persist int) error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return err
		}
		return unix.IoctlSetInt(fd, unix.TUNSETPERSIST, persist)
	}
	if err := set(1); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, os.ErrNotExist) {
			t.Skipf("cannot create tap device %s: %v", name, err)
		}
		t.Fatalf("create tap %s: %v", name, err)
	}
	t.Cleanup(func() {
		if err := set(0); err != nil {
			t.Errorf("delete tap %s: %v", name, err)
		}
	})
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0)
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.IoctlIfreq(s, unix.SIOCGIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(s, unix.SIOCSIFFLAGS, ifr); err != nil {
		t.Fatal(err)
	}
	return name
}

// TapReader reads the frames written to a tap: a packet socket bound to it.
type TapReader struct {
	t  testing.TB
	fd int
}

// NewTapReader opens a TapReader on tap, closed when the test ends.
func NewTapReader(t testing.TB, tap string) *TapReader {
	t.Helper()
	ifi, err := net.InterfaceByName(tap)
	if err != nil {
		t.Fatal(err)
	}
	proto := uint16(unix.ETH_P_ALL<<8&0xff00 | unix.ETH_P_ALL>>8)
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
	if err != nil {
		t.Fatalf("AF_PACKET socket: %v", err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
		t.Fatalf("bind AF_PACKET to %s: %v", tap, err)
	}
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	return &TapReader{t: t, fd: fd}
}

// Next returns the next frame of ethertype typ within wait (nil: none).
func (r *TapReader) Next(typ uint16, wait time.Duration) []byte {
	r.t.Helper()
	buf := make([]byte, 65536)
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(r.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			r.t.Fatalf("recvfrom: %v", err)
		}
		if n >= 14 && binary.BigEndian.Uint16(buf[12:]) == typ {
			return bytes.Clone(buf[:n])
		}
	}
	return nil
}

// Expect receives the next frames of ethertype typ (each within wait) and
// checks they are want, in order.
func (r *TapReader) Expect(typ uint16, wait time.Duration, want ...[]byte) {
	r.t.Helper()
	for i, w := range want {
		if got := r.Next(typ, wait); !bytes.Equal(got, w) {
			r.t.Fatalf("frame %d on the tap: %q, want %q", i, got, w)
		}
	}
}
