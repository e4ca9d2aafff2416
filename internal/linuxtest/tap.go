package linuxtest

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"testing"

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
