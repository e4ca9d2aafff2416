package qemutests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestLinuxFailover: a protected Linux guest on three appliance nodes and a
// client on a fourth, one Ethernet segment. Node 1 runs the nested Linux
// guest serving its key-value store on its virtio-blk disk under
// `understudy run --kernel --protect` (primary), node 2 the intermediary,
// node 3 the backup with its own replica of the disk and its own tap; each
// is configured by its config disk alone. Node 4 runs kvload, which writes
// over one TCP connection to the guest's address. Once the guest has
// committed linuxKillAt records, node 1's QEMU is killed (SIGKILL): the
// intermediary fails over, the backup resumes the guest on its tap and
// announces its MAC, and the client goes on, over the same connection,
// reading back every acknowledged value from memory and, after the guest's
// sync, from the disk.
func TestLinuxFailover(t *testing.T) {
	e := setup(t)
	bin := filepath.Join(e.repo, "build", "understudy")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v: `make image` builds it", err)
	}
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	runBin := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("understudy %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	runBin("keys", "init", "--dir", keys)
	guestDisk := filepath.Join(dir, "kv.img")
	if err := os.WriteFile(guestDisk, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	common := "--heartbeat 250ms --peer-timeout 5s"
	nodes := []struct {
		name, role, args string
		mem              int
	}{
		{"primary", "run", fmt.Sprintf("--kernel /boot/vmlinuz --initrd /boot/guest.cpio --mem 256M --disk /run/understudy/kv.img --net tap=%s,mac=%s "+
			"--protect tcp://%s:%s --interval 100ms --status-interval 2s %s "+
			"--cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet guest.mode=kv guest.addr=%s/%d guest.port=%s'",
			tapName, guestMAC, nodeAddr(2), interPort, common, guestAddr, segPrefix, kvPort), 1024},
		{"intermediary", "intermediary", fmt.Sprintf("--listen tcp://%s:%s --backup tcp://%s:%s --status-interval 5s %s", nodeAddr(2), interPort, nodeAddr(3), backupPort, common), 1536},
		{"backup", "backup", fmt.Sprintf("--listen tcp://%s:%s --disk /tmp/kv-replica.img --net tap=%s --status-interval 2s %s", nodeAddr(3), backupPort, tapName, common), 1536},
	}
	seg := e.segment(t)
	ms := make([]*Machine, 4)
	disks := make([]string, 3)
	for i, n := range nodes {
		certRole := map[string]string{"run": "primary"}[n.role]
		if certRole == "" {
			certRole = n.role
		}
		runBin("keys", "issue", "--dir", keys, "--name", n.name, "--role", certRole, "--host", nodeAddr(i+1))
		disks[i] = filepath.Join(dir, n.name+".cfg")
		args := []string{"node-config", "--out", disks[i], "--role", n.role, "--ca", filepath.Join(keys, "ca.crt"),
			"--cert", filepath.Join(keys, n.name+".crt"), "--key", filepath.Join(keys, n.name+".key"), "--args", n.args}
		if n.role == "run" {
			args = append(args, "--file", "kv.img="+guestDisk)
		}
		runBin(args...)
	}
	boot := func(i int) {
		params := fmt.Sprintf("understudy.bridge=br0:eth0,%s/%d", nodeAddr(i+1), segPrefix)
		if nodes[i].role != "intermediary" {
			// The guest's NIC: a tap bridged with the node's NIC.
			params = fmt.Sprintf("understudy.tap=%s understudy.bridge=br0:eth0+%s,%s/%d", tapName, tapName, nodeAddr(i+1), segPrefix)
		}
		ms[i], _ = e.bootRoleNodeMem(t, seg, i+1, nodes[i].mem, params, disks[i])
	}
	step := func(format string, args ...any) { t.Logf("demo: "+format, args...) }
	step("1/6 booting the backup (node 3, %s) and the intermediary (node 2, %s), each configured by its config disk", nodeAddr(3), nodeAddr(2))
	boot(2)
	boot(1)
	expect(t, ms[1], bootTimeout, "understudy: intermediary: listening on tcp://"+nodeAddr(2)+":"+interPort)
	step("2/6 booting the primary (node 1, %s): `understudy run --kernel --protect` of a nested Linux guest (%s) serving a key-value store on its disk", nodeAddr(1), guestAddr)
	boot(0)
	// The client: its own node.
	step("3/6 booting the client (node 4, %s): kvload writes %d values over one TCP connection", nodeAddr(4), linuxWrites)
	client := e.bootNode(t, seg, 4, fmt.Sprintf(`understudy.exec="/bin/kvload -addr %s:%s -n %d -retry-for 10m -timeout 10m -want-survived -poweroff"`,
		guestAddr, kvPort, linuxWrites))
	primary, inter, backup := ms[0], ms[1], ms[2]
	expect(t, inter, nestedTimeout, `understudy: intermediary: primary "primary" connected`)
	expect(t, primary, nestedTimeout, fmt.Sprintf("understudy-guest: kv: serving on %s:%s (eth0)", guestAddr, kvPort), linuxKillAt)
	killed := time.Now()
	primary.Kill()
	step("4/6 the primary's QEMU is killed (SIGKILL) after its guest committed %q", linuxKillAt)
	il := expect(t, inter, nestedTimeout, "understudy: intermediary: primary lost at epoch ", "understudy: intermediary: backup activated at epoch ")
	bl := expect(t, backup, nestedTimeout, "understudy: backup: activated at epoch ")
	step("5/6 %s; %s", strings.TrimPrefix(il[1].Text, "understudy: "), strings.TrimPrefix(bl[0].Text, "understudy: "))
	cl := expect(t, client, nestedTimeout,
		fmt.Sprintf("kvload: result acked=%d verified=%d missing=0 wrong=0 disk=ok connection_survived=true reconnects=0 instances=1 ", linuxWrites, linuxWrites),
		"kvload: OK")
	expect(t, backup, nestedTimeout, fmt.Sprintf("understudy-guest: kv: powering off on request: records=%d keys=%d", linuxWrites, linuxWrites))
	step("6/6 the client's connection survived; every acknowledged value read back from memory and disk: %s", strings.TrimPrefix(cl[0].Text, "kvload: "))
	poweredOff(t, client, 0)
	poweredOff(t, backup, 0)
	t.Logf("linux failover: %s; %s; client: %s; %.1fs from the kill to the client's end",
		il[1].Text, bl[0].Text, strings.TrimPrefix(cl[0].Text, "kvload: "), time.Since(killed).Seconds())
}

const (
	linuxWrites = 200
	linuxKillAt = "understudy-guest: kv: records=100"
)
