package qemutests

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// The nodes' segment (the Segment's bridge; nothing else is on it):
// TEST-NET-1 as for the one-node tests, the nested guest keeps guestAddr.
const (
	segPrefix = 24
	kvPort    = "7777"
	filePort  = "7000" // nodefile's
)

// nodeAddr is node i's own address on the segment (on its bridge br0).
func nodeAddr(i int) string { return fmt.Sprintf("192.0.2.%d", 10+i) }

// nodeMAC is node i's NIC's MAC address.
func nodeMAC(i int) string { return fmt.Sprintf("52:54:00:00:01:%02x", i) }

// nodeParams are the understudy.* parameters that put node i on the
// segment: its NIC (eth0) and a tap for a nested guest (tap0) are the ports
// of bridge br0, which holds the node's address. Every node gets the tap,
// so that any of them can run (or restore) the guest.
func nodeParams(i int) string {
	return fmt.Sprintf("understudy.role=test understudy.tap=%s understudy.bridge=br0:eth0+%s,%s/%d",
		tapName, tapName, nodeAddr(i), segPrefix)
}

// segment makes a Segment for the test, deleted when the test ends (after
// its nodes' QEMUs are killed: cleanups run last first). Without root it
// skips, or fails under UNDERSTUDY_QEMU_REQUIRED=1.
func (e env) segment(t testing.TB) *Segment {
	t.Helper()
	s, err := NewSegment()
	if err != nil {
		if e.required {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return s
}

// bootNode boots node i (1, 2, ...) of segment s with the given
// understudy.* parameters after nodeParams(i), with nodeMemMiB of memory.
func (e env) bootNode(t testing.TB, s *Segment, i int, params string) *Machine {
	t.Helper()
	return e.bootNodeMem(t, s, i, nodeMemMiB, params)
}

// nodeMemMiB is a node's memory: the appliance's own (its root file system,
// where snapshots and disk images land, is in memory too) and a 256 MiB
// nested guest's.
const nodeMemMiB = 1024

// bootNodeMem is bootNode with memMiB of memory (a node that holds a
// large snapshot and a disk image next to a running guest needs more).
func (e env) bootNodeMem(t testing.TB, s *Segment, i, memMiB int, params string) *Machine {
	t.Helper()
	return e.bootNodeCPUs(t, s, i, memMiB, 1, params)
}

// bootNodeCPUs is bootNodeMem with cpus vCPUs.
func (e env) bootNodeCPUs(t testing.TB, s *Segment, i, memMiB, cpus int, params string) *Machine {
	t.Helper()
	network, err := s.AddNode(nodeMAC(i))
	if err != nil {
		t.Fatal(err)
	}
	return e.startCPUs(t, fmt.Sprintf("node%d", i), nodeParams(i)+" "+params,
		filepath.Join(e.image, appliance.ImageAppliance), network, s.NetNS, memMiB, cpus)
}

// TestTwoNodesKV: two appliance nodes on one Ethernet segment. Node 1 runs
// the nested Linux guest with the key-value service (guest.mode=kv) on its
// virtio-net (tap0, bridged with node 1's NIC) and virtio-blk disk; node 2
// runs kvload, which writes 200 values to the guest's address over one TCP
// connection across the segment, reads every acknowledged one back, has the
// guest verify its disk, and powers the guest off. This is the network that
// snapshot/restore on another node and failover need: the client reaches
// the guest by its own IP and MAC, wherever the guest runs. Then node 1
// sends the guest's disk image to node 2 over the segment (nodefile, as a
// snapshot and its disk would move), and both ends print the same size and
// SHA-256.
func TestTwoNodesKV(t *testing.T) {
	e := setup(t)
	seg := e.segment(t)
	const writes = 200
	n1 := e.bootNode(t, seg, 1, fmt.Sprintf(`understudy.testdisk=/tmp/kv.img:kv-%d %s understudy.then="/%s send -listen %s:%s /tmp/kv.img"`,
		time.Now().UnixNano(),
		nestedRun(fmt.Sprintf("--disk /tmp/kv.img --net tap=%s,mac=%s ", tapName, guestMAC),
			fmt.Sprintf("guest.mode=kv guest.addr=%s/%d guest.port=%s", guestAddr, segPrefix, kvPort)),
		appliance.NodeFile, nodeAddr(1), filePort))
	n2 := e.bootNode(t, seg, 2, fmt.Sprintf(`understudy.exec="/%s -addr %s:%s -n %d -retry-for 5m -want-survived -poweroff" understudy.then="/%s recv -from %s:%s -dir /tmp/in"`,
		appliance.KVLoad, guestAddr, kvPort, writes, appliance.NodeFile, nodeAddr(1), filePort))
	bridgeUp := func(i int) string {
		return fmt.Sprintf("understudy-appliance: bridge br0: created, ports eth0 %s, address %s/%d, up", tapName, nodeAddr(i), segPrefix)
	}
	expect(t, n1, bootTimeout, bridgeUp(1), "understudy-appliance: ready role=test")
	expect(t, n2, bootTimeout, bridgeUp(2), "understudy-appliance: ready role=test", "understudy-appliance: exec: /"+appliance.KVLoad)
	g := expect(t, n1, nestedTimeout,
		"understudy-guest: init reached",
		fmt.Sprintf("understudy-guest: kv: serving on %s:%s (eth0)", guestAddr, kvPort),
		fmt.Sprintf("understudy-guest: kv: connection 1 from %s:", nodeAddr(2)),
	)
	got := expect(t, n2, nestedTimeout,
		fmt.Sprintf("kvload: result acked=%d verified=%d missing=0 wrong=0 disk=ok connection_survived=true reconnects=0 instances=1 ", writes, writes),
		"kvload: OK",
		"understudy-appliance: exec: exit status 0",
	)
	expect(t, n1, nestedTimeout,
		fmt.Sprintf("understudy-guest: kv: powering off on request: records=%d keys=%d", writes, writes),
		"understudy-guest: done, powering off",
		"understudy-appliance: exec: exit status 0",
	)
	sent := expect(t, n1, nestedTimeout, "nodefile: sending kv.img ", "nodefile: sent 1 files ", "nodefile: OK", "understudy-appliance: exec: exit status 0")
	recvd := expect(t, n2, nestedTimeout, "nodefile: received kv.img ", "nodefile: received 1 files ", "nodefile: OK", "understudy-appliance: exec: exit status 0")
	if s, r := strings.TrimPrefix(sent[0].Text, "nodefile: sending kv.img "), strings.TrimPrefix(recvd[0].Text, "nodefile: received kv.img "); s != r {
		t.Errorf("node 1 sent kv.img %s, node 2 received %s", s, r)
	}
	poweredOff(t, n2, 0)
	poweredOff(t, n1, 0)
	t.Logf("two nodes: the guest served %.2fs after its init; kvload's run: %s; %s; node 1's QEMU ran %.1fs, node 2's %.1fs",
		(g[1].At - g[0].At).Seconds(), strings.TrimPrefix(got[0].Text, "kvload: "), strings.TrimPrefix(recvd[1].Text, "nodefile: "),
		n1.Elapsed().Seconds(), n2.Elapsed().Seconds())
}
