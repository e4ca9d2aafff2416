package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// clusterKeys makes a cluster CA and a key for each role in a new
// directory.
func clusterKeys(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if code, _, errs := runCLI("keys", "init", "--dir", dir); code != 0 {
		t.Fatalf("keys init: %d %s", code, errs)
	}
	for _, n := range []string{"primary", "intermediary", "backup"} {
		if code, _, errs := runCLI("keys", "issue", "--dir", dir, "--name", n, "--role", n); code != 0 {
			t.Fatalf("keys issue %s: %d %s", n, code, errs)
		}
	}
	return dir
}

// waitStderr waits up to 20 s for a role's stderr to contain s.
func waitStderr(t *testing.T, errs *lockedBuffer, s string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(errs.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("stderr lacks %q: %s", s, errs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitMatch waits up to 30 s for a line of a role's output that re
// matches and returns its submatches (the whole line's match first).
func waitMatch(t *testing.T, b *lockedBuffer, re *regexp.Regexp, what string) []string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, l := range strings.Split(b.String(), "\n") {
			if m := re.FindStringSubmatch(l); m != nil {
				return m
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no line matches %s: %s", what, re, b.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRunProtectWaitsForIntermediary: `run --protect` started before the
// intermediary and the backup (nodes booted together) waits for its first
// link, saying so on stderr, and once they listen protects the guest to
// its end; no record is released before that.
func TestRunProtectWaitsForIntermediary(t *testing.T) {
	requireKVM(t)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	records := filepath.Join(t.TempDir(), "seen.txt")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type ended struct{ code int }
	start := func(args ...string) (chan ended, *lockedBuffer) {
		errs := &lockedBuffer{}
		done := make(chan ended, 1)
		go func() { done <- ended{run(ctx, args, &lockedBuffer{}, errs)} }()
		return done, errs
	}
	pdone, perrs := start("run", "--payload", "counter,iterations=3000,report=0", "--mem", "16M", "--protect", iaddr, "--keys", dir,
		"--interval", "10ms", "--redial", "20ms", "--records", records, "--status-interval", "0")
	waitStderr(t, perrs, "understudy: primary: waiting for the intermediary at "+iaddr+" (0s): ")
	bdone, _ := start("backup", "--listen", baddr, "--keys", dir, "--status-interval", "0")
	idone, _ := start("intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0")
	var p ended
	select {
	case p = <-pdone:
	case <-ctx.Done():
		t.Fatalf("run --protect did not end: %s", perrs.String())
	}
	if p.code != 0 || !strings.Contains(perrs.String(), "understudy: primary: reached the intermediary at "+iaddr+" after ") {
		t.Errorf("run --protect = %d, stderr %q; want 0 and the intermediary reached", p.code, perrs.String())
	}
	b, err := os.ReadFile(records)
	if err != nil {
		t.Fatal(err)
	}
	recs := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	for i, r := range recs {
		if r != strconv.Itoa(i+1) {
			t.Fatalf("released record %d is %q, want the guest's sequence from 1", i, r)
		}
	}
	if len(recs) != 3000 {
		t.Errorf("released %d records, want the guest's 3000", len(recs))
	}
	for _, ch := range []chan ended{idone, bdone} {
		select {
		case e := <-ch:
			if e.code != 0 {
				t.Errorf("role exit %d", e.code)
			}
		case <-ctx.Done():
			t.Fatal("a role did not end with protection")
		}
	}
}

// TestRunProtectConnectTimeout: with nothing at --protect, --connect-timeout
// 0 fails at the first attempt with one line, as run --protect always
// did; a short one fails once it has passed, with one line after the
// reports of the wait.
func TestRunProtectConnectTimeout(t *testing.T) {
	requireKVM(t)
	dir := clusterKeys(t)
	addr := freeTCP(t)
	code, _, errs := runCLI("run", "--payload", "counter", "--mem", "16M", "--protect", addr, "--keys", dir, "--connect-timeout", "0")
	if code != exitError || strings.Count(errs, "\n") != 1 || !strings.Contains(errs, "connection refused") || strings.Contains(errs, "waiting for") {
		t.Errorf("--connect-timeout 0: exit %d, stderr %q; want %d and one line: connection refused", code, errs, exitError)
	}
	code, _, errs = runCLI("run", "--payload", "counter", "--mem", "16M", "--protect", addr, "--keys", dir, "--connect-timeout", "300ms", "--redial", "20ms")
	lines := strings.Split(strings.TrimSuffix(errs, "\n"), "\n")
	last := lines[len(lines)-1]
	if code != exitError || !strings.HasPrefix(lines[0], "understudy: primary: waiting for the intermediary at "+addr+" (0s): ") ||
		!strings.HasPrefix(last, "understudy: no link to the intermediary at "+addr+" after waiting 300ms: ") || !strings.Contains(last, "connection refused") {
		t.Errorf("--connect-timeout 300ms: exit %d, stderr %q; want %d, the wait reported, and its end", code, errs, exitError)
	}
}

// TestRunProtectConnectTimeoutBadInput: the flag's own refusals.
func TestRunProtectConnectTimeoutBadInput(t *testing.T) {
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeUpPowerOff), 0o644)
	for _, tc := range []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"run", "--payload", "hello", "--protect", "tcp://127.0.0.1:1", "--connect-timeout", "-1s"}, exitError, "--connect-timeout -1s: must not be negative"},
		{[]string{"run", "--payload", "hello", "--connect-timeout", "soon"}, exitUsage, `invalid value "soon" for flag -connect-timeout`},
		{[]string{"run", "--kernel", k, "--connect-timeout", "5s"}, exitUsage, "--connect-timeout with --kernel needs --protect"},
	} {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
	}
	if code, out, errs := runCLI("run", "--help"); code != 0 || !strings.Contains(out+errs, "-connect-timeout") {
		t.Errorf("run --help lacks --connect-timeout")
	}
}
