package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// TestMain makes the test binary a child role of the storm when
// stormRoleEnv is set, as guestinit's main does: runStorm in the tests
// re-executes the test binary.
func TestMain(m *testing.M) {
	if role := os.Getenv(stormRoleEnv); role != "" {
		os.Exit(roleMain(os.Stderr, role, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func TestParseConfigStorm(t *testing.T) {
	c, err := parseConfig(mustParams(t, "console=ttyS0 guest.mode=storm"))
	want := config{mode: modeStorm, iface: "eth0", port: 7777, disk: "/dev/vda", console: "/dev/ttyS0", timeout: 60 * time.Second,
		duration: 30 * time.Second, tag: boot.DefaultTagVA, childMiB: 4, childMs: 300}
	if err != nil || c != want {
		t.Errorf("parseConfig(storm) = %+v, %v, want %+v", c, err, want)
	}
	if c.modules() != nil {
		t.Errorf("storm mode loads %v, want no modules", c.modules())
	}
	// The storm's parameters may come before guest.mode.
	c, err = parseConfig(mustParams(t, "guest.duration=1s guest.tag=0x10000 guest.child_mib=64 guest.child_ms=10000 guest.mode=storm"))
	want.duration, want.tag, want.childMiB, want.childMs = time.Second, 0x10000, 64, 10000
	if err != nil || c != want {
		t.Errorf("parseConfig(storm, all set) = %+v, %v, want %+v", c, err, want)
	}
	c, err = parseConfig(mustParams(t, "guest.mode=storm guest.duration=1h guest.tag=0x7effffff000 guest.child_mib=1 guest.child_ms=10"))
	want.duration, want.tag, want.childMiB, want.childMs = time.Hour, 0x7effffff000, 1, 10
	if err != nil || c != want {
		t.Errorf("parseConfig(storm, other bounds) = %+v, %v, want %+v", c, err, want)
	}
	for _, tt := range []struct{ in, want string }{
		{"guest.mode=storm guest.duration=999ms", "guest.duration=\"999ms\": want a duration of 1s..1h"},
		{"guest.mode=storm guest.duration=61m", "1s..1h"},
		{"guest.mode=storm guest.duration=30", "1s..1h"},
		{"guest.mode=storm guest.tag=0x7e0000000001", "page-aligned user address in [0x10000, 0x7f0000000000)"},
		{"guest.mode=storm guest.tag=0x7f0000000000", "guest.tag=\"0x7f0000000000\""},
		{"guest.mode=storm guest.tag=0xffff800000000000", "page-aligned user address"},
		{"guest.mode=storm guest.tag=0xf000", "page-aligned user address"},
		{"guest.mode=storm guest.tag=0", "page-aligned user address"},
		{"guest.mode=storm guest.tag=tag", "page-aligned user address"},
		{"guest.mode=storm guest.tag=0x1000000000000000000", "page-aligned user address"},
		{"guest.mode=storm guest.child_mib=0", "guest.child_mib=\"0\": want 1..64"},
		{"guest.mode=storm guest.child_mib=65", "want 1..64"},
		{"guest.mode=storm guest.child_mib=4M", "want 1..64"},
		{"guest.mode=storm guest.child_ms=9", "guest.child_ms=\"9\": want 10..10000"},
		{"guest.mode=storm guest.child_ms=10001", "want 10..10000"},
		{"guest.mode=storm guest.child_ms=1s", "want 10..10000"},
		{"guest.mode=storm guest.child_ms=300 guest.child_ms=300", "given twice"},
		{"guest.mode=storm guest.duration", "needs a value"},
		{"guest.duration=30s", "guest.duration applies only to guest.mode=storm"},
		{"guest.child_ms=300 guest.tag=0x10000 guest.mode=kv guest.addr=192.0.2.2/24", "guest.child_ms applies only to guest.mode=storm"},
		{"guest.mode=echo guest.child_mib=4", "guest.child_mib applies only"},
		{"guest.mode=storm guest.children=4", "unknown parameter guest.children"},
	} {
		if _, err := parseConfig(mustParams(t, tt.in)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseConfig(%q) = %v, want an error containing %q", tt.in, err, tt.want)
		}
	}
}

func TestStormArgs(t *testing.T) {
	s := stormSpec{duration: 90 * time.Second, tag: 0x7e0000001000, childMiB: 2, childMs: 50}
	c, err := parseConfig(mustParams(t, strings.Join(s.stormArgs(), " ")))
	want := config{mode: modeStorm, iface: "eth0", port: 7777, disk: "/dev/vda", console: "/dev/ttyS0", timeout: 60 * time.Second,
		duration: 90 * time.Second, tag: 0x7e0000001000, childMiB: 2, childMs: 50}
	if err != nil || c != want {
		t.Errorf("parseConfig(%q) = %+v, %v, want %+v", s.stormArgs(), c, err, want)
	}
}

func TestParseReport(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want report
	}{
		{"live pid=42 tag=0x7e0000000000", report{live: true, pid: 42, tag: 0x7e0000000000}},
		{"munmaps=0", report{}},
		{"munmaps=17", report{munmaps: 17}},
	} {
		if got, err := parseReport(tt.in); err != nil || got != tt.want {
			t.Errorf("parseReport(%q) = %+v, %v, want %+v", tt.in, got, err, tt.want)
		}
	}
	for _, in := range []string{
		"", "live", "live pid=42", "live pid=42 tag=0x7e0000000000 x", "live  pid=42 tag=0x7e0000000000",
		"live pid=0 tag=0x10000", "live pid=-1 tag=0x10000", "live pid=042 tag=0x10000", "live pid=42 tag=10000",
		"live pid=42 tag=0x07e0", "live pid=42 tag=0xg", "live tag=0x10000 pid=42", "munmaps=", "munmaps=-1",
		"munmaps=01", "munmaps=1 ", "munmaps=+1", "dead pid=42 tag=0x10000",
	} {
		if got, err := parseReport(in); err == nil {
			t.Errorf("parseReport(%q) = %+v, want an error", in, got)
		}
	}
}

func FuzzParseReport(f *testing.F) {
	for _, s := range []string{"live pid=42 tag=0x7e0000000000", "munmaps=3", "live pid=1 tag=0x0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := parseReport(s)
		if err != nil {
			return
		}
		// What it accepts, it would have written exactly so.
		again := fmt.Sprintf("munmaps=%d", r.munmaps)
		if r.live {
			again = fmt.Sprintf("live pid=%d tag=%#x", r.pid, r.tag)
		}
		if again != s || r.munmaps < 0 || (r.live && r.pid <= 0) {
			t.Fatalf("parseReport(%q) = %+v", s, r)
		}
	})
}

// TestMapTag maps the tagged page in this process: it holds the tag, and
// a second mapping at the same address fails instead of replacing it.
func TestMapTag(t *testing.T) {
	const va = boot.DefaultTagVA + 0x10000 // not where a storm of another test maps it (children are other processes anyway)
	if _, err := mapTag(va); err != nil {
		t.Fatal(err)
	}
	defer unix.RawSyscall(unix.SYS_MUNMAP, va, pageSize, 0)
	if got, err := readTag(os.Getpid(), va); err != nil || got != boot.LiveTag {
		t.Errorf("readTag(self, %#x) = %q, %v, want %q", va, got, err, boot.LiveTag)
	}
	if _, err := mapTag(va); err == nil || !strings.Contains(err.Error(), "file exists") {
		t.Errorf("mapTag(%#x) again = %v, want EEXIST", va, err)
	}
	if len(boot.LiveTag) != 16 {
		t.Errorf("boot.LiveTag is %d bytes, want 16", len(boot.LiveTag))
	}
}

// TestForkChild: the raw fork's child zeroes its copy of the tag, writes
// every page of its copy of the buffer and exits with 0; the parent's tag
// and buffer are untouched.
func TestForkChild(t *testing.T) {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = 1
	}
	tag := []byte(boot.LiveTag)
	for range 3 {
		if err := forkChild(buf, tag, 20*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
	for i, b := range buf {
		if b != 1 {
			t.Fatalf("after the fork children, the parent's buffer holds %d at %d, want 1", b, i)
		}
	}
	if string(tag) != boot.LiveTag {
		t.Errorf("after the fork children, the parent's tag is %q", tag)
	}
}

func stormTestSpec(stderr *syncBuffer) stormSpec {
	return stormSpec{
		exe:         "/proc/self/exe",
		env:         os.Environ(),
		stderr:      stderr,
		duration:    time.Second,
		tag:         boot.DefaultTagVA,
		childMiB:    1,
		childMs:     20,
		progress:    300 * time.Millisecond,
		liveTimeout: time.Minute,
	}
}

// TestStorm runs the storm on this host, its children being the test
// binary in their roles: both kinds of short-lived children are created
// and reaped, the tagged processes hold boot.LiveTag at the tag address
// and stay alive, the munmap process counts its unmaps, and the console
// lines say so.
func TestStorm(t *testing.T) {
	var out, stderr syncBuffer
	r, err := runStorm(&out, stormTestSpec(&stderr))
	defer r.stop()
	if err != nil {
		t.Fatalf("runStorm: %v\nprinted:\n%s\nchildren's stderr:\n%s", err, out.String(), stderr.String())
	}
	if r.exec == 0 || r.fork == 0 || r.exec != r.fork {
		t.Errorf("storm reaped exec=%d fork=%d, want both > 0 and equal (pairs)", r.exec, r.fork)
	}
	if r.elapsed < time.Second {
		t.Errorf("storm ended after %v, before its duration of 1s", r.elapsed)
	}
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) < 4 {
		t.Fatalf("storm printed %q, want two live lines, progress and done", out.String())
	}
	for i, role := range []string{roleSteady, roleMunmap} {
		lp := r.live[i]
		pid := lp.cmd.Process.Pid
		if want := fmt.Sprintf("%sstorm: live role=%s pid=%d tag=0x7e0000000000", prefix, role, pid); lines[i] != want || lp.role != role {
			t.Errorf("line %d = %q, want %q", i, lines[i], want)
		}
		if err := lp.alive(); err != nil {
			t.Error(err)
		}
		if got, err := readTag(pid, boot.DefaultTagVA); err != nil || got != boot.LiveTag {
			t.Errorf("role=%s pid=%d: %#x holds %q, %v, want %q", role, pid, boot.DefaultTagVA, got, err, boot.LiveTag)
		}
	}
	progress := regexp.MustCompile(`^` + prefix + `storm: exits=(\d+) exec=(\d+) fork=(\d+) elapsed=\d+\.\ds$`)
	lastExits := 0
	for _, l := range lines[2 : len(lines)-1] {
		m := progress.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("progress line %q, want %v", l, progress)
		}
		n, _ := strconv.Atoi(m[1])
		e, _ := strconv.Atoi(m[2])
		f, _ := strconv.Atoi(m[3])
		if n != e+f || n <= lastExits {
			t.Errorf("progress line %q after %d exits: counts inconsistent", l, lastExits)
		}
		lastExits = n
	}
	// The storm lasts longer than the progress interval: at least one
	// progress line, none with more exits than the storm reaped.
	if len(lines) < 4 || lastExits > r.exec+r.fork {
		t.Errorf("the last progress line says %d exits of %d: want at least one line, none above the total", lastExits, r.exec+r.fork)
	}
	done := regexp.MustCompile(fmt.Sprintf(`^%sstorm: done exits=%d exec=%d fork=%d munmaps=%d duration=\d+\.\ds$`, prefix, r.exec+r.fork, r.exec, r.fork, r.munmaps))
	if l := lines[len(lines)-1]; !done.MatchString(l) {
		t.Errorf("last line %q, want %v", l, done)
	}
	// The munmap process goes on unmapping (the count is only read
	// here; the deadline is a guard against a hang).
	deadline := time.Now().Add(time.Minute)
	for r.live[1].munmaps.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the munmap process reported no unmap within a minute; stderr: %s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := stderr.String(); s != "" {
		t.Errorf("the children wrote to stderr: %q", s)
	}
}

// killOnLive is the storm's console: it kills the process of role once
// the storm says it is live.
type killOnLive struct {
	syncBuffer
	role   string
	once   sync.Once
	killed chan int
}

func (k *killOnLive) Write(p []byte) (int, error) {
	m := regexp.MustCompile(`storm: live role=` + k.role + ` pid=(\d+)`).FindSubmatch(p)
	if m != nil {
		k.once.Do(func() {
			pid, _ := strconv.Atoi(string(m[1]))
			unix.Kill(pid, unix.SIGKILL)
			k.killed <- pid
		})
	}
	return k.syncBuffer.Write(p)
}

// TestStormTaggedExit: a tagged process that exits during the storm fails
// it.
func TestStormTaggedExit(t *testing.T) {
	var stderr syncBuffer
	out := &killOnLive{role: roleSteady, killed: make(chan int, 1)}
	s := stormTestSpec(&stderr)
	s.duration = time.Hour // it ends only by the failure
	r, err := runStorm(out, s)
	defer r.stop()
	pid := <-out.killed
	want := fmt.Sprintf("storm: role=steady pid=%d exited during the storm: signal: killed", pid)
	if err == nil || err.Error() != want {
		t.Errorf("runStorm with its steady process killed = %v, want %q", err, want)
	}
}

// TestStormFailingChildren: a program that exits at once, as the tagged
// roles, fails the storm before it starts; as the short-lived child, it
// fails it with its status.
func TestStormFailingChildren(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "fail")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	var out, stderr syncBuffer
	s := stormTestSpec(&stderr)
	s.exe = exe
	r, err := runStorm(&out, s)
	defer r.stop()
	if err == nil || !strings.Contains(err.Error(), "role=steady") || out.String() != "" {
		t.Errorf("runStorm(%s) = %v, printed %q, want a failure of the steady role and nothing printed", exe, err, out.String())
	}
	if err := execChild(s); err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Errorf("execChild(%s) = %v, want exit status 3", exe, err)
	}
}

