package qemutests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// A protected Linux guest's appliance nodes on one segment, as an operator
// runs them: node 1 the primary (`understudy run --kernel --protect` of the
// nested guest serving its key-value store on its virtio-blk disk), node 2
// the intermediary, node 3 the backup with its own replica of the disk and
// its own tap. Each is configured by its config disk alone (understudy
// node-config: role, arguments, key and certificate of one cluster CA).
type linuxCluster struct {
	e         env
	seg       *Segment
	bin       string // the host's understudy, for keys and node-config
	dir       string
	keys      string
	guestDisk string // the guest's disk image, put on the primary's config disk
	issued    map[string]bool
	disks     int // config disks written
}

// linuxCommon are every role's link flags.
const linuxCommon = "--heartbeat 250ms --peer-timeout 5s"

// Node memory: the appliance's own, and the primary holds the 256 MiB
// guest and, while it sends one (at each link up), a full image of it; the
// intermediary an image, a queue for the backup and a re-seed's copy; the
// backup an image and the disk's replica.
const (
	primaryMiB      = 1536
	intermediaryMiB = 1536
	backupMiB       = 1536
)

// The cluster's node numbers on the segment.
const (
	primaryNode      = 1
	intermediaryNode = 2
	backupNode       = 3
)

func newLinuxCluster(t testing.TB, e env) *linuxCluster {
	t.Helper()
	c := &linuxCluster{e: e, bin: filepath.Join(e.repo, "build", "understudy"), dir: t.TempDir(), issued: map[string]bool{}}
	if _, err := os.Stat(c.bin); err != nil {
		t.Fatalf("%v: `make image` builds it", err)
	}
	c.keys = filepath.Join(c.dir, "keys")
	c.understudy(t, "keys", "init", "--dir", c.keys)
	c.guestDisk = filepath.Join(c.dir, "kv.img")
	if err := os.WriteFile(c.guestDisk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	c.seg = e.segment(t)
	return c
}

// understudy runs the host's understudy with args.
func (c *linuxCluster) understudy(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command(c.bin, args...).CombinedOutput(); err != nil {
		t.Fatalf("understudy %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// primaryArgs are the primary's `understudy run` arguments: the nested
// key-value guest, protected at the intermediary with flags protect
// (without them, unprotected).
func primaryArgs(protect string) string {
	if protect != "" {
		protect = fmt.Sprintf("--protect tcp://%s:%s %s %s", nodeAddr(intermediaryNode), interPort, protect, linuxCommon)
	}
	return fmt.Sprintf("--kernel /boot/vmlinuz --initrd /boot/guest.cpio --mem 256M --disk /run/understudy/kv.img --net tap=%s,mac=%s %s "+
		"--cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet guest.mode=kv guest.addr=%s/%d guest.port=%s'",
		tapName, guestMAC, protect, guestAddr, segPrefix, kvPort)
}

// intermediaryArgs and backupArgs are the other roles' arguments.
func intermediaryArgs() string {
	return fmt.Sprintf("--listen tcp://%s:%s --backup tcp://%s:%s --status-interval 5s %s",
		nodeAddr(intermediaryNode), interPort, nodeAddr(backupNode), backupPort, linuxCommon)
}

func backupArgs() string {
	return fmt.Sprintf("--listen tcp://%s:%s --disk /tmp/kv-replica.img --net tap=%s --status-interval 2s %s",
		nodeAddr(backupNode), backupPort, tapName, linuxCommon)
}

// configDisk writes a config disk for node i: role ("run", "intermediary"
// or "backup") with args, and the certificate of name (issued once per
// name, for node i's address). The primary's carries the guest's disk.
func (c *linuxCluster) configDisk(t testing.TB, i int, name, role, args string) string {
	t.Helper()
	if !c.issued[name] {
		certRole := role
		if role == "run" {
			certRole = "primary"
		}
		c.understudy(t, "keys", "issue", "--dir", c.keys, "--name", name, "--role", certRole, "--host", nodeAddr(i))
		c.issued[name] = true
	}
	c.disks++
	disk := filepath.Join(c.dir, fmt.Sprintf("%d-%s.cfg", c.disks, name))
	a := []string{"node-config", "--out", disk, "--role", role, "--ca", filepath.Join(c.keys, "ca.crt"),
		"--cert", filepath.Join(c.keys, name+".crt"), "--key", filepath.Join(c.keys, name+".key"), "--args", args}
	if role == "run" {
		a = append(a, "--file", "kv.img="+c.guestDisk)
	}
	c.understudy(t, a...)
	return disk
}

// boot boots node i with its config disk (and extra understudy.*
// parameters): its NIC on the segment's bridge, and, for the primary and
// the backup, the guest's tap bridged with it.
func (c *linuxCluster) boot(t testing.TB, i, memMiB int, disk, extra string) *Machine {
	t.Helper()
	params := fmt.Sprintf("understudy.bridge=br0:eth0,%s/%d", nodeAddr(i), segPrefix)
	if i != intermediaryNode {
		params = fmt.Sprintf("understudy.tap=%s understudy.bridge=br0:eth0+%s,%s/%d", tapName, tapName, nodeAddr(i), segPrefix)
	}
	m, _ := c.e.bootRoleNodeMem(t, c.seg, i, memMiB, strings.TrimSpace(params+" "+extra), disk)
	return m
}

// hostClientAddr is the test host's own address on the segment (on the
// segment's bridge, in its network namespace), for a client that runs on
// the host: no node's QEMU is slowed by it, and the test can stop it.
const hostClientAddr = "192.0.2.250"

var kvloadBuild struct {
	once sync.Once
	path string
	err  error
}

// hostKVLoad starts kvload on the host, in the segment's network namespace
// (the bridge gets hostClientAddr), with args after -addr: a client
// outside every node, on the same Ethernet segment. Its output lines are
// the returned Machine's.
func (c *linuxCluster) hostKVLoad(t testing.TB, args ...string) *Machine {
	t.Helper()
	kvloadBuild.once.Do(func() {
		dir, err := os.MkdirTemp("", "understudy-kvload-")
		if err != nil {
			kvloadBuild.err = err
			return
		}
		kvloadBuild.path = filepath.Join(dir, "kvload")
		cmd := exec.Command("go", "build", "-o", kvloadBuild.path, "./internal/cmd/kvload")
		cmd.Dir = c.e.repo
		if out, err := cmd.CombinedOutput(); err != nil {
			kvloadBuild.err = fmt.Errorf("go build kvload: %v\n%s", err, out)
		}
	})
	if kvloadBuild.err != nil {
		t.Fatal(kvloadBuild.err)
	}
	if err := ipCmd("-n", c.seg.NetNS, "addr", "replace", fmt.Sprintf("%s/%d", hostClientAddr, segPrefix), "dev", c.seg.Bridge); err != nil {
		t.Fatal(err)
	}
	argv := c.seg.Exec(append([]string{kvloadBuild.path, "-addr", guestAddr + ":" + kvPort}, args...)...)
	log := filepath.Join(t.TempDir(), "kvload.log")
	m, err := StartProcess(argv[0], argv[1:], log, func(l Line) { t.Logf("client %6.2fs| %s", l.At.Seconds(), l.Text) }, testDeadline(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill(); keepLog(t, c.e, log, "client") })
	return m
}

// nodeAnswers reports whether node i's kernel answers on the segment: a
// TCP connection from the test host to a closed port of its address is
// refused (or accepted), not left unanswered. A frozen appliance answers
// nothing, not even ARP.
func (c *linuxCluster) nodeAnswers(i int) (bool, string) {
	out, _ := exec.Command("ip", append([]string{"netns", "exec", c.seg.NetNS}, "timeout", "10", "bash", "-c",
		fmt.Sprintf("exec 3<>/dev/tcp/%s/9 && echo connected", nodeAddr(i)))...).CombinedOutput()
	o := strings.TrimSpace(string(out))
	return strings.Contains(o, "refused") || strings.Contains(o, "connected"), o
}

// clientResult waits up to timeout for the client's result line. If the
// client's acknowledged count (its progress lines) has not moved for
// frozeAfter and node i answers nothing on the segment, node i's appliance
// froze (the README's known TCG hang): frozen, at once. A node that answers
// is waited for until timeout, as expect does.
func (c *linuxCluster) clientResult(t testing.TB, cl *Machine, i int, timeout time.Duration) (_ Line, frozen bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	acked, moved := -1, time.Now()
	for {
		l, err := cl.WaitFor(context.Background(), "kvload: result ", 5*time.Second)
		if err == nil {
			return l, false
		}
		if errors.Is(err, ErrExited) || time.Now().After(deadline) {
			t.Fatal(err)
		}
		if a := ackedNow(cl); a != acked {
			acked, moved = a, time.Now()
			continue
		}
		if time.Since(moved) < frozeAfter {
			continue
		}
		ok, probe := c.nodeAnswers(i)
		if !ok {
			t.Logf("the client acknowledged nothing for %v (acked=%d) and node %d does not answer on the segment (%q)", frozeAfter, acked, i, probe)
			return Line{}, true
		}
		moved = time.Now() // answers: look again after another frozeAfter
	}
}

// hasLine reports whether a line of m contains text.
func hasLine(m *Machine, text string) bool {
	for _, l := range m.Lines() {
		if strings.Contains(l.Text, text) {
			return true
		}
	}
	return false
}
