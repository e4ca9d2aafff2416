package qemutests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// The three roles' ports on their nodes' segment addresses.
const (
	interPort  = "7401"
	backupPort = "7402"
)

// rolesRecords is how many output records the protected counter guest
// emits before it exits 0: enough that it is still running when the
// primary is killed, few enough that it finishes on the backup.
const rolesRecords = 3000

// TestApplianceRoles: the fault-tolerance roles inside three appliance
// nodes on one Ethernet segment, each configured by a config disk alone
// (`understudy keys` and `understudy node-config`, run here; the kernel
// command line only puts the node's NIC on the segment): node 1 runs the
// protected counter payload (the primary), node 2 the intermediary, node 3
// the backup, linked by mutual TLS over the segment's TCP. Once the
// primary has released records, its QEMU is killed (SIGKILL); the
// intermediary must fail over, and the backup resume the guest from the
// last acknowledged epoch and run it to its end. The records the primary
// released are what a client saw: the backup's must continue them
// unbroken (it releases the records the primary still held first, so it
// may repeat some the client saw, never skip one), up to the guest's last.
func TestApplianceRoles(t *testing.T) {
	e := setup(t)
	bin := filepath.Join(e.repo, "build", "understudy")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v: `make image` builds it", err)
	}
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	runBin := func(args ...string) string {
		t.Helper()
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("understudy %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		t.Logf("$ understudy %s\n%s", strings.Join(args, " "), out)
		return string(out)
	}
	runBin("keys", "init", "--dir", keys)
	common := "--heartbeat 250ms --peer-timeout 5s --status-interval 5s"
	nodes := []struct {
		name, role, args string
	}{
		{"primary", "run", fmt.Sprintf("--payload counter,iterations=%d,report=0,spin=200000 --mem 16M --interval 100ms --protect tcp://%s:%s --records - %s",
			rolesRecords, nodeAddr(2), interPort, common)},
		{"intermediary", "intermediary", fmt.Sprintf("--listen tcp://%s:%s --backup tcp://%s:%s %s", nodeAddr(2), interPort, nodeAddr(3), backupPort, common)},
		{"backup", "backup", fmt.Sprintf("--listen tcp://%s:%s --records - %s", nodeAddr(3), backupPort, common)},
	}
	seg := e.segment(t)
	ms := make([]*Machine, len(nodes))
	for i, n := range nodes {
		certRole := map[string]string{"run": "primary"}[n.role]
		if certRole == "" {
			certRole = n.role
		}
		runBin("keys", "issue", "--dir", keys, "--name", n.name, "--role", certRole, "--host", nodeAddr(i+1))
		disk := filepath.Join(dir, n.name+".cfg")
		runBin("node-config", "--out", disk, "--role", n.role, "--ca", filepath.Join(keys, "ca.crt"),
			"--cert", filepath.Join(keys, n.name+".crt"), "--key", filepath.Join(keys, n.name+".key"), "--args", n.args)
		ms[i] = e.bootRoleNode(t, seg, i+1, fmt.Sprintf("understudy.bridge=br0:eth0,%s/%d", nodeAddr(i+1), segPrefix), disk)
	}
	primary, inter, backup := ms[0], ms[1], ms[2]
	for i, m := range ms {
		expect(t, m, bootTimeout,
			fmt.Sprintf("understudy-appliance: config disk /dev/vda: version 1, role %s, node %s, no files; unpacked into /run/understudy", nodes[i].role, nodes[i].name),
			"understudy-appliance: ready role="+nodes[i].role,
			fmt.Sprintf("understudy-appliance: exec: understudy %s --keys /run/understudy/keys --name %s ", nodes[i].role, nodes[i].name))
	}
	expect(t, inter, nestedTimeout, `understudy: intermediary: primary "primary" connected`)
	expect(t, backup, nestedTimeout, `understudy: backup: intermediary "intermediary" connected`)
	// Released records: the primary prints them once acknowledged.
	waitRecords(t, primary, 100, nestedTimeout)
	lastSeen := lastRecord(primary.Lines())
	t.Logf("killing the primary's QEMU (SIGKILL) after it released records 1..%d", lastSeen)
	primary.Kill()
	lastSeen = lastRecord(primary.Lines()) // everything its console showed
	expect(t, inter, nestedTimeout, "understudy: intermediary: primary lost at epoch ", "understudy: intermediary: backup activated at epoch ")
	expect(t, backup, nestedTimeout,
		"understudy: backup: first output record released: ",
		"understudy: backup: activated at epoch ",
		"understudy: backup: guest exited with code 0",
		"understudy-appliance: exec: exit status 0",
	)
	var recs []uint64
	for _, l := range backup.Lines() {
		if v, ok := record(l.Text); ok {
			recs = append(recs, v)
		}
	}
	if len(recs) == 0 {
		t.Fatalf("the backup released no records")
	}
	for i := 1; i < len(recs); i++ {
		if recs[i] != recs[i-1]+1 {
			t.Fatalf("the backup's records jump from %d to %d", recs[i-1], recs[i])
		}
	}
	if recs[0] > lastSeen+1 {
		t.Errorf("the client saw records up to %d, the backup released from %d: records %d..%d are lost", lastSeen, recs[0], lastSeen+1, recs[0]-1)
	}
	if last := recs[len(recs)-1]; last != rolesRecords {
		t.Errorf("the backup's last record is %d, want the guest's last, %d", last, rolesRecords)
	}
	t.Logf("roles: the client saw records 1..%d from the primary; the backup released %d..%d (%d repeated, dropped by a client), the guest ran to its end there",
		lastSeen, recs[0], recs[len(recs)-1], lastSeen+1-recs[0])
}

