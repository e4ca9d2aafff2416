package qemutests

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
)

// Segment is one Ethernet segment shared by several QEMU nodes, and by
// nothing else: a Linux bridge in a network namespace that the test makes
// for it, and one persistent tap per node on that bridge. A node's QEMU runs
// inside the namespace (Config.NetNS: `ip netns exec NS qemu-system-x86_64
// ...`) and opens its tap by name with -netdev tap, so its virtio-net NIC
// is a port of the bridge: every node sees every other node's frames
// (broadcasts, ARP, unicast once learned), as on a switch. The namespace has
// no route to, and no interface on, the host's own network; Close deletes
// it, and with it the bridge and the taps.
//
// It needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for the namespace) and
// iproute2's ip. QEMU's -netdev socket/dgram/stream were the other choice:
// stream and dgram with unix sockets connect two nodes only, and socket's
// multicast mode gives a segment of many nodes but depends on multicast on
// the loopback interface; the bridge is what a real deployment's switch
// looks like and needs no cooperation between the QEMU processes.
type Segment struct {
	NetNS  string // the network namespace's name
	Bridge string // the bridge inside it ("br0")

	mu     sync.Mutex // guards taps, closed
	taps   int
	closed bool
}

var segmentSeq atomic.Int64

// NewSegment makes a network namespace (named after the process and a
// counter, so that concurrent test processes do not collide) with a bridge
// in it, up.
func NewSegment() (*Segment, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("a segment needs root (a network namespace, a bridge and taps)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return nil, fmt.Errorf("%w (on Debian: apt-get install iproute2)", err)
	}
	s := &Segment{NetNS: fmt.Sprintf("understudy-qt-%d-%d", os.Getpid(), segmentSeq.Add(1)), Bridge: "br0"}
	if err := ipCmd("netns", "add", s.NetNS); err != nil {
		return nil, err
	}
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", s.Bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"},
		{"link", "set", s.Bridge, "up"},
	} {
		if err := ipCmd(append([]string{"-n", s.NetNS}, args...)...); err != nil {
			s.Close()
			return nil, err
		}
	}
	return s, nil
}

// AddNode makes the next tap on the bridge and returns the QEMU flags that
// give a node a virtio-net NIC on it with the given MAC address (the node
// sees it as eth0). The node's QEMU must run in s.NetNS.
func (s *Segment) AddNode(mac string) ([]string, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errors.New("segment closed")
	}
	tap := fmt.Sprintf("tap%d", s.taps)
	s.taps++
	s.mu.Unlock()
	for _, args := range [][]string{
		{"tuntap", "add", "dev", tap, "mode", "tap"},
		{"link", "set", tap, "master", s.Bridge},
		{"link", "set", tap, "up"},
	} {
		if err := ipCmd(append([]string{"-n", s.NetNS}, args...)...); err != nil {
			return nil, err
		}
	}
	return []string{
		"-netdev", "tap,id=seg0,ifname=" + tap + ",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=seg0,mac=" + mac,
	}, nil
}

// Close deletes the namespace with the bridge and taps in it. The nodes'
// QEMUs should have ended (a tap still open stays until its QEMU exits).
func (s *Segment) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return ipCmd("netns", "del", s.NetNS)
}

// Exec returns argv run inside the segment's namespace.
func (s *Segment) Exec(argv ...string) []string {
	return append([]string{"ip", "netns", "exec", s.NetNS}, argv...)
}

func ipCmd(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
