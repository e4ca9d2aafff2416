package qemutests

import (
	"fmt"
	"math/rand/v2"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The protected Linux guest's client writes linuxWrites values; the
// primary is killed once the client has had between linuxKillMin and
// linuxKillMax of them acknowledged (a random point of the stream: every
// write is a disk write and an fdatasync in the guest, so every kill falls
// in a burst of disk writes). Under TCG a protected write takes from a
// third of a second to a second and a half (a checkpoint's acknowledgement
// each, while the intermediary also seeds the backup), so the stream is
// kept short enough for three kills to fit the QEMU tier's 15 minutes.
const (
	linuxWrites  = 80
	linuxKillMin = 5
	linuxKillMax = 60
)

// linuxKills is how many kills TestLinuxFailover makes, each on a fresh
// cluster: UNDERSTUDY_INJECTIONS (make soak-linux) or 3.
func linuxKills(t *testing.T) int {
	n := 3
	if v := os.Getenv("UNDERSTUDY_INJECTIONS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("UNDERSTUDY_INJECTIONS=%q: want a positive count", v)
		}
	}
	return n
}

// linuxKill is what one kill showed.
type linuxKill struct {
	violation bool   // an acknowledged write missing or wrong, or the disk check failed
	survived  bool   // the client's first connection served every request
	result    string // kvload's result line
	// From the kill (host time; each console line's time is its QEMU's
	// start plus the line's): the intermediary declaring the primary
	// lost, the backup resuming the guest, and the client's first answer
	// after the kill.
	detect, activate, firstAnswer time.Duration
	heat                          string // the backup's last large-pages status line
}

// bench is the kill's bench line.
func (k linuxKill) bench() string {
	return fmt.Sprintf("bench linux-failover: detect_ms=%d activate_ms=%d first_answer_ms=%d guest_mib=256 peer_timeout_ms=5000",
		k.detect.Milliseconds(), k.activate.Milliseconds(), k.firstAnswer.Milliseconds())
}

// TestLinuxFailover: a protected Linux guest on three appliance nodes and a
// client on the same Ethernet segment, killed linuxKills times (each on a
// fresh cluster). Node 1 runs the nested Linux guest serving its
// key-value store on its virtio-blk disk under `understudy run --kernel
// --protect` (primary), node 2 the intermediary, node 3 the backup with
// its own replica of the disk and its own tap; each is configured by its
// config disk alone. The client, kvload on the test host in the segment's
// namespace (a fourth TCG node would take a share of the two cores the
// three need), writes over one TCP connection to the guest's address. At a random point of the stream node
// 1's QEMU is killed (SIGKILL): the intermediary fails over, the backup
// resumes the guest on its tap and announces its MAC, and the client goes
// on over the same connection, reading back every acknowledged value from
// memory and, after the guest's sync, from the disk. It ends with
//
//	soak linux-ft: injections=N violations=0 connections_survived=K
func TestLinuxFailover(t *testing.T) {
	e := setup(t)
	n := linuxKills(t)
	var violations, survived int
	for i := range n {
		var k linuxKill
		ok := t.Run(fmt.Sprintf("kill%d", i+1), func(t *testing.T) { k = linuxFailover(t, e, i == 0) })
		if !ok || k.violation {
			violations++
		}
		if k.survived {
			survived++
		}
	}
	fmt.Printf("soak linux-ft: injections=%d violations=%d connections_survived=%d\n", n, violations, survived)
	if violations != 0 || survived != n {
		t.Errorf("%d of %d kills lost acknowledged data or failed; %d connections of %d survived", violations, n, survived, n)
	}
}

