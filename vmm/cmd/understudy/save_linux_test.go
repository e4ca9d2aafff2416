package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/linuxtest"
)

// codeWaitInput prints "up\n" on COM1, waits for a byte on COM1, echoes it
// and powers off: saved while it waits, a restored guest ends once its
// console input brings the byte.
var codeWaitInput = []byte{
	0x66, 0xba, 0xf8, 0x03, 0xb0, 'u', 0xee, 0xb0, 'p', 0xee, 0xb0, '\n', 0xee, // mov dx, COM1; "up\n"
	0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, // poll: mov dx, LSR; in al, dx; test al, 1; jz poll
	0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, // mov dx, COM1; in al, dx; out dx, al
	0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xf4, 0xeb, 0xfd, // power off
}

// runCLIInput runs understudy in a fresh process with stdin as its input.
func runCLIInput(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	a, err := json.Marshal(args)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), cliChildEnv+"="+string(a))
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("running understudy %q: %v", args, err)
	}
	return code, out.String(), errb.String()
}

// checkRestores restores snap with disk and feeds the guest a byte: it
// must echo it and power off. A disk of another size or content is refused
// in one line.
func checkRestores(t *testing.T, snap, disk string) {
	t.Helper()
	code, out, errs := runCLIInput(t, "x", "restore", "--snapshot", snap, "--disk", disk)
	if code != 0 || out != "x" || !strings.Contains(errs, "guest powered off") {
		t.Errorf("restore = %d, stdout %q, stderr %q; want 0, the echoed \"x\", powered off", code, out, errs)
	}
	restored := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(restoredLine+snap) + ` in \d+ ms \(64 MiB of memory, state [1-9]\d* KiB, 1 disks, 0 nets\); the guest runs$`)
	if !restored.MatchString(errs) {
		t.Errorf("restore's stderr %q: no line matching %v", errs, restored)
	}
	dir := t.TempDir()
	img, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	short := writeFile(t, dir, "short.img", img[:len(img)/2], 0o644)
	other := bytes.Clone(img)
	other[100] ^= 1
	otherPath := writeFile(t, dir, "other.img", other, 0o644)
	for _, c := range []struct{ disk, want string }{
		{short, "bytes"}, {otherPath, "fingerprint"}, {filepath.Join(dir, "none.img"), "no such file"},
	} {
		code, out, errs := runCLIInput(t, "x", "restore", "--snapshot", snap, "--disk", c.disk)
		if code != exitError || out != "" || !strings.Contains(errs, c.want) || strings.Count(errs, "\n") != 1 {
			t.Errorf("restore with disk %s = %d, stdout %q, stderr %q; want exit %d and one line with %q", c.disk, code, out, errs, exitError, c.want)
		}
	}
	if code, _, errs := runCLIInput(t, "", "restore", "--snapshot", snap); code != exitError || !strings.Contains(errs, "0 disks") {
		t.Errorf("restore without --disk = %d, %q; want a refusal", code, errs)
	}
}

// TestRunLinuxSaveAfterOutput saves a Linux guest once its console printed
// a marker; `restore` continues it with the disk given again.
func TestRunLinuxSaveAfterOutput(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeWaitInput), 0o644)
	disk := writeFile(t, dir, "disk.img", bytes.Repeat([]byte("disk"), 1<<18), 0o644)
	snap := filepath.Join(dir, "snap")
	code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--disk", disk, "--save", snap, "--save-after-output", "up\n")
	if code != 0 || out != "up\n" || !strings.Contains(errs, "saved a snapshot") || !strings.Contains(errs, `console output "up\n"`) || strings.Count(errs, "\n") != 1 {
		t.Fatalf("run --save-after-output = %d, stdout %q, stderr %q; want 0, \"up\\n\", one line saying it saved", code, out, errs)
	}
	figures := regexp.MustCompile(`to ` + regexp.QuoteMeta(snap) + ` \(64\.0 MiB, state [1-9]\d* KiB; paused in \d+\.\d ms, written in \d+ ms\)`)
	if !figures.MatchString(errs) {
		t.Errorf("the save line %q does not match %v", errs, figures)
	}
	if _, err := os.Stat(snap + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temporary file left behind: %v", err)
	}
	checkRestores(t, snap, disk)
	if code, _, errs := runCLI("restore", "--snapshot", snap, "--disk", disk, "--records", "-"); code != exitUsage {
		t.Errorf("restore of a Linux snapshot with --records = %d, %q; want a usage error", code, errs)
	} else {
		checkUsageError(t, "restore", nil, errs)
	}
}

// TestRunLinuxSaveLargePages: --save combines with --large-pages for a
// Linux guest. The controller (which pauses and resumes the guest to sample
// it) stops before the save pauses the guest, printing its last status
// first, and the snapshot restores, with its regions mapped large at the
// save (policy=all) or sampled (budget=2).
func TestRunLinuxSaveLargePages(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeWaitInput), 0o644)
	disk := writeFile(t, dir, "disk.img", bytes.Repeat([]byte("disk"), 1<<18), 0o644)
	for i, spec := range []string{"policy=all", "budget=2,period=20ms"} {
		snap := filepath.Join(dir, fmt.Sprintf("snap%d", i))
		code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--disk", disk, "--large-pages", spec, "--save", snap, "--save-after-output", "up\n")
		status, saved := strings.Index(errs, "understudy: large-pages: "), strings.Index(errs, "understudy: saved a snapshot")
		if code != 0 || out != "up\n" || status < 0 || saved < status {
			t.Fatalf("run --large-pages %s --save = %d, stdout %q, stderr %q; want 0, \"up\\n\", the controller's last status, then the save", spec, code, out, errs)
		}
		checkRestores(t, snap, disk)
	}
}

