package qemutests

import (
	"bytes"
	"crypto/sha256"
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
const rolesRecords = 4000

// rolesKillAfter is the released record after which the primary is killed.
const rolesKillAfter = 200

// rolesCommitted is the backup's committed epoch after which the primary
// is killed.
const rolesCommitted = 20

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
	common := "--heartbeat 250ms --peer-timeout 5s"
	nodes := []struct {
		name, role, args string
	}{
		{"primary", "run", fmt.Sprintf("--payload counter,iterations=%d,report=0,spin=1000000 --mem 16M --interval 100ms --protect tcp://%s:%s --records - --status-interval 1s %s",
			rolesRecords, nodeAddr(2), interPort, common)},
		{"intermediary", "intermediary", fmt.Sprintf("--listen tcp://%s:%s --backup tcp://%s:%s --status-interval 5s %s", nodeAddr(2), interPort, nodeAddr(3), backupPort, common)},
		{"backup", "backup", fmt.Sprintf("--listen tcp://%s:%s --records - --status-interval 1s %s", nodeAddr(3), backupPort, common)},
	}
	seg := e.segment(t)
	ms := make([]*Machine, len(nodes))
	taps := make([]string, len(nodes))  // each node's tap on the segment's bridge
	files := make([]string, len(nodes)) // what each node's config disk holds besides keys
	disks := make([]string, len(nodes))
	for i, n := range nodes {
		certRole := map[string]string{"run": "primary"}[n.role]
		if certRole == "" {
			certRole = n.role
		}
		runBin("keys", "issue", "--dir", keys, "--name", n.name, "--role", certRole, "--host", nodeAddr(i+1))
		disk := filepath.Join(dir, n.name+".cfg")
		args := []string{"node-config", "--out", disk, "--role", n.role, "--ca", filepath.Join(keys, "ca.crt"),
			"--cert", filepath.Join(keys, n.name+".crt"), "--key", filepath.Join(keys, n.name+".key"), "--args", n.args}
		files[i] = "no files"
		if n.role == "backup" {
			// A file, as a Linux guest's disk image would travel: the
			// node reports it unpacked, with its size and sum.
			img := filepath.Join(dir, "guest.img")
			data := bytes.Repeat([]byte(fmt.Sprintf("guest disk block %d\n", time.Now().UnixNano())), 1<<17)
			if err := os.WriteFile(img, data, 0o644); err != nil {
				t.Fatal(err)
			}
			args = append(args, "--file", "guest.img="+img)
			files[i] = fmt.Sprintf("files guest.img (%d bytes, sha256 %x)", len(data), sha256.Sum256(data))
		}
		runBin(args...)
		disks[i] = disk
	}
	// The backup and the intermediary first, as an operator would (a
	// primary booted first waits for its intermediary: --connect-timeout).
	boot := func(i int) {
		ms[i], taps[i] = e.bootRoleNode(t, seg, i+1, fmt.Sprintf("understudy.bridge=br0:eth0,%s/%d", nodeAddr(i+1), segPrefix), disks[i])
	}
	booted := func(i int) {
		expect(t, ms[i], bootTimeout,
			fmt.Sprintf("understudy-appliance: config disk /dev/vda: version 1, role %s, node %s, %s; unpacked into /run/understudy", nodes[i].role, nodes[i].name, files[i]),
			"understudy-appliance: ready role="+nodes[i].role,
			fmt.Sprintf("understudy-appliance: exec: understudy %s --keys /run/understudy/keys --name %s ", nodes[i].role, nodes[i].name))
	}
	boot(2)
	boot(1)
	booted(2)
	booted(1)
	expect(t, ms[1], bootTimeout, "understudy: intermediary: listening on tcp://"+nodeAddr(2)+":"+interPort)
	boot(0)
	booted(0)
	primary, inter, backup := ms[0], ms[1], ms[2]
	expect(t, inter, nestedTimeout, `understudy: intermediary: primary "primary" connected`)
	expect(t, backup, nestedTimeout, `understudy: backup: intermediary "intermediary" connected`)
	// Released records: the primary prints them once acknowledged. Once
	// it has released a few hundred, its node is cut from the segment
	// (its tap leaves the bridge) and then killed. The cut first is what
	// lets the test see exactly what the primary released: records
	// written to its console but still in its node's buffers when QEMU
	// dies are lost in transit, as frames in flight are (a client's TCP
	// retransmits those; a serial console has nothing to retransmit). Cut
	// off, the primary receives no acknowledgement and releases nothing
	// more (it holds its output, --on-intermediary-loss hold), so once
	// its console has drained, it shows everything released.
	waitRecords(t, primary, rolesKillAfter, nestedTimeout)
	// ... and replication is past its seeding: the backup has committed
	// rolesCommitted epochs.
	waitCommitted(t, backup, rolesCommitted, nestedTimeout)
	if err := ipCmd("-n", seg.NetNS, "link", "set", taps[0], "nomaster"); err != nil {
		t.Fatal(err)
	}
	cut := time.Now()
	lastSeen := waitQuiet(t, primary, 3*time.Second, nestedTimeout)
	t.Logf("the primary's node is cut off; its console shows released records 1..%d; killing its QEMU (SIGKILL)", lastSeen)
	killed := time.Now()
	primary.Kill()
	if last := lastRecord(primary.Lines()); last != lastSeen {
		t.Fatalf("the primary released record %d after it was cut off (and its console was quiet at %d)", last, lastSeen)
	}
	if lastSeen >= rolesRecords {
		t.Fatalf("the guest finished on the primary (record %d) before the kill: raise rolesRecords", lastSeen)
	}
	il := expect(t, inter, nestedTimeout, "understudy: intermediary: primary lost at epoch ", "understudy: intermediary: backup activated at epoch ")
	bl := expect(t, backup, nestedTimeout,
		"understudy: backup: first output record released: ",
		"understudy: backup: activated at epoch ",
		"understudy: backup: guest exited with code 0",
		"understudy-appliance: exec: exit status 0",
	)
	// The intermediary fails over at the epoch it last acknowledged, and
	// the backup resumes exactly that one.
	lost, activated, resumed := epochOf(il[0].Text), epochOf(il[1].Text), epochOf(bl[1].Text)
	if lost == "" || lost != activated || activated != resumed {
		t.Errorf("epochs: the intermediary lost the primary at %q, activated the backup at %q; the backup resumed %q", lost, activated, resumed)
	}
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
	// The intermediary's role ends once it has failed over, the backup's
	// with the guest: both nodes power off with status 0.
	poweredOff(t, inter, 0)
	poweredOff(t, backup, 0)
	at := func(m *Machine, l Line) float64 { return m.start.Add(l.At).Sub(cut).Seconds() }
	t.Logf("roles: the client saw records 1..%d from the primary; the backup released %d..%d (%d repeated, dropped by a client) and the guest ran to its end there; "+
		"after the cut: primary killed %.1fs, primary lost %.1fs (peer timeout 5s), backup activated %.1fs, guest exited %.1fs; failover at epoch %s",
		lastSeen, recs[0], recs[len(recs)-1], lastSeen+1-recs[0], killed.Sub(cut).Seconds(), at(inter, il[0]), at(backup, bl[1]), at(backup, bl[2]), activated)
}