// record parses a console line that is an output record: digits alone.
func record(s string) (uint64, bool) {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 10, 64)
	return v, err == nil
}

// waitRecords waits until m's console shows output record n.
func waitRecords(t *testing.T, m *Machine, n uint64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for lastRecord(m.Lines()) < n {
		if m.Exited() || time.Now().After(deadline) {
			t.Fatalf("no output record %d within %v (last %d; QEMU exited: %v)", n, timeout, lastRecord(m.Lines()), m.Exited())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lastRecord is the last output record among lines (0: none).
func lastRecord(lines []Line) uint64 {
	var last uint64
	for _, l := range lines {
		if v, ok := record(l.Text); ok {
			last = v
		}
	}
	return last
}

// bootRoleNode boots node i of segment s with the given understudy.*
// parameters and a config disk, as an operator would: a read-only virtio
// disk. Output records (lines of digits) are kept out of the test log.
func (e env) bootRoleNode(t *testing.T, s *Segment, i int, params, disk string) *Machine {
	t.Helper()
	network, err := s.AddNode(nodeMAC(i))
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("node%d", i)
	log := filepath.Join(t.TempDir(), "console.log")
	cfg := Config{
		Kernel: filepath.Join(e.image, appliance.ImageKernel),
		Initrd: filepath.Join(e.image, appliance.ImageAppliance),
		Append: "console=ttyS0 panic=-1 quiet " + params,
		MemMiB: nodeMemMiB,
		CPUs:   1,
		Accel:  e.accel,
		OnLine: func(l Line) {
			if _, ok := record(l.Text); !ok {
				t.Logf("%s %6.2fs| %s", name, l.At.Seconds(), l.Text)
			}
		},
		LogPath:  log,
		Deadline: testDeadline(t),
		Network:  network,
		NetNS:    s.NetNS,
		Extra:    []string{"-drive", "file=" + disk + ",format=raw,if=virtio,readonly=on"},
	}
	t.Logf("QEMU %s with %s (%s): %s", name, e.accel.Name, e.accel.Why, strings.Join(cfg.Args(), " "))
	m, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill(); keepLog(t, e, log, name) })
	return m
}