// TestRunLinuxSaveOnSignal saves a Linux guest on SIGUSR1, the default
// trigger of --save with --kernel.
func TestRunLinuxSaveOnSignal(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeWaitInput), 0o644)
	disk := writeFile(t, dir, "disk.img", bytes.Repeat([]byte("sig!"), 1<<18), 0o644)
	snap := filepath.Join(dir, "snap")
	a, _ := json.Marshal([]string{"run", "--kernel", k, "--mem", "64M", "--disk", disk, "--save", snap})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), cliChildEnv+"="+string(a))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The handler is in place before the guest runs, so before "up".
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "up\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("guest output %q, %v; want \"up\\n\"", line, err)
	}
	if err := cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	select {
	case err := <-waited:
		if err != nil || !strings.Contains(errb.String(), "saved a snapshot") || !strings.Contains(errb.String(), "SIGUSR1") {
			t.Fatalf("run --save with SIGUSR1: %v, stderr %q; want exit 0 and the saved line", err, errb.String())
		}
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("run --save did not end after SIGUSR1; stderr %q", errb.String())
	}
	checkRestores(t, snap, disk)
}

// TestRunLinuxSaveUsage: bad combinations of the save flags are one-line
// usage errors.
func TestRunLinuxSaveUsage(t *testing.T) {
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeWaitInput), 0o644)
	snap := filepath.Join(dir, "snap")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--kernel", k, "--save-on-signal", "USR1"}, "need --save"},
		{[]string{"run", "--kernel", k, "--save-after-output", "up"}, "need --save"},
		{[]string{"run", "--kernel", k, "--save", snap, "--save-on-signal", "TERM"}, "USR1, USR2 or HUP"},
		{[]string{"run", "--kernel", k, "--save", snap, "--save-after-output", ""}, "non-empty"},
		{[]string{"run", "--kernel", k, "--save", snap, "--save-after", "3"}, "--save-after cannot be combined with --kernel"},
		{[]string{"run", "--payload", "hello", "--save-on-signal", "USR1"}, "--save-on-signal needs --kernel"},
		{[]string{"run", "--payload", "hello", "--save-after-output", "x"}, "--save-after-output needs --kernel"},
	} {
		code, _, errs := runCLI(c.args...)
		if code != exitUsage || !strings.Contains(errs, c.want) {
			t.Errorf("understudy %q = %d, %q; want a usage error with %q", c.args, code, errs, c.want)
			continue
		}
		checkUsageError(t, "run", c.args, errs)
	}
	if code, _, errs := runCLI("run", "--kernel", k, "--save", filepath.Join(dir, "no", "snap")); code != exitError || !strings.Contains(errs, "no directory") {
		t.Errorf("--save into a missing directory = %d, %q", code, errs)
	}
}

// makeTap creates a tap device that is up, deleted when the test ends
// (linuxtest.MakeTap).
func makeTap(t *testing.T) string { return linuxtest.MakeTap(t, "ucl") }

// TestRunLinuxSaveNet saves a Linux guest with a NIC: `restore` takes the
// tap again and the MAC from the snapshot, and refuses another MAC. The
// marker is the whole line: saved after "up" alone, the guest may still
// have its newline to print, and prints it after the restore.
func TestRunLinuxSaveNet(t *testing.T) {
	requireKVM(t)
	tap := makeTap(t)
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeWaitInput), 0o644)
	snap := filepath.Join(dir, "snap")
	code, _, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--net", "tap="+tap+",mac=02:00:00:00:00:07", "--save", snap, "--save-after-output", "up\n")
	if code != 0 || !strings.Contains(errs, "saved a snapshot") {
		t.Fatalf("run --save with a NIC = %d, %q", code, errs)
	}
	code, out, errs := runCLIInput(t, "", "restore", "--snapshot", snap, "--net", "tap="+tap+",mac=02:00:00:00:00:08")
	if code != exitError || out != "" || !strings.Contains(errs, "MAC 02:00:00:00:00:08 given, the state's is 02:00:00:00:00:07") || strings.Count(errs, "\n") != 1 {
		t.Errorf("restore with another MAC = %d, %q, %q; want one line refusing it", code, out, errs)
	}
	code, out, errs = runCLIInput(t, "x", "restore", "--snapshot", snap, "--net", "tap="+tap)
	if code != 0 || out != "x" {
		t.Errorf("restore with the tap = %d, stdout %q, stderr %q; want 0 and the echo", code, out, errs)
	}
}

// TestLineEnds: a console left mid-line gets its newline on stderr, once;
// stdout keeps the guest's bytes.
func TestLineEnds(t *testing.T) {
	var out, errb strings.Builder
	l := &lineEnds{w: &out, stderr: &errb}
	l.finish()
	l.Write([]byte("line\n"))
	l.finish()
	if errb.String() != "" {
		t.Errorf("after whole lines: stderr %q, want nothing", errb.String())
	}
	l.Write([]byte("records=100"))
	l.finish()
	l.finish()
	if out.String() != "line\nrecords=100" || errb.String() != "\n" {
		t.Errorf("stdout %q, stderr %q; want the bytes as written and one newline on stderr", out.String(), errb.String())
	}
}
