package virtio

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrIfName is wrapped by CheckIfName's errors.
var ErrIfName = errors.New("not a valid interface name")

// CheckIfName reports why name cannot name a Linux network interface, or
// nil. It checks what the kernel does (dev_valid_name), a little more
// strictly: 1 to 15 bytes (IFNAMSIZ less the NUL), not "." or "..", and only
// printable ASCII other than '/', ':' and the space. Every user of an
// interface name checks it here: the tap a VMM attaches to (NewNet, and
// `understudy run --net tap=NAME`), the taps the appliance creates and the
// interface a nested guest's init configures (package initramfs/boot).
func CheckIfName(name string) error {
	if name == "" || len(name) >= unix.IFNAMSIZ || name == "." || name == ".." {
		return fmt.Errorf("%q is %w: want 1 to %d characters other than %q and %q", name, ErrIfName, unix.IFNAMSIZ-1, ".", "..")
	}
	for _, c := range name {
		if c == '/' || c == ':' || c <= ' ' || c > '~' {
			return fmt.Errorf("%q is %w: %q is not allowed", name, ErrIfName, c)
		}
	}
	return nil
}

// tapFlags reads the interface's tun flags from sysfs. It returns ErrNoTap
// when there is no such interface and ErrNotTap when it is not a tun/tap
// device.
func tapFlags(name string) (uint64, error) {
	dir := "/sys/class/net/" + name
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, fmt.Errorf("tap device %q: %w (create it first, for example with `ip tuntap add dev %s mode tap`)", name, ErrNoTap, name)
		}
		return 0, fmt.Errorf("tap device %q: %w", name, err)
	}
	raw, err := os.ReadFile(dir + "/tun_flags")
	if errors.Is(err, os.ErrNotExist) {
		return 0, fmt.Errorf("interface %q: %w (it is not a tun/tap interface)", name, ErrNotTap)
	}
	if err != nil {
		return 0, fmt.Errorf("tap device %q: %w", name, err)
	}
	flags, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(raw)), "0x"), 16, 32)
	if err != nil {
		return 0, fmt.Errorf("tap device %q: tun_flags %q: %w", name, raw, err)
	}
	if flags&unix.IFF_TAP == 0 {
		return 0, fmt.Errorf("interface %q: %w (it is a tun device, which carries IP packets, not Ethernet frames)", name, ErrNotTap)
	}
	return flags, nil
}

// openTap attaches to the existing tap device name, without packet
// information and without virtio-net headers, as a non-blocking file that
// Go's poller serves (so Close ends a blocked Read).
func openTap(name string) (*os.File, error) {
	if err := CheckIfName(name); err != nil {
		return nil, fmt.Errorf("tap device: %w", err)
	}
	flags, err := tapFlags(name)
	if err != nil {
		return nil, err
	}
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tap device %q: open /dev/net/tun: %w", name, err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap device %q: %w", name, err)
	}
	// A tap made with multi_queue only accepts multi-queue attachments.
	ifr.SetUint16(uint16(unix.IFF_TAP | unix.IFF_NO_PI | flags&unix.IFF_MULTI_QUEUE))
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("tap device %q: attach (TUNSETIFF): %w: another process has it open", name, err)
		}
		return nil, fmt.Errorf("tap device %q: attach (TUNSETIFF): %w", name, err)
	}
	return os.NewFile(uintptr(fd), "tap "+name), nil
}
