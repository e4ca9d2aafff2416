package qemutests

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// Snapshots of a running Linux guest, moved by `understudy run --save` and
// `understudy restore`, with a real client: the nested guest serves its
// key-value store (guest.mode=kv: every value written to its virtio-blk
// disk, answered after fdatasync) and kvload writes snapWrites values over
// one TCP connection. The guest is saved mid-stream, once its service has
// logged snapSaveAt; the understudy process ends; a restore continues it,
// and kvload, which never stopped, goes on over the same connection: the
// restored guest's TCP state is the saved one, and what kvload sent
// meanwhile is retransmitted by its TCP. At the end kvload reads back every
// value it was told was written, has the guest sync and re-read its log
// from the disk past the page cache (VERIFY), and powers the guest off.
const (
	snapWrites = 300
	snapSaveAt = "understudy-guest: kv: records=100"
	snapFile   = "/tmp/kv.snap"
	snapDisk   = "/tmp/kv.img"
	// snapEcho is typed on the guest's console before the snapshot and
	// again after the restore, which must echo it.
	snapEcho = "console-after-restore"
	// snapNodeMiB holds the appliance, the 256 MiB guest and its 256 MiB
	// snapshot in the node's in-memory root file system.
	snapNodeMiB = 1536
	// snapNodeCPUs: with one vCPU, the appliance running the nested guest
	// and the client beside it was seen to freeze whole under TCG (no
	// console line from anything, its kernel included) as the guest's
	// disk writes began, in most runs on a slower machine.
	snapNodeCPUs = 2
)

// kvloadArgs is kvload writing snapWrites values to the guest, keeping its
// connection (-want-survived), and powering the guest off at the end.
func kvloadArgs() string {
	return fmt.Sprintf("/%s -addr %s:%s -n %d -retry-for 5m -timeout 5m -want-survived -poweroff",
		appliance.KVLoad, guestAddr, kvPort, snapWrites)
}

// kvloadOK is kvload's verdict when every acknowledged write was read back
// from the guest's memory and its disk, over the first connection.
var kvloadOK = fmt.Sprintf("kvload: result acked=%d verified=%d missing=0 wrong=0 disk=ok connection_survived=true reconnects=0 instances=1 ", snapWrites, snapWrites)

// kvRun is the nested `understudy run` of the key-value guest with its disk
// and NIC, and extra run flags (the save's).
func kvRun(extra string) string {
	return nestedRun(fmt.Sprintf("--disk %s --net tap=%s,mac=%s %s", snapDisk, tapName, guestMAC, extra),
		fmt.Sprintf("guest.mode=kv guest.addr=%s/%d guest.port=%s", guestAddr, segPrefix, kvPort))
}

// snapshotFigures are what a save and a restore printed.
type snapshotFigures struct {
	guestMiB, stateKiB                           int
	pauseMs, saveMs, restoreMs, readMs, answerMs float64
}

func (f snapshotFigures) String() string {
	return fmt.Sprintf("guest_mib=%d state_kib=%d pause_ms=%.1f save_ms=%.0f restore_ms=%.0f read_ms=%.0f restore_read_ratio=%.2f restore_to_first_answer_ms=%.0f",
		f.guestMiB, f.stateKiB, f.pauseMs, f.saveMs, f.restoreMs, f.readMs, f.restoreMs/f.readMs, f.answerMs)
}

var (
	savedRe    = regexp.MustCompile(`understudy: saved a snapshot of the guest after \S+ to \S+ \((\d+)\.\d MiB, state (\d+) KiB; paused in ([\d.]+) ms, written in (\d+) ms\)`)
	restoredRe = regexp.MustCompile(regexp.QuoteMeta(boot.RestoredLine) + `\S+ in (\d+) ms \(256 MiB of memory, state (\d+) KiB, 1 disks, 1 nets\); the guest runs`)
	readRe     = regexp.MustCompile(`nodefile: read kv\.snap (\d+) bytes in ([\d.]+) ms`)
)

// submatch returns re's submatches in l as numbers.
func submatch(t testing.TB, re *regexp.Regexp, l Line) []float64 {
	t.Helper()
	m := re.FindStringSubmatch(l.Text)
	if m == nil {
		t.Fatalf("line %q does not match %v", l.Text, re)
	}
	var v []float64
	for _, s := range m[1:] {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil {
			t.Fatal(err)
		}
		v = append(v, f)
	}
	return v
}

