package main

import (
	"bytes"
	"context"
	"net"
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
// announces the primary's MAC.
func TestRunLinuxProtectedFailover(t *testing.T) {
	requireKVM(t)
	ptap, btap := makeTap(t), makeTap(t)
	brd := linuxtest.NewTapReader(t, btap)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type ended struct{ code int }
	start := func(ctx context.Context, args ...string) (chan ended, *lockedBuffer, *lockedBuffer) {
		out, errs := &lockedBuffer{}, &lockedBuffer{}
		done := make(chan ended, 1)
		go func() { done <- ended{run(ctx, args, out, errs)} }()
		return done, out, errs
	}
	waitText := func(b *lockedBuffer, s string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(b.String(), s) {
			if time.Now().After(deadline) {
				t.Fatalf("no %q in %q", s, b.String())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	bdone, _, berrs := start(ctx, "backup", "--listen", baddr, "--keys", dir, "--net", "tap="+btap, "--status-interval", "0")
	idone, _, ierrs := start(ctx, "intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0")
	waitText(berrs, "listening on")
	waitText(ierrs, "listening on")
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codePrintSpin), 0o644)
	pctx, kill := context.WithCancel(ctx)
	pdone, pout, perrs := start(pctx, "run", "--kernel", k, "--mem", "64M", "--net", "tap="+ptap+",mac=02:00:00:00:00:31",
		"--protect", iaddr, "--keys", dir, "--interval", "10ms", "--status-interval", "0")
	waitText(pout, "X") // released: checkpoint 1 was acknowledged
	kill()
	if e := <-pdone; e.code != exitInterrupted {
		t.Errorf("the primary's run ended with %d, want %d: %s", e.code, exitInterrupted, perrs.String())
	}
	waitText(berrs, "activated at epoch")
	if mac := rarpSource(brd.Next(0x8035, 10*time.Second)); mac.String() != "02:00:00:00:00:31" {
		t.Errorf("announcement on the backup's tap from %v, want 02:00:00:00:00:31", mac)
	}
	if e := <-idone; e.code != 0 {
		t.Errorf("the intermediary ended with %d after the failover: %s", e.code, ierrs.String())
	}
	cancel()
	if e := <-bdone; e.code != exitInterrupted {
		t.Errorf("the backup ended with %d, want %d: %s", e.code, exitInterrupted, berrs.String())
	}
}

// Print 'X' on COM1, then spin.
var codePrintSpin = []byte{0x66, 0xba, 0xf8, 0x03, 0xb0, 'X', 0xee, 0xeb, 0xfe}
