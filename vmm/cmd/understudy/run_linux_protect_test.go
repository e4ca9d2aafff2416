package main

import (
	"bytes"
	"context"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/linuxtest"
)

// lockedBuffer is an output a role writes while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// cliRole is one run of the CLI in the test's process: a role, or `run`.
type cliRole struct {
	name      string
	done      chan int
	out, errs *lockedBuffer
}

// startRole runs the CLI with args until it ends or ctx does.
func startRole(ctx context.Context, name string, args ...string) *cliRole {
	r := &cliRole{name: name, done: make(chan int, 1), out: &lockedBuffer{}, errs: &lockedBuffer{}}
	go func() { r.done <- run(ctx, args, r.out, r.errs) }()
	return r
}

// wantExit waits for r to end and reports an exit code other than want.
func (r *cliRole) wantExit(t *testing.T, want int) {
	t.Helper()
	if code := <-r.done; code != want {
		t.Errorf("the %s ended with %d, want %d: %s", r.name, code, want, r.errs.String())
	}
}

// endFailover waits for the intermediary of a cluster that failed over to
// end by itself (0), then stops the backup (cancel: interrupted).
func endFailover(t *testing.T, inter, backup *cliRole, cancel func()) {
	t.Helper()
	inter.wantExit(t, 0)
	cancel()
	backup.wantExit(t, exitInterrupted)
}

func freeTCP(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "tcp://" + l.Addr().String()
}

// TestRunLinuxProtected: `run --kernel ... --protect` runs a Linux guest
// through a real intermediary and backup (the CLI's own roles, mTLS with
// keys from `understudy keys`). The guest's console output comes out (once
// acknowledged), it powers off, the run ends with 0, and the intermediary
// and the backup end as protection ends.
func TestRunLinuxProtected(t *testing.T) {
	requireKVM(t)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type ended struct {
		code int
		errs *lockedBuffer
	}
	start := func(args ...string) (chan ended, *lockedBuffer) {
		errs := &lockedBuffer{}
		done := make(chan ended, 1)
		go func() { done <- ended{run(ctx, args, &lockedBuffer{}, errs), errs} }()
		return done, errs
	}
	bdone, berrs := start("backup", "--listen", baddr, "--keys", dir, "--status-interval", "0")
	idone, ierrs := start("intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0")
	for _, e := range []*lockedBuffer{berrs, ierrs} {
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(e.String(), "listening on") {
			if time.Now().After(deadline) {
				t.Fatalf("a role is not listening: %s", e.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeUpPowerOff), 0o644)
	code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--protect", iaddr, "--keys", dir,
		"--interval", "10ms", "--output-hold", "bytes=1M,frames=64", "--status-interval", "0")
	if code != 0 || out != "up\n" || !strings.Contains(errs, "guest powered off") {
		t.Errorf("run --kernel --protect = %d, stdout %q, stderr %q; want 0, \"up\\n\", powered off", code, out, errs)
	}
	for _, ch := range []chan ended{idone, bdone} {
		select {
		case e := <-ch:
			if e.code != 0 {
				t.Errorf("role exit %d: %s", e.code, e.errs.String())
			}
		case <-time.After(20 * time.Second):
			t.Fatal("a role did not end with protection")
		}
	}
}

func TestRunLinuxProtectBadInput(t *testing.T) {
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeUpPowerOff), 0o644)
	dir := t.TempDir()
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"run", "--output-hold", "bytes=1M"}, exitUsage, "--output-hold needs --kernel"},
		{[]string{"run", "--kernel", k, "--output-hold", "bytes=1M"}, exitUsage, "--output-hold with --kernel needs --protect"},
		{[]string{"run", "--kernel", k, "--interval", "5ms"}, exitUsage, "--interval with --kernel needs --protect"},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1", "--keys", dir, "--output-hold", "frames=0"}, exitUsage, "frames=0"},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1", "--keys", dir, "--output-hold", "bytes=2G"}, exitUsage, "bytes=2G"},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1", "--keys", dir, "--output-hold", "packets=3"}, exitUsage, `unknown key "packets"`},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1", "--save", "f"}, exitUsage, "--protect cannot be combined with --save"},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1", "--interval", "0s"}, exitError, "--interval"},
		{[]string{"run", "--kernel", k, "--protect", "tcp://127.0.0.1:1"}, exitError, "--keys DIR is required"},
		{[]string{"backup", "--keys", dir, "--net", "mac=02:00:00:00:00:01"}, exitUsage, "tap=NAME is required"},
	}
	for _, tc := range tests {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
	}
}

// rarpSource returns the source MAC of a RARP frame (nil for none).
func rarpSource(frame []byte) net.HardwareAddr {
	if len(frame) < 14 {
		return nil
	}
	return net.HardwareAddr(frame[6:12])
}

