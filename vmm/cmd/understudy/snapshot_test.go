package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cliChildEnv makes the re-executed test binary run the command line it
// holds (JSON) as the understudy binary would, instead of running tests.
const cliChildEnv = "UNDERSTUDY_TEST_CLI_ARGS"

func TestMain(m *testing.M) {
	if a := os.Getenv(cliChildEnv); a != "" {
		var args []string
		if err := json.Unmarshal([]byte(a), &args); err != nil {
			os.Stderr.WriteString("bad " + cliChildEnv + ": " + err.Error() + "\n")
			os.Exit(100)
		}
		os.Exit(run(context.Background(), args, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// runCLIProcess runs the understudy command line args in a fresh process.
func runCLIProcess(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	a, err := json.Marshal(args)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), cliChildEnv+"="+string(a))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("running understudy %q in a new process: %v", args, err)
	}
	return code, out.String(), errb.String()
}

// readRecords reads a --records file.
func readRecords(t *testing.T, path string) []uint64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var recs []uint64
	for _, f := range strings.Fields(string(b)) {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		recs = append(recs, v)
	}
	return recs
}

// checkSequence checks that recs is exactly first..last.
func checkSequence(t *testing.T, what string, recs []uint64, first, last uint64) {
	t.Helper()
	if uint64(len(recs)) != last-first+1 {
		t.Errorf("%s: %d records, want %d..%d", what, len(recs), first, last)
		return
	}
	for i, v := range recs {
		if v != first+uint64(i) {
			t.Errorf("%s: record %d is %d, want %d (a gap or a repeat)", what, i, v, first+uint64(i))
			return
		}
	}
}

func TestSaveRestoreUsage(t *testing.T) {
	dir := t.TempDir()
	foreign := filepath.Join(dir, "foreign")
	if err := os.WriteFile(foreign, []byte("#!/bin/sh\necho not a snapshot\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(dir, "s.snap")
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"run", "--payload", "counter", "--save", snap}, exitUsage, "--save FILE and --save-after N (N > 0) go together"},
		{[]string{"run", "--payload", "counter", "--save-after", "10"}, exitUsage, "go together"},
		{[]string{"run", "--payload", "counter", "--save", snap, "--save-after", "10", "--large-pages", "budget=1"}, exitUsage, "cannot be combined with --large-pages"},
		{[]string{"run", "--payload", "counter", "--save", snap, "--save-after", "-1"}, exitUsage, "invalid value"},
		{[]string{"run", "--payload", "counter", "--save", filepath.Join(dir, "no", "s.snap"), "--save-after", "10"}, exitError, "no directory " + filepath.Join(dir, "no") + " to save into"},
		{[]string{"restore"}, exitUsage, "--snapshot is required"},
		{[]string{"restore", "--snapshot", snap, "extra"}, exitUsage, `unexpected argument "extra"`},
		{[]string{"restore", "--snapshot", filepath.Join(dir, "none")}, exitError, "no such file"},
		{[]string{"restore", "--snapshot", foreign}, exitError, foreign + `: bad snapshot: not an Understudy snapshot (starts with "#!/bin/s")`},
		{[]string{"restore", "--snapshot", empty}, exitError, "bad snapshot: empty"},
		{[]string{"restore", "--snapshot", dir}, exitError, "is a directory"},
		{[]string{"restore", "--snapshot", foreign, "--backing", "disk"}, exitError, "want anon or memfd"},
	}
	for _, tc := range tests {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
		if tc.code == exitError && strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("understudy %q: stderr has several lines: %q", tc.args, errs)
		}
	}
	if code, _, errs := runCLI("restore", "--help"); code != 0 || !strings.Contains(errs, "Usage: understudy restore --snapshot FILE") {
		t.Errorf("understudy restore --help = %d, %q; want 0 and the usage", code, errs)
	}
	if _, err := os.Stat(snap); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused command created %s", snap)
	}
}

// TestSaveAndRestore saves a two-vCPU counter guest after 7000 records with
// `run --save`, restores it with `restore` in a fresh process, and checks
// that the records continue at 7001 without a gap or repeat and the guest
// exits 0. Corrupt and truncated copies of the snapshot give one error line.
func TestSaveAndRestore(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	snap := filepath.Join(dir, "counter.snap")
	recs1 := filepath.Join(dir, "before.txt")
	guest := "counter,pages=64,hot=8,cold_every=3,iterations=20000,report=5000"
	code, out, errs := runCLI("run", "--payload", guest, "--cpus", "2", "--mem", "8M", "--records", recs1, "--save", snap, "--save-after", "7000")
	if code != 0 || !strings.Contains(errs, "saved a snapshot after 7000 output records to "+snap) {
		t.Fatalf("run --save = %d, %q; want 0 and where it saved", code, errs)
	}
	if out != "counter: iteration 5000\n" {
		t.Errorf("run --save printed %q, want the guest's console up to record 7000", out)
	}
	checkSequence(t, "records before the snapshot", readRecords(t, recs1), 1, 7000)
	if _, err := os.Stat(snap + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s.tmp left behind: %v", snap, err)
	}

	// A payload machine has no disks or network interfaces.
	if code, _, errs := runCLI("restore", "--snapshot", snap, "--disk", snap); code != exitUsage || !strings.Contains(errs, "payload guest") {
		t.Errorf("restore of a payload snapshot with --disk = %d, %q; want a usage error", code, errs)
	}

	recs2 := filepath.Join(dir, "after.txt")
	code, out, errs = runCLIProcess(t, "restore", "--snapshot", snap, "--records", recs2)
	if code != 0 {
		t.Fatalf("restore in a new process = %d, %q", code, errs)
	}
	if want := "counter: iteration 10000\ncounter: iteration 15000\ncounter: iteration 20000\ncounter: done after 20000\n"; out != want {
		t.Errorf("restored guest printed %q, want %q", out, want)
	}
	if !strings.Contains(errs, "guest exited with code 0") || !strings.Contains(errs, "(20000 output records, 13000 since the snapshot)") {
		t.Errorf("restore summary %q lacks the exit code or the record counts", errs)
	}
	checkSequence(t, "records after the restore", readRecords(t, recs2), 7001, 20000)

	// Damaged snapshots.
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"truncated header", b[:30], "truncated: header is 30 of 40 bytes"},
		{"truncated state", b[:2000], "truncated: machine state"},
		{"truncated memory", b[:len(b)/2], "truncated: memory image"},
		{"corrupt state", flipByte(b, 100), "corrupt machine state"},
		{"corrupt memory", flipByte(b, len(b)-4<<20), "corrupt memory image"},
	} {
		path := filepath.Join(dir, "damaged")
		if err := os.WriteFile(path, tc.data, 0o644); err != nil {
			t.Fatal(err)
		}
		code, out, errs := runCLI("restore", "--snapshot", path, "--quiet")
		if code != exitError || !strings.Contains(errs, path+": ") || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 || out != "" {
			t.Errorf("%s: restore = %d, stdout %q, stderr %q; want exit 1 and one line with %q", tc.name, code, out, errs, tc.want)
		}
	}

	// A guest that ends before the record to save after.
	code, _, errs = runCLI("run", "--payload", "counter,iterations=10,report=0", "--mem", "4M", "--save", snap, "--save-after", "11")
	if code != exitError || !strings.Contains(errs, "after 10 output records, before --save-after 11: no snapshot saved") {
		t.Errorf("run --save-after past the end = %d, %q; want exit 1 and no snapshot", code, errs)
	}
}

func flipByte(b []byte, off int) []byte {
	c := bytes.Clone(b)
	c[off] ^= 0x01
	return c
}
