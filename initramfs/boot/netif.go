package boot

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// CreateTap creates a persistent tap device (IFF_TAP|IFF_NO_PI) called name,
// which a VMM then attaches to by name; it stays after this process ends.
func CreateTap(name string) error {
	if err := virtio.CheckIfName(name); err != nil {
		return err
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("create tap %s: open /dev/net/tun: %w (is the tun module loaded?)", name, err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return fmt.Errorf("create tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("create tap %s: TUNSETIFF: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("create tap %s: TUNSETPERSIST: %w", name, err)
	}
	return nil
}

// ifIoctl runs one SIOC* ioctl on interface name through an AF_INET socket.
func ifIoctl(name string, req uint, set func(*unix.Ifreq)) (*unix.Ifreq, error) {
	if err := virtio.CheckIfName(name); err != nil {
		return nil, err
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(s)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return nil, err
	}
	if set != nil {
		set(ifr)
	}
	if err := unix.IoctlIfreq(s, req, ifr); err != nil {
		return nil, err
	}
	return ifr, nil
}

// SetAddr gives interface name the IPv4 address and prefix length of p.
func SetAddr(name string, p netip.Prefix) error {
	if !p.IsValid() || !p.Addr().Is4() {
		return fmt.Errorf("set address of %s: %v is not an IPv4 address with a prefix length", name, p)
	}
	addr := p.Addr().As4()
	if _, err := ifIoctl(name, unix.SIOCSIFADDR, func(r *unix.Ifreq) { r.SetInet4Addr(addr[:]) }); err != nil {
		return fmt.Errorf("set address %v on %s: %w", p, name, err)
	}
	var mask [4]byte
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	if _, err := ifIoctl(name, unix.SIOCSIFNETMASK, func(r *unix.Ifreq) { r.SetInet4Addr(mask[:]) }); err != nil {
		return fmt.Errorf("set netmask /%d on %s: %w", p.Bits(), name, err)
	}
	return nil
}

// LinkUp sets interface name up.
func LinkUp(name string) error {
	ifr, err := ifIoctl(name, unix.SIOCGIFFLAGS, nil)
	if err != nil {
		return fmt.Errorf("link %s up: read flags: %w", name, err)
	}
	flags := ifr.Uint16() | unix.IFF_UP
	if _, err := ifIoctl(name, unix.SIOCSIFFLAGS, func(r *unix.Ifreq) { r.SetUint16(flags) }); err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	return nil
}

// WaitLink waits until interface name exists (a driver probed its device),
// or timeout passes.
func WaitLink(name string, timeout time.Duration) error {
	if err := virtio.CheckIfName(name); err != nil {
		return err
	}
	return waitPath("/sys/class/net/"+name, timeout)
}

// WaitDevice waits until the device node or file at path exists, or timeout
// passes.
func WaitDevice(path string, timeout time.Duration) error { return waitPath(path, timeout) }

func waitPath(p string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		_, err := os.Stat(p)
		if err == nil {
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not appear within %v", p, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
