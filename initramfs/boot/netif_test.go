package boot

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// TestTapInNetns creates a tap device, gives it an address and sets it up,
// inside a network namespace of its own (on a locked thread that dies with
// it), then checks what the kernel reports through the same namespace.
func TestTapInNetns(t *testing.T) {
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skipf("no /dev/net/tun on this host: %v", err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- skipError{err}
			return
		}
		errc <- tapScenario()
	}()
	err := <-errc
	var skip skipError
	if errors.As(err, &skip) {
		t.Skipf("cannot make a network namespace here (needs CAP_SYS_ADMIN): %v", skip.error)
	}
	if err != nil {
		t.Fatal(err)
	}
}

type skipError struct{ error }

func tapScenario() error {
	if err := CreateTap("ustap0"); err != nil {
		return err
	}
	p := netip.MustParsePrefix("192.0.2.1/24")
	if err := SetAddr("ustap0", p); err != nil {
		return err
	}
	if err := LinkUp("ustap0"); err != nil {
		return err
	}
	ifr, err := ifIoctl("ustap0", unix.SIOCGIFFLAGS, nil)
	if err != nil {
		return err
	}
	if ifr.Uint16()&unix.IFF_UP == 0 {
		return errors.New("ustap0 is not up after LinkUp")
	}
	ifr, err = ifIoctl("ustap0", unix.SIOCGIFADDR, nil)
	if err != nil {
		return err
	}
	if got, _ := ifr.Inet4Addr(); !net.IP(got).Equal(net.IPv4(192, 0, 2, 1)) {
		return errors.New("ustap0 address is " + net.IP(got).String() + ", want 192.0.2.1")
	}
	ifr, err = ifIoctl("ustap0", unix.SIOCGIFNETMASK, nil)
	if err != nil {
		return err
	}
	if got, _ := ifr.Inet4Addr(); !net.IP(got).Equal(net.IPv4(255, 255, 255, 0)) {
		return errors.New("ustap0 netmask is " + net.IP(got).String() + ", want 255.255.255.0")
	}
	if err := CreateTap("bad/name"); !errors.Is(err, virtio.ErrIfName) {
		return errors.New("CreateTap(bad/name) did not fail with ErrIfName")
	}
	if err := SetAddr("ustap0", netip.MustParsePrefix("2001:db8::1/64")); err == nil {
		return errors.New("SetAddr accepted an IPv6 prefix")
	}
	if err := LinkUp("nosuch0"); err == nil || !strings.Contains(err.Error(), "nosuch0") {
		return errors.New("LinkUp(nosuch0) did not fail naming the link")
	}
	return nil
}