// findAfter returns the first line after index from (in lines) containing
// marker, and its index; it fails t if there is none.
func findAfter(t testing.TB, lines []Line, from int, marker string) (Line, int) {
	t.Helper()
	for i := from + 1; i < len(lines); i++ {
		if strings.Contains(lines[i].Text, marker) {
			return lines[i], i
		}
	}
	t.Fatalf("no line with %q after line %d", marker, from)
	return Line{}, 0
}

// indexOf returns the index of line l in lines.
func indexOf(lines []Line, l Line) int {
	for i := range lines {
		if lines[i] == l {
			return i
		}
	}
	return -1
}

// sameNodeSnapshot runs the same-node proof on a fresh appliance and
// returns its figures: kvload runs beside (understudy.with) the nested run,
// which saves the guest on SIGUSR1 sent once the service logged
// snapSaveAt; the snapshot file is read once (the baseline of the
// restore's time) and `understudy restore` continues the guest with its
// disk and tap given again. The console typed before the snapshot echoes
// again after the restore.
//
// An appliance that froze after the restore (no console line at all for
// frozeAfter: not the guest's, not the client's progress, not the
// kernel's) is retried once on a fresh one, saying so. Under TCG, about
// one run in ten of this test has frozen so, the emulated CPU never
// coming back from the nested guest (the appliance has one vCPU, and even
// its kernel's watchdog stays silent); the cause is not known yet (see the
// README's host notes). A restore that freezes the node twice fails.
func sameNodeSnapshot(t testing.TB, e env) snapshotFigures {
	t.Helper()
	for attempt := 1; ; attempt++ {
		f, froze := sameNodeAttempt(t, e)
		if !froze {
			return f
		}
		if attempt == 2 {
			t.Fatalf("the appliance froze or reset in both attempts (no console line for %v, or QEMU exited without the uinit's power-off)", frozeAfter)
		}
		knownHang(t, "the appliance froze or reset (no console line for %v, or QEMU exited without the uinit's power-off); retrying once on a fresh appliance", frozeAfter)
	}
}

// expectUnlessFrozen is expect, except that an appliance that prints
// nothing at all for frozeAfter while a marker is awaited counts as frozen
// (true, with the lines seen so far): the same TCG freeze as after a
// restore was seen before the save too, the nested guest serving its
// client. An appliance that reset (see reset) counts the same.
func expectUnlessFrozen(t testing.TB, m *Machine, timeout time.Duration, markers ...string) ([]Line, bool) {
	t.Helper()
	var got []Line
	for _, mk := range markers {
		deadline := time.Now().Add(timeout)
		for {
			l, err := m.WaitFor(context.Background(), mk, 5*time.Second)
			if err == nil {
				got = append(got, l)
				break
			}
			if errors.Is(err, ErrExited) && reset(m) {
				return got, true
			}
			if errors.Is(err, ErrExited) || time.Now().After(deadline) {
				t.Fatal(err)
			}
			if lines := m.Lines(); len(lines) > 0 && time.Since(m.start.Add(lines[len(lines)-1].At)) > frozeAfter {
				m.Kill()
				return got, true
			}
		}
	}
	return got, false
}

// knownHang logs a retry of the README's known TCG hang, and prints it on
// a benchmark's output too (a passing benchmark's log is cut to 10 lines;
// make bench shows the lines that begin "KNOWN HANG").
func knownHang(t testing.TB, format string, a ...any) {
	t.Helper()
	msg := "KNOWN HANG: " + fmt.Sprintf(format, a...)
	t.Log(msg)
	if _, ok := t.(*testing.B); ok {
		fmt.Println(msg)
	}
}

// reset reports an appliance whose QEMU exited before the uinit's
// "done" (which precedes its power-off): its machine was reset (-no-reboot makes QEMU exit 0
// then) with no kernel panic printed. With two vCPUs, the appliance of
// the same-node run once reset so under TCG where with one it froze, as
// the nested guest's first disk writes began.
func reset(m *Machine) bool {
	return m.Exited() && !hasLine(m, "understudy-appliance: done status=") && !hasLine(m, "Kernel panic")
}

// frozeAfter is how long an appliance that should be busy (a client
// printing progress every second) may print nothing before it counts as
// frozen.
const frozeAfter = 60 * time.Second

// silentBefore waits until a line of m contains marker (false) or m prints
// nothing for quiet (true); after timeout it returns false and leaves the
// verdict to the caller's next wait.
func silentBefore(m *Machine, marker string, quiet, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) && !m.Exited() {
		lines := m.Lines()
		for _, l := range lines {
			if strings.Contains(l.Text, marker) {
				return false
			}
		}
		if n := len(lines); n > 0 && time.Since(m.start.Add(lines[n-1].At)) > quiet {
			return true
		}
		time.Sleep(time.Second)
	}
	return false
}