// linuxFailover runs one kill on a fresh cluster; with demo, it says each
// step (make demo-linux shows them).
func linuxFailover(t testing.TB, e env, demo bool) linuxKill {
	step := func(format string, args ...any) {
		if demo {
			t.Logf("demo: "+format, args...)
		} else {
			t.Logf(format, args...)
		}
	}
	c := newLinuxCluster(t, e)
	ms := make([]*Machine, 3)
	boot := func(i, mem int, name, role, args string) {
		ms[i-1] = c.boot(t, i, mem, c.configDisk(t, i, name, role, args), "")
	}
	killAt := linuxKillMin + rand.IntN(linuxKillMax-linuxKillMin+1)
	step("1/6 booting the backup (node 3, %s) and the intermediary (node 2, %s), each configured by its config disk", nodeAddr(3), nodeAddr(2))
	boot(backupNode, backupMiB, "backup", "backup", backupArgs()+" --large-pages "+linuxLargePages)
	// Both links send their pages with zero pages elided (--compress store,
	// --wan-compress store): the guest's first image, mostly zero pages,
	// crosses them in a fraction of the bytes.
	boot(intermediaryNode, intermediaryMiB, "intermediary", "intermediary", intermediaryArgs()+" --wan-compress store")
	expect(t, ms[1], bootTimeout, "understudy: intermediary: listening on tcp://"+nodeAddr(2)+":"+interPort)
	step("2/6 booting the primary (node 1, %s): `understudy run --kernel --protect` of a nested Linux guest (%s) serving a key-value store on its disk", nodeAddr(1), guestAddr)
	boot(primaryNode, primaryMiB, "primary", "run", primaryArgs("--interval 100ms --status-interval 2s --compress store --large-pages "+linuxLargePages))
	step("3/6 starting the client (on the test host, %s on the segment): kvload writes %d values over one TCP connection; the primary dies after %d are acknowledged", hostClientAddr, linuxWrites, killAt)
	client := c.hostKVLoad(t, "-n", strconv.Itoa(linuxWrites), "-progress", "250ms", "-retry-for", "10m", "-timeout", "10m", "-want-survived", "-poweroff")
	primary, inter, backup := ms[0], ms[1], ms[2]
	expect(t, inter, nestedTimeout, `understudy: intermediary: primary "primary" connected`)
	waitAcked(t, client, killAt, protectedTimeout)
	killed := time.Now()
	primary.Kill()
	step("4/6 the primary's QEMU is killed (SIGKILL) with %d writes acknowledged to the client", killAt)
	il := expect(t, inter, nestedTimeout, "understudy: intermediary: primary lost at epoch ", "understudy: intermediary: backup activated at epoch ")
	bl := expect(t, backup, nestedTimeout, "understudy: backup: activated at epoch ")
	step("5/6 %s; %s", strings.TrimPrefix(il[1].Text, "understudy: "), strings.TrimPrefix(bl[0].Text, "understudy: "))
	if lost, activated, resumed := epochOf(il[0].Text), epochOf(il[1].Text), epochOf(bl[0].Text); lost == "" || lost != activated || activated != resumed {
		t.Errorf("epochs: the intermediary lost the primary at %q, activated the backup at %q; the backup resumed %q", lost, activated, resumed)
	}
	compressed := false
	for _, l := range primary.Lines() {
		compressed = compressed || strings.Contains(l.Text, "understudy: primary: ") && strings.Contains(l.Text, " compress=store ratio=")
	}
	if !compressed {
		t.Errorf("no status line of the primary shows its pages sent compressed (compress=store ratio=)")
	}
	res := expect(t, client, nestedTimeout, "kvload: result ")[0]
	k := linuxKill{result: strings.TrimPrefix(res.Text, "kvload: ")}
	at := func(m *Machine, l Line) time.Duration { return m.start.Add(l.At).Sub(killed) }
	k.detect, k.activate = at(inter, il[0]), at(backup, bl[0])
	for _, l := range client.Lines() {
		if strings.Contains(l.Text, "kvload: slow write ") && at(client, l) > 0 {
			k.firstAnswer = at(client, l)
			break
		}
	}
	want := fmt.Sprintf("kvload: result acked=%d verified=%d missing=0 wrong=0 disk=ok ", linuxWrites, linuxWrites)
	k.violation = !strings.HasPrefix(res.Text, want)
	k.survived = strings.Contains(res.Text, " connection_survived=true reconnects=0 instances=1 ")
	if k.violation || !k.survived {
		t.Errorf("the client's result %q, want it to begin %q and its first connection to survive", res.Text, want)
	}
	expect(t, client, nestedTimeout, "kvload: OK")
	step("6/6 the client's connection survived; every acknowledged value read back from memory and disk: %s", k.result)
	expect(t, backup, nestedTimeout, fmt.Sprintf("understudy-guest: kv: powering off on request: records=%d keys=%d", linuxWrites, linuxWrites))
	if err := client.Wait(exitTimeout); err != nil {
		t.Errorf("the client: %v", err)
	}
	poweredOff(t, backup, 0)
	k.heat = checkCarriedHeat(t, backup)
	t.Logf("linux failover: killed at %d acknowledged writes; %s; %.1fs from the kill to the client's end; %s; backup: %s", killAt, il[1].Text, time.Since(killed).Seconds(), k.bench(), k.heat)
	return k
}