// epochOf returns the number after "at epoch " in a role's line ("": none).
func epochOf(s string) string {
	_, rest, ok := strings.Cut(s, " at epoch ")
	if !ok {
		return ""
	}
	n, _, _ := strings.Cut(rest, " ")
	n = strings.TrimSuffix(n, ";")
	if _, err := strconv.ParseUint(n, 10, 64); err != nil {
		return ""
	}
	return n
}

// TestApplianceConfigDiskRefused: in the image, a config disk that
// contradicts the command line (another role), and a damaged one, stop the
// node with one error line and a failure status; nothing runs.
func TestApplianceConfigDiskRefused(t *testing.T) {
	e := setup(t)
	dir := t.TempDir()
	nc := &appliance.NodeConfig{Role: "backup", Name: "backup", Args: "--listen tcp://192.0.2.13:7402",
		CACert: []byte("ca"), Cert: []byte("cert"), Key: []byte("key")}
	good, damaged := filepath.Join(dir, "good.cfg"), filepath.Join(dir, "damaged.cfg")
	for _, p := range []string{good, damaged} {
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := appliance.WriteNodeConfig(f, nc); err != nil {
			t.Fatal(err)
		}
		if p == damaged {
			if _, err := f.WriteAt([]byte{0xff}, 100); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	other, _ := e.bootRoleNode(t, nil, 1, "understudy.role=intermediary", good)
	bad, _ := e.bootRoleNode(t, nil, 2, "", damaged)
	expect(t, other, bootTimeout, "understudy-appliance: error: understudy.role=intermediary on the kernel command line, but the config disk /dev/vda is for role backup")
	expect(t, bad, bootTimeout, "understudy-appliance: error: config disk /dev/vda: role: SHA-256 mismatch (the disk is damaged)")
	poweredOff(t, other, 2)
	poweredOff(t, bad, 1)
	for _, m := range []*Machine{other, bad} {
		for _, l := range m.Lines() {
			if strings.Contains(l.Text, "understudy-appliance: exec:") || strings.Contains(l.Text, "ready role=") {
				t.Errorf("a refused node ran its role: %q", l.Text)
			}
		}
	}
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

// waitQuiet waits until m's console has shown no new output record for
// quiet, and returns the last one.
func waitQuiet(t *testing.T, m *Machine, quiet, timeout time.Duration) uint64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last, since := lastRecord(m.Lines()), time.Now()
	for time.Since(since) < quiet {
		if m.Exited() || time.Now().After(deadline) {
			t.Fatalf("the console did not settle within %v (last record %d; QEMU exited: %v)", timeout, last, m.Exited())
		}
		time.Sleep(100 * time.Millisecond)
		if l := lastRecord(m.Lines()); l != last {
			last, since = l, time.Now()
		}
	}
	return last
}

// waitCommitted waits until the backup m reports (its status line) that it
// has committed epoch n or later.
func waitCommitted(t testing.TB, m *Machine, n uint64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, l := range m.Lines() {
			_, rest, ok := strings.Cut(l.Text, "understudy: backup: committed=")
			if !ok {
				continue
			}
			v, _, _ := strings.Cut(rest, " ")
			if c, err := strconv.ParseUint(v, 10, 64); err == nil && c >= n {
				return
			}
		}
		if m.Exited() || time.Now().After(deadline) {
			t.Fatalf("the backup did not commit epoch %d within %v (QEMU exited: %v)", n, timeout, m.Exited())
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
// disk. It returns the machine and the node's tap on the segment's
// bridge. Without a segment the node has no NIC. Output records (lines of digits) are kept out of the test log.
func (e env) bootRoleNode(t testing.TB, s *Segment, i int, params, disk string) (*Machine, string) {
	return e.bootRoleNodeMem(t, s, i, nodeMemMiB, params, disk)
}

// bootRoleNodeMem is bootRoleNode with memMiB of memory.
func (e env) bootRoleNodeMem(t testing.TB, s *Segment, i, memMiB int, params, disk string) (*Machine, string) {
	t.Helper()
	var network []string
	netns := ""
	if s != nil {
		var err error
		if network, err = s.AddNode(nodeMAC(i)); err != nil {
			t.Fatal(err)
		}
		netns = s.NetNS
	}
	tap := ""
	for _, a := range network {
		if _, rest, ok := strings.Cut(a, "ifname="); ok {
			tap, _, _ = strings.Cut(rest, ",")
		}
	}
	if tap == "" && s != nil {
		t.Fatalf("no tap in the node's network flags %q", network)
	}
	name := fmt.Sprintf("node%d", i)
	log := filepath.Join(t.TempDir(), "console.log")
	cfg := Config{
		Kernel: filepath.Join(e.image, appliance.ImageKernel),
		Initrd: filepath.Join(e.image, appliance.ImageAppliance),
		// no_timer_check: under TCG on a loaded host the kernel's
		// IO-APIC timer check can fail and panic the boot.
		Append: "console=ttyS0 panic=-1 quiet no_timer_check " + params,
		MemMiB: memMiB,
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
		NetNS:    netns,
		Extra:    []string{"-drive", "file=" + disk + ",format=raw,if=virtio,readonly=on"},
	}
	t.Logf("QEMU %s with %s (%s): %s", name, e.accel.Name, e.accel.Why, strings.Join(cfg.Args(), " "))
	m, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill(); keepLog(t, e, log, name) })
	return m, tap
}