// sameNodeAttempt is one run of sameNodeSnapshot; froze reports an
// appliance frozen after the restore (its figures are then empty).
func sameNodeAttempt(t testing.TB, e env) (_ snapshotFigures, froze bool) {
	t.Helper()
	params := fmt.Sprintf(`understudy.role=test understudy.tap=%s,%s understudy.testdisk=%s:kv-%d understudy.signal="USR1:%s" understudy.stdin=%s understudy.with="%s" %s understudy.then="/%s read %s" understudy.then="understudy restore --snapshot %s --disk %s --net tap=%s"`,
		tapName, tapAddr, snapDisk, time.Now().UnixNano(), snapSaveAt, snapEcho, kvloadArgs(),
		kvRun("--save "+snapFile+" --save-on-signal USR1 "),
		appliance.NodeFile, snapFile, snapFile, snapDisk, tapName)
	m := e.startCPUs(t, "", params, e.image+"/"+appliance.ImageAppliance, nil, "", snapNodeMiB, snapNodeCPUs)
	expect(t, m, bootTimeout, "understudy-appliance: ready role=test")
	echoed := fmt.Sprintf("understudy-guest: echo: got %q", snapEcho)
	run, frozen := expectUnlessFrozen(t, m, nestedTimeout,
		"understudy-appliance: exec: understudy run --kernel",
		fmt.Sprintf("understudy-guest: kv: serving on %s:%s (eth0)", guestAddr, kvPort),
		snapSaveAt,
		"understudy-appliance: signal: sending SIGUSR1",
		"understudy: saved a snapshot of the guest after ",
		"understudy-appliance: exec: exit status 0",
		"nodefile: read kv.snap ",
		"understudy-appliance: exec: exit status 0",
		"understudy-appliance: exec: understudy restore --snapshot",
		boot.RestoredLine,
	)
	if frozen || silentBefore(m, "understudy-appliance: done status=", frozeAfter, nestedTimeout) || reset(m) {
		m.Kill()
		return snapshotFigures{}, true
	}
	poweredOff(t, m, 0)
	lines := m.Lines()
	restoreAt := indexOf(lines, run[9])
	// Before the snapshot: the console echoed, the client wrote.
	if _, i := findAfter(t, lines, -1, echoed); i > indexOf(lines, run[4]) {
		t.Errorf("the console did not echo before the snapshot")
	}
	// After the restore: the console echoes, the service writes on, the
	// client gets every value back from memory and disk over its first
	// connection, and the guest powers off on its request.
	findAfter(t, lines, restoreAt, `understudy-appliance: stdin: writing "`+snapEcho+`" after the prompt`)
	findAfter(t, lines, restoreAt, echoed)
	findAfter(t, lines, restoreAt, "understudy-guest: kv: records=300")
	answer, _ := findAfter(t, lines, restoreAt, "kvload: slow write ")
	findAfter(t, lines, restoreAt, kvloadOK)
	findAfter(t, lines, restoreAt, "kvload: OK")
	findAfter(t, lines, restoreAt, fmt.Sprintf("understudy-guest: kv: powering off on request: records=%d keys=%d", snapWrites, snapWrites))
	findAfter(t, lines, restoreAt, "understudy: guest powered off after ")
	findAfter(t, lines, restoreAt, "understudy-appliance: with: exit status 0")
	if _, i := findAfter(t, lines, -1, "understudy-guest: kv: connection 1 from "); i > restoreAt {
		t.Errorf("the service's connection began after the restore")
	}
	for _, l := range lines {
		if strings.Contains(l.Text, "understudy-guest: kv: connection 2 ") || strings.Contains(l.Text, "understudy-guest: kv: serving on") && l.At > run[9].At {
			t.Errorf("the service restarted or saw another connection: %q", l.Text)
		}
	}
	saved := submatch(t, savedRe, run[4])
	restored := submatch(t, restoredRe, run[9])
	read := submatch(t, readRe, run[6])
	f := snapshotFigures{
		guestMiB: int(saved[0]), stateKiB: int(saved[1]), pauseMs: saved[2], saveMs: saved[3],
		restoreMs: restored[0], readMs: read[1],
		answerMs: float64((answer.At - run[8].At).Milliseconds()),
	}
	if int(restored[1]) != f.stateKiB {
		t.Errorf("the restore read a state of %d KiB, the save wrote %d KiB", int(restored[1]), f.stateKiB)
	}
	return f, false
}