// linuxLargePages is the large-page controller of the primary and the
// backup in linuxFailover: the primary's checkpoints carry its heat (dirty
// logging keeps it from promoting), the backup's controller starts from the
// heat of the epoch it activated.
const (
	linuxLargePagesWarmup = 6
	linuxLargePages       = "budget=16,warmup=6"
)

// checkCarriedHeat checks that the activated backup's large-page controller
// started from the primary's heat (some regions counted) and promoted
// regions before an unseeded one could (within its warm-up), and returns
// its last status line.
func checkCarriedHeat(t testing.TB, backup *Machine) string {
	t.Helper()
	carried := regexp.MustCompile(`large pages: starting from the primary's heat \(([0-9]+) regions`)
	status := regexp.MustCompile(`large-pages: policy=prioritized .* first_promotion=([0-9]+) \(seeded with carried heat\)`)
	var regions, first int
	var last string
	for _, l := range backup.Lines() {
		if m := carried.FindStringSubmatch(l.Text); m != nil {
			regions, _ = strconv.Atoi(m[1])
		}
		if m := status.FindStringSubmatch(l.Text); m != nil {
			first, _ = strconv.Atoi(m[1])
			last = l.Text
		}
	}
	if regions == 0 || first == 0 || first >= linuxLargePagesWarmup {
		t.Errorf("the backup's large pages: %d regions of heat carried, first promotion in window %d (want heat, and a promotion before window %d); last status %q",
			regions, first, linuxLargePagesWarmup, last)
	}
	return last
}

// waitAcked waits until kvload's progress lines on m show n acknowledged
// writes.
func waitAcked(t testing.TB, m *Machine, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		lines := m.Lines()
		for i := len(lines) - 1; i >= 0; i-- {
			_, rest, ok := strings.Cut(lines[i].Text, "kvload: progress acked=")
			if !ok {
				continue
			}
			v, _, _ := strings.Cut(rest, " ")
			if a, err := strconv.Atoi(v); err == nil && a >= n {
				return
			}
			break
		}
		if m.Exited() || time.Now().After(deadline) {
			t.Fatalf("the client did not have %d writes acknowledged within %v (QEMU exited: %v)", n, timeout, m.Exited())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// BenchmarkLinuxFailover prints one kill's figures: from the SIGKILL of the
// primary's QEMU to the intermediary declaring it lost (its peer timeout is
// 5 s), to the backup resuming the guest, and to the client's first answer
// (its TCP retransmission backoff included).
func BenchmarkLinuxFailover(b *testing.B) {
	e := setup(b)
	for range b.N {
		fmt.Println(linuxFailover(b, e, false).bench())
	}
}