// TestRunLinuxProtectedFailover: the three roles of the CLI protect a Linux
// guest with a NIC (`run --kernel --net ... --protect`, `backup --net`).
// Its console output comes out on the primary once acknowledged; the
// primary goes away without a goodbye; the intermediary fails over and the
// backup resumes the guest with its NIC on the backup's own tap, where it
// announces the primary's MAC. A large-page spec the guest cannot have does
// not stop it. The primary's and the intermediary's links send their pages
// compressed (--compress store, --wan-compress store).
func TestRunLinuxProtectedFailover(t *testing.T) {
	requireKVM(t)
	ptap, btap := makeTap(t), makeTap(t)
	brd := linuxtest.NewTapReader(t, btap)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// The backup's large-page spec cannot serve a Linux guest (the refault
	// sampler would revoke memory its devices use): the guest runs on
	// without large pages, and the backup says why.
	backup := startRole(ctx, "backup", "backup", "--listen", baddr, "--keys", dir, "--net", "tap="+btap, "--status-interval", "0",
		"--large-pages", "budget=2,source=refault")
	// Both links carry their pages compressed (zero pages elided).
	inter := startRole(ctx, "intermediary", "intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0",
		"--wan-compress", "store")
	waitStderr(t, backup.errs, "listening on")
	waitStderr(t, inter.errs, "listening on")
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codePrintSpin), 0o644)
	pctx, kill := context.WithCancel(ctx)
	primary := startRole(pctx, "primary", "run", "--kernel", k, "--mem", "64M", "--net", "tap="+ptap+",mac=02:00:00:00:00:31",
		"--protect", iaddr, "--keys", dir, "--interval", "10ms", "--status-interval", "20ms", "--compress", "store")
	waitStderr(t, primary.out, "X") // released: checkpoint 1 was acknowledged
	waitStderr(t, primary.errs, " compress=store ratio=0.")
	kill()
	primary.wantExit(t, exitInterrupted)
	waitStderr(t, backup.errs, "activated at epoch")
	if mac := rarpSource(brd.Next(0x8035, 10*time.Second)); mac.String() != "02:00:00:00:00:31" {
		t.Errorf("announcement on the backup's tap from %v, want 02:00:00:00:00:31", mac)
	}
	waitStderr(t, backup.errs, "the activated guest runs without large pages (large pages: source=refault: ")
	endFailover(t, inter, backup, cancel)
}

// Print 'X' on COM1, then spin.
var codePrintSpin = []byte{0x66, 0xba, 0xf8, 0x03, 0xb0, 'X', 0xee, 0xeb, 0xfe}

// Print 'X' on COM1, then write the first 256 KiB of guest regions 16 and
// 17 (at 32 and 34 MiB) over and over, a new value each pass. (The guest
// runs at CPL0, which this host's KVM emulates: a few MiB a second.)
var codePrintWrite = []byte{
	0x66, 0xba, 0xf8, 0x03, 0xb0, 'X', 0xee, // mov dx, 0x3f8; mov al, 'X'; out dx, al
	0xbf, 0x00, 0x00, 0x00, 0x02, // loop: mov edi, 0x2000000
	0xb9, 0x00, 0x00, 0x01, 0x00, // mov ecx, 0x10000 (dwords)
	0xff, 0xc0, // inc eax
	0xf3, 0xab, // rep stosd
	0xbf, 0x00, 0x00, 0x20, 0x02, // mov edi, 0x2200000
	0xb9, 0x00, 0x00, 0x01, 0x00, // mov ecx, 0x10000
	0xf3, 0xab, // rep stosd
	0xeb, 0xe4, // jmp loop
}

// TestRunLinuxProtectHeatFailover: `run --kernel --protect --large-pages`
// gives each checkpoint of a Linux guest its controller's heat (counted
// from the pages the checkpoints found written), and `backup
// --large-pages` seeds the activated guest's controller with it: the
// regions the guest writes are promoted in its first window, where a cold
// start would still be warming up.
func TestRunLinuxProtectHeatFailover(t *testing.T) {
	requireKVM(t)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const lp = "budget=2,period=60ms,window=8ms,warmup=6"
	backup := startRole(ctx, "backup", "backup", "--listen", baddr, "--keys", dir, "--large-pages", lp, "--status-interval", "20ms")
	inter := startRole(ctx, "intermediary", "intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0")
	waitStderr(t, backup.errs, "listening on")
	waitStderr(t, inter.errs, "listening on")
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codePrintWrite), 0o644)
	pctx, kill := context.WithCancel(ctx)
	maddr := strings.TrimPrefix(freeTCP(t), "tcp://")
	primary := startRole(pctx, "primary", "run", "--kernel", k, "--mem", "64M", "--protect", iaddr, "--keys", dir,
		"--interval", "10ms", "--large-pages", lp, "--status-interval", "20ms", "--metrics", maddr)
	// The controller counts the pages the checkpoints found written (dirty
	// logging keeps it from promoting); its figures join the primary's
	// metrics. The first checkpoints (the whole guest) take a while: wait
	// for windows counted from acknowledged ones.
	var w0 float64
	scrapeUntil(t, "http://"+maddr+"/metrics", func(m map[string]float64) bool {
		if w0 == 0 && m["understudy_primary_acked_epoch"] >= 2 {
			w0 = m["understudy_largepages_windows_total"]
		}
		return w0 > 0 && m["understudy_largepages_windows_total"] >= w0+8
	}, primary.errs.String)
	if !strings.Contains(primary.errs.String(), "write_windows=") {
		t.Errorf("the primary's status lines do not count written pages: %s", primary.errs.String())
	}
	time.Sleep(100 * time.Millisecond) // ten more epochs: the heat is committed
	kill()
	primary.wantExit(t, exitInterrupted)
	waitStderr(t, backup.errs, "activated at epoch")
	waitStderr(t, backup.errs, "large pages: starting from the primary's heat (")
	// The seeded controller promotes the two regions the guest writes
	// (16 and 17) in its first windows: no warm-up.
	seeded := regexp.MustCompile(`large-pages: policy=prioritized source=(guest|damon) windows=([0-9]+) .*promoted=2 .*\(seeded with carried heat\)`)
	first := waitMatch(t, backup.errs, seeded, "the activated guest's controller did not promote both regions")
	if w, _ := strconv.Atoi(first[2]); w > 2 {
		t.Errorf("the backup's first status line with both regions promoted is %q: want one of a seeded controller's first windows", first[0])
	}
	t.Logf("backup: %s", first[0])
	endFailover(t, inter, backup, cancel)
}
