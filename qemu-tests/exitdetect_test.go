package qemutests

import (
	"fmt"
	"testing"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/vmm/largepage"
)

// Process-exit detection on a real Linux guest (seed idea 2): the nested
// guest runs a process storm (guest.mode=storm: short-lived processes made
// by exec and by fork, one at a time, next to a steady worker and a
// long-lived process that maps and munmaps 64 MiB over and over), and the
// nested `understudy run --large-pages ...,exit-detect=both,exit-audit=VA`
// keeps shadow copies of its page tables. The audit runs the four
// exit-detection modes side by side at every sampling pause and scores each
// decision by the tag page the two long-lived processes keep at VA
// (largepage.LiveTag): a decision on one of them is a false positive. The
// guest's init counts the exits that happened.
const (
	stormDuration = "30s"
	// stormPeriod is the sampling period: each pause samples the CR3 the
	// one vCPU has loaded, so a process is seen (and its exit can be
	// detected) only if a pause falls in its life.
	stormPeriod = "100ms"
	stormChild  = "guest.child_mib=4 guest.child_ms=1000"
)

// exitDetectRun is what one storm run printed.
type exitDetectRun struct {
	exits int            // the guest's count of processes that exited
	modes []string       // the audit's lines, in largepage.AuditModes order
	done  string         // the guest's last storm line
	audit map[string]int // per mode: the line index in modes
}

// runExitDetect boots the storm guest in an appliance and returns what it
// printed, checking the run's shape on the way.
func runExitDetect(t testing.TB, e env) exitDetectRun {
	tag := fmt.Sprintf("%#x", uint64(boot.DefaultTagVA))
	m := e.boot(t, "understudy.role=test "+nestedRun(
		fmt.Sprintf("--large-pages budget=8,period=%s,exit-detect=both,exit-audit=%s --status-interval 5s ", stormPeriod, tag),
		fmt.Sprintf("guest.mode=storm guest.duration=%s guest.tag=%s %s", stormDuration, tag, stormChild)))
	expect(t, m, bootTimeout, "understudy-appliance: ready role=test", "understudy-appliance: exec: understudy run --kernel")
	expect(t, m, nestedTimeout, "understudy: large pages: sampling with ",
		"understudy-guest: storm: live role=", "understudy-guest: storm: live role=")
	got := expect(t, m, nestedTimeout, "understudy-guest: storm: done exits=", "understudy: guest powered off")
	r := exitDetectRun{done: got[0].Text, audit: map[string]int{}}
	r.exits = int(statusField(r.done, "exits"))
	for i, d := range largepage.AuditModes {
		l := expect(t, m, exitTimeout, "understudy: exit-detect audit: mode="+d.String()+" ")
		r.modes = append(r.modes, l[0].Text)
		r.audit[d.String()] = i
	}
	expect(t, m, exitTimeout, "understudy-appliance: exec: exit status 0")
	poweredOff(t, m, 0)
	return r
}

// field is a number of mode's audit line.
func (r exitDetectRun) field(mode, key string) int {
	return int(statusField(r.modes[r.audit[mode]], key))
}

// benchLines are the `bench exit-detect` lines of a run: exits are the
// guest's, the rest each mode's. Trace work saved is against mode none's
// transitions: all of them (mostly the long-lived munmap process's), and
// those of the short-lived processes (exit_trace_saved_pct).
func (r exitDetectRun) benchLines() []string {
	saved := func(m, key string) float64 {
		if none := r.field("none", key); none > 0 {
			return 100 * (1 - float64(r.field(m, key))/float64(none))
		}
		return 0
	}
	var out []string
	for _, d := range largepage.AuditModes {
		m := d.String()
		out = append(out, fmt.Sprintf("bench exit-detect: mode=%s exits=%d detected=%d false_positives=%d latency_transitions_p50=%d trace_events_saved_pct=%.1f exit_trace_saved_pct=%.1f shadow_kib_freed=%d tracked=%d guest=linux",
			m, r.exits, r.field(m, "detected"), r.field(m, "false_positives"), r.field(m, "latency_transitions_p50"),
			saved(m, "trace_events"), saved(m, "short_trace_events"), r.field(m, "shadow_kib_freed"), r.field(m, "tracked")))
	}
	return out
}