// TestLinuxSnapshotSameNode: a Linux guest serving a client is saved
// mid-stream, its understudy process ends, and `understudy restore`
// continues it on the same node; the client keeps its TCP connection and
// every acknowledged value is there, in memory and on the disk; the
// console still echoes.
func TestLinuxSnapshotSameNode(t *testing.T) {
	e := setup(t)
	f := sameNodeSnapshot(t, e)
	t.Logf("linux-snapshot: %v", f)
}

// BenchmarkLinuxSnapshot prints the same-node proof's figures: the pause,
// the save, the restore (also as a ratio to reading the snapshot file once
// in the same run) and the time from the restore's start to the client's
// first answer (which includes the client's TCP retransmission backoff).
func BenchmarkLinuxSnapshot(b *testing.B) {
	e := setup(b)
	for range b.N {
		f := sameNodeSnapshot(b, e)
		fmt.Printf("bench linux-snapshot: %v\n", f)
	}
}

// TestLinuxSnapshotOtherNode: two appliance nodes on one segment. Node 1
// runs the key-value guest and the client (kvload, beside it); the guest
// is saved once its service logged snapSaveAt (--save-after-output); node
// 1 sends the snapshot and the disk image to node 2 over the segment
// (nodefile, SHA-256 checked), and node 2 restores the guest on its own
// tap, announcing its MAC. The guest keeps its IP and MAC: the client on
// node 1, whose frames now cross the segment to node 2, goes on over its
// first connection and reads back every acknowledged value, from memory
// and from the disk.
func TestLinuxSnapshotOtherNode(t *testing.T) {
	e := setup(t)
	seg := e.segment(t)
	n1 := e.bootNodeCPUs(t, seg, 1, snapNodeMiB, snapNodeCPUs, fmt.Sprintf(`understudy.testdisk=%s:kv-%d understudy.with="%s" %s understudy.then="/%s send -listen %s:%s %s %s"`,
		snapDisk, time.Now().UnixNano(), kvloadArgs(),
		kvRun(fmt.Sprintf("--save %s --save-after-output '%s' ", snapFile, snapSaveAt)),
		appliance.NodeFile, nodeAddr(1), filePort, snapFile, snapDisk))
	n2 := e.bootNodeMem(t, seg, 2, snapNodeMiB, fmt.Sprintf(`understudy.exec="/%s recv -from %s:%s -dir /tmp/in" understudy.then="understudy restore --snapshot /tmp/in/kv.snap --disk /tmp/in/kv.img --net tap=%s"`,
		appliance.NodeFile, nodeAddr(1), filePort, tapName))
	expect(t, n1, bootTimeout, "understudy-appliance: ready role=test")
	expect(t, n2, bootTimeout, "understudy-appliance: ready role=test")
	saved := expect(t, n1, nestedTimeout,
		fmt.Sprintf("understudy-guest: kv: serving on %s:%s (eth0)", guestAddr, kvPort),
		snapSaveAt,
		"understudy: saved a snapshot of the guest after ",
		"understudy-appliance: exec: exit status 0",
		"nodefile: sending kv.snap ",
		"nodefile: OK",
	)
	restored := expect(t, n2, nestedTimeout,
		"nodefile: received kv.snap ",
		"nodefile: received kv.img ",
		"nodefile: OK",
		"understudy-appliance: exec: understudy restore",
		boot.RestoredLine,
		"understudy-guest: kv: records=300",
		fmt.Sprintf("understudy-guest: kv: powering off on request: records=%d keys=%d", snapWrites, snapWrites),
		"understudy: guest powered off after ",
		"understudy-appliance: exec: exit status 0",
	)
	client := expect(t, n1, nestedTimeout, "kvload: slow write ", kvloadOK, "kvload: OK", "understudy-appliance: with: exit status 0")
	poweredOff(t, n2, 0)
	poweredOff(t, n1, 0)
	if s, r := strings.TrimPrefix(saved[4].Text, "nodefile: sending kv.snap "), strings.TrimPrefix(restored[0].Text, "nodefile: received kv.snap "); s != r {
		t.Errorf("node 1 sent kv.snap %s, node 2 received %s", s, r)
	}
	for _, l := range n2.Lines() {
		if strings.Contains(l.Text, "understudy-guest: kv: serving on") || strings.Contains(l.Text, "understudy-guest: init reached") {
			t.Errorf("node 2 booted the guest instead of resuming it: %q", l.Text)
		}
	}
	t.Logf("other node: %s; moved in %.1fs; node 2: %s; the client's write across the move: %s",
		strings.TrimPrefix(saved[2].Text, "understudy: "), (restored[3].At - saved[4].At).Seconds(),
		strings.TrimPrefix(restored[4].Text, "understudy: "), strings.TrimPrefix(client[0].Text, "kvload: "))
}
