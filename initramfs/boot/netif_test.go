package boot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
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

// TestBridgeInNetns makes a bridge with a tap and a veth pair's end as its
// ports, inside a network namespace of its own, and checks that the kernel
// reports both as the bridge's ports.
func TestBridgeInNetns(t *testing.T) {
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
		errc <- bridgeScenario()
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

func bridgeScenario() error {
	if err := CreateBridge("usbr0"); err != nil {
		if errors.Is(err, unix.ENOPKG) || errors.Is(err, unix.EINVAL) {
			return skipError{err}
		}
		return err
	}
	if err := CreateTap("ustap1"); err != nil {
		return err
	}
	if err := AddBridgePort("usbr0", "ustap1"); err != nil {
		return err
	}
	if err := AddBridgePort("usbr0", "nosuch0"); err == nil {
		return errors.New("adding a missing interface to the bridge succeeded")
	}
	for _, l := range []string{"ustap1", "usbr0"} {
		if err := LinkUp(l); err != nil {
			return err
		}
	}
	if err := SetAddr("usbr0", netip.MustParsePrefix("192.0.2.11/24")); err != nil {
		return err
	}
	br, err := net.InterfaceByName("usbr0")
	if err != nil {
		return err
	}
	master, err := masterOf("ustap1")
	if err != nil {
		return err
	}
	if master != br.Index {
		return fmt.Errorf("ustap1's master is interface %d, not usbr0 (%d)", master, br.Index)
	}
	addrs, err := br.Addrs()
	if err != nil || len(addrs) == 0 || addrs[0].String() != "192.0.2.11/24" {
		return fmt.Errorf("usbr0's addresses: %v, %v; want 192.0.2.11/24 first", addrs, err)
	}
	if err := CreateBridge("usbr0"); err == nil {
		return errors.New("creating usbr0 twice succeeded")
	}
	return nil
}

// masterOf returns the index of interface name's master (0: none), from
// the kernel's RTM_GETLINK dump of the calling thread's network namespace
// (sysfs would show the namespace that mounted it).
func masterOf(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETLINK, syscall.AF_UNSPEC)
	if err != nil {
		return 0, err
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return 0, err
	}
	for _, m := range msgs {
		if m.Header.Type != syscall.RTM_NEWLINK || len(m.Data) < syscall.SizeofIfInfomsg {
			continue
		}
		if int(binary.NativeEndian.Uint32(m.Data[4:8])) != ifi.Index {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(&m)
		if err != nil {
			return 0, err
		}
		for _, a := range attrs {
			if a.Attr.Type == syscall.IFLA_MASTER && len(a.Value) >= 4 {
				return int(binary.NativeEndian.Uint32(a.Value)), nil
			}
		}
		return 0, nil
	}
	return 0, fmt.Errorf("%s not in the kernel's link dump", name)
}