// TestLinuxExitDetect: on a real Linux guest's process storm,
//   - the guest's processes exited (both kinds) and the long-lived ones ran;
//   - mode none decides nothing;
//   - min-va detects exits, and takes the live processes for exiting ones
//     less often than consecutive, for which every 64 MiB munmap looks
//     like a teardown (min-va can still be wrong: a live process whose
//     lowest accessed page goes, e.g. a heap page its Go runtime returns
//     with MADV_DONTNEED while its text's accessed bits were not seen);
//   - both detects at least what min-va does, and follows fewer
//     transitions than none; min-va fewer of the short-lived processes';
//   - no mode detects more exits than it tracked short-lived spaces, and
//     every mode saw both live processes.
func TestLinuxExitDetect(t *testing.T) {
	e := setup(t)
	r := runExitDetect(t, e)
	for _, l := range append([]string{r.done}, r.modes...) {
		t.Log(l)
	}
	for _, l := range r.benchLines() {
		t.Log(l)
	}
	if r.exits <= 0 || statusField(r.done, "exec") <= 0 || statusField(r.done, "fork") <= 0 || statusField(r.done, "munmaps") <= 0 {
		t.Errorf("the storm %q: want exits of both kinds and munmaps", r.done)
	}
	if d, fp := r.field("none", "detected"), r.field("none", "false_positives"); d != 0 || fp != 0 {
		t.Errorf("mode none decided: %s", r.modes[0])
	}
	if d := r.field("min-va", "detected"); d <= 0 {
		t.Errorf("min-va detected no exit: %s", r.modes[r.audit["min-va"]])
	}
	if fp := r.field("min-va", "false_positives"); fp >= r.field("consecutive", "false_positives") {
		t.Errorf("min-va took live processes for exiting ones as often as consecutive did (the munmap process's signature): %s / %s",
			r.modes[r.audit["min-va"]], r.modes[r.audit["consecutive"]])
	}
	if r.field("both", "detected") < r.field("min-va", "detected") {
		t.Errorf("both detected fewer exits than min-va: %s / %s", r.modes[r.audit["both"]], r.modes[r.audit["min-va"]])
	}
	if r.field("both", "trace_events") >= r.field("none", "trace_events") || r.field("min-va", "short_trace_events") >= r.field("none", "short_trace_events") {
		t.Errorf("detection followed as many transitions as none: %s / %s / %s", r.modes[r.audit["min-va"]], r.modes[r.audit["both"]], r.modes[0])
	}
	for _, l := range r.modes {
		if statusField(l, "live") < 2 {
			t.Errorf("the audit did not see both live processes: %s", l)
		}
		if statusField(l, "detected") > statusField(l, "tracked")-statusField(l, "live") {
			t.Errorf("more exits detected than short-lived spaces tracked: %s", l)
		}
	}
}

// TestLiveTagAgrees: the guest's init and the audit agree on the tag.
func TestLiveTagAgrees(t *testing.T) {
	if boot.LiveTag != largepage.LiveTag || len(largepage.LiveTag) != 16 {
		t.Errorf("initramfs/boot.LiveTag %q, vmm/largepage.LiveTag %q: want the same 16 bytes", boot.LiveTag, largepage.LiveTag)
	}
}

// BenchmarkLinuxExitDetect prints `bench exit-detect` for each mode, from
// one storm run (the same guest, the same pauses).
func BenchmarkLinuxExitDetect(b *testing.B) {
	e := setup(b)
	for range b.N {
		r := runExitDetect(b, e)
		for _, l := range r.benchLines() {
			fmt.Println(l)
		}
	}
}
