package boot

import (
	"fmt"
	"net"

	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// CreateBridge creates an Ethernet bridge called name (the bridge module
// must be loaded, or loadable by the kernel). It uses the bridge's ioctls
// (SIOCBRADDBR, as brctl does), which every kernel with the bridge module
// has. A new bridge has STP off, so a port forwards as soon as it is up and
// has a carrier.
func CreateBridge(name string) error {
	if err := virtio.CheckIfName(name); err != nil {
		return err
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(s)
	if err := unix.IoctlSetString(s, unix.SIOCBRADDBR, name); err != nil {
		return fmt.Errorf("create bridge %s: SIOCBRADDBR: %w (is the bridge module loaded?)", name, err)
	}
	return nil
}

// AddBridgePort makes interface port a port of bridge (SIOCBRADDIF): frames
// it receives are switched to the bridge's other ports and to the bridge's
// own interface, which is where the host's address then belongs.
func AddBridgePort(bridge, port string) error {
	if err := virtio.CheckIfName(port); err != nil {
		return err
	}
	ifi, err := net.InterfaceByName(port)
	if err != nil {
		return fmt.Errorf("add %s to bridge %s: %w", port, bridge, err)
	}
	if _, err := ifIoctl(bridge, unix.SIOCBRADDIF, func(r *unix.Ifreq) { r.SetUint32(uint32(ifi.Index)) }); err != nil {
		return fmt.Errorf("add %s to bridge %s: SIOCBRADDIF: %w", port, bridge, err)
	}
	return nil
}