func TestRoleMain(t *testing.T) {
	var stderr bytes.Buffer
	if code := roleMain(&stderr, "dance", []string{"guest.mode=storm"}); code != 1 || !strings.Contains(stderr.String(), `unknown role "dance"`) {
		t.Errorf("roleMain(dance) = %d, printed %q", code, stderr.String())
	}
	stderr.Reset()
	if code := roleMain(&stderr, roleChild, []string{"guest.mode=storm", "guest.child_ms=5"}); code != 1 || !strings.Contains(stderr.String(), "guest.child_ms") {
		t.Errorf("roleMain(child, bad args) = %d, printed %q", code, stderr.String())
	}
	stderr.Reset()
	if code := roleMain(&stderr, roleChild, []string{"guest.mode=kv", "guest.addr=192.0.2.2/24"}); code != 1 || !strings.Contains(stderr.String(), "not guest.mode=storm") {
		t.Errorf("roleMain(child, kv) = %d, printed %q", code, stderr.String())
	}
	stderr.Reset()
	if code := roleMain(&stderr, roleChild, []string{"guest.mode=storm", "guest.child_mib=1", "guest.child_ms=10"}); code != 0 || stderr.Len() != 0 {
		t.Errorf("roleMain(child) = %d, printed %q", code, stderr.String())
	}
}
