package appliance

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// runAppliance runs the uinit on a command line in a file, with the other
// options of o (the image root a new directory unless o.Root is set), never
// powering off; it returns the status and the console output.
func runAppliance(t *testing.T, o Options, cmdline string) (int, string) {
	t.Helper()
	dir := t.TempDir()
	o.Cmdline = filepath.Join(dir, "cmdline")
	if err := os.WriteFile(o.Cmdline, []byte(cmdline+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if o.Root == "" {
		o.Root = dir
	}
	o.Version = "test"
	var out strings.Builder
	o.Out = &out
	code := Run(context.Background(), o)
	return code, out.String()
}

func wantLines(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("console lacks %q:\n%s", w, out)
		}
	}
}

func TestApplianceOutsideImage(t *testing.T) {
	code, out := runAppliance(t, Options{}, `console=ttyS0 understudy.role=test understudy.exec="sh -c 'echo from-the-command; exit 3'" understudy.tap=tap9 understudy.bridge=br9:eth0+tap9,192.0.2.11/24`)
	if code != 3 {
		t.Errorf("exit code %d, want the command's 3", code)
	}
	wantLines(t, out, Tag+"starting: understudy ", Tag+"role test\n",
		Tag+`option exec="sh -c 'echo from-the-command; exit 3'"`, "modules: not loaded: ", "is not the appliance image",
		Tag+"kvm: ", "tap tap9: not created", "bridge br9: not created", Tag+"ready role=test\n",
		Tag+"exec: sh -c 'echo from-the-command; exit 3'", "from-the-command\n",
		Tag+"exec: exit status 3 after ", Tag+"done status=3\n")
}

// TestApplianceThen: understudy.then commands run in order after exec,
// each only if the one before exited 0; the run's status is the last one's.
func TestApplianceThen(t *testing.T) {
	code, out := runAppliance(t, Options{}, `understudy.role=test understudy.exec="sh -c 'echo first'" understudy.then="sh -c 'echo second'" understudy.then="sh -c 'echo third; exit 4'" understudy.then="sh -c 'echo fourth'"`)
	if code != 4 {
		t.Errorf("exit code %d, want the third command's 4", code)
	}
	wantLines(t, out, "first\n", "second\n", "third\n", Tag+"then: 1 more commands not run: the last one failed")
	if strings.Contains(out, "fourth\n") || strings.Index(out, "second\n") > strings.Index(out, "third\n") {
		t.Errorf("commands out of order or run after a failure:\n%s", out)
	}
}

// TestApplianceSignal: understudy.signal sends the command its signal once
// a line of its output contains the text, and not before.
func TestApplianceSignal(t *testing.T) {
	script := `on() { echo got-usr1; kill $!; exit 0; }; trap on USR1; echo not yet; sleep 0.3; echo the marker: now; sleep 20 & wait; echo no signal; exit 1`
	code, out := runAppliance(t, Options{}, `understudy.role=test understudy.signal="USR1:marker: now" understudy.exec="bash -c '`+script+`'"`)
	if code != 0 {
		t.Errorf("exit code %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, "not yet\n", "the marker: now\n", Tag+`signal: sending SIGUSR1 after "marker: now"`, "got-usr1\n")
}

func TestApplianceBadCmdline(t *testing.T) {
	for _, tt := range []struct{ cmdline, want string }{
		{"console=ttyS0", "error: no understudy.role="},
		{`understudy.role="test`, "error: bad kernel command line: the quote at byte 16 is not closed"},
		{"understudy.role=test understudy.exec=/nonexistent/prog", "exec: fork/exec /nonexistent/prog"},
	} {
		code, out := runAppliance(t, Options{}, tt.cmdline)
		if code == 0 || !strings.Contains(out, Tag+tt.want) || !strings.Contains(out, "done status=") {
			t.Errorf("appliance(%q) = %d, %q; want a failure reporting %q", tt.cmdline, code, out, tt.want)
		}
	}
}

func TestApplianceKVM(t *testing.T) {
	kvmtest.Require(t)
	_, out := runAppliance(t, Options{}, "understudy.role=test")
	wantLines(t, out, Tag+"kvm: usable: /dev/kvm API version 12, VM created")
	_, out = runAppliance(t, Options{KVM: filepath.Join(t.TempDir(), "nokvm")}, "understudy.role=test")
	wantLines(t, out, Tag+"kvm: unavailable (module none loaded): ")
}

func TestApplianceProbe(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("pong from the test\nmore\n"))
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	code, out := runAppliance(t, Options{}, "understudy.role=test understudy.exec=\"sleep 0.5\" understudy.probe=tcp:127.0.0.1:"+strconv.Itoa(port))
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	wantLines(t, out, Tag+"probe tcp:127.0.0.1:"+strconv.Itoa(port)+`: answer "pong from the test" after `)

	ln.Close() // nothing listens now: the probe fails, and so does the run
	code, out = runAppliance(t, Options{}, "understudy.role=test understudy.exec=\"sleep 0.5\" understudy.probe=tcp:127.0.0.1:"+strconv.Itoa(port))
	if code == 0 {
		t.Errorf("exit code 0 with a failed probe")
	}
	wantLines(t, out, "no connection before the command ended", Tag+"exec: exit status 0")
}

func TestApplianceTestDiskAndTimeout(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "d.img")
	code, out := runAppliance(t, Options{}, "understudy.role=test understudy.exec=true understudy.testdisk="+disk+":tok-42")
	if code != 0 {
		t.Fatalf("exit code %d:\n%s", code, out)
	}
	b, err := os.ReadFile(disk)
	if err != nil || len(b) != boot.TestDiskSize || !strings.HasPrefix(string(b), "tok-42\n\x00") || !strings.HasPrefix(string(b[512<<10:]), "tok-42@524288\n\x00") {
		t.Errorf("test disk: %d bytes, %v; want 1 MiB with the text at 0 and 512 KiB", len(b), err)
	}
	code, out = runAppliance(t, Options{}, "understudy.role=test understudy.exec=true understudy.testdisk="+disk+":tok-42")
	if code == 0 || !strings.Contains(out, "testdisk: open "+disk+": file exists") {
		t.Errorf("second testdisk on the same path = %d, %q; want file exists", code, out)
	}
	start := time.Now()
	code, out = runAppliance(t, Options{}, `understudy.role=test understudy.exec="sleep 30" understudy.timeout=300ms`)
	// The command was stopped, not waited for: it would sleep 30 s.
	if code == 0 || time.Since(start) >= 30*time.Second {
		t.Errorf("timeout: exit %d after %v; want a failure before the 30 s sleep ends", code, time.Since(start))
	}
	wantLines(t, out, Tag+"exec: stopped after the 300ms timeout")
}

// TestApplianceStdin: with understudy.stdin, the command's stdin gets the
// text once its output shows the prompt, and not before: the command reads
// with a 0.1 s timeout before printing the prompt and must find nothing.
func TestApplianceStdin(t *testing.T) {
	script := `if read -t 0.1 early; then echo too early: $early; exit 1; fi; ` +
		`echo ` + boot.EchoPrompt + ` on /dev/ttyS0; read -r line; echo read: $line`
	code, out := runAppliance(t, Options{}, `understudy.role=test understudy.stdin=hello-42 understudy.exec="bash -c '`+script+`'"`)
	if code != 0 {
		t.Errorf("exit code %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, boot.EchoPrompt+" on /dev/ttyS0\n", Tag+`stdin: writing "hello-42" after the prompt`, "read: hello-42\n")
	// Without the option, stdin is /dev/null: read gets end of file.
	code, out = runAppliance(t, Options{}, `understudy.role=test understudy.exec="bash -c 'read -r line || echo eof'"`)
	if code != 0 || !strings.Contains(out, "eof\n") {
		t.Errorf("without understudy.stdin: %d, %q; want stdin at end of file", code, out)
	}
}

func TestPromptWatcher(t *testing.T) {
	// The watcher marks where it fired with "|" in what it passed on.
	for _, tt := range []struct {
		writes []string
		want   string
	}{
		{[]string{"abc PROMPT def\nmore\n"}, "abc PROMPT def\n|more\n"},
		{[]string{"abc PRO", "MPT def", "\n"}, "abc PROMPT def\n|"},
		{[]string{"P", "R", "O", "M", "P", "T", "\n", "x\n"}, "PROMPT\n|x\n"},
		{[]string{"PROMP", "", "T", " on x\nPROMPT again\n"}, "PROMPT on x\n|PROMPT again\n"},
		{[]string{"\nPROMPT\n"}, "\nPROMPT\n|"},
		{[]string{"PROMPT no newline yet"}, "PROMPT no newline yet"},
		{[]string{"PROMP PROMPX ROMPT\n"}, "PROMP PROMPX ROMPT\n"},
		{[]string{"the other one: RESTO", "RED at last\nx\n"}, "the other one: RESTORED at last\n|x\n"},
		{[]string{"RESTORED PROMPT\n"}, "RESTORED PROMPT\n|"},
	} {
		var out strings.Builder
		w := &promptWatcher{w: &out, prompts: [][]byte{[]byte("PROMPT"), []byte("RESTORED")}}
		w.fire = func() { out.WriteString("|") }
		for _, s := range tt.writes {
			if n, err := w.Write([]byte(s)); n != len(s) || err != nil {
				t.Fatalf("Write(%q) = %d, %v", s, n, err)
			}
		}
		if out.String() != tt.want {
			t.Errorf("writes %q: passed %q, want %q", tt.writes, out.String(), tt.want)
		}
	}
}

// TestApplianceImageModules runs the uinit on an image root with a module
// list and modules.dep: the files are not modules, so the kernel refuses
// them (or has no module support), and the report says so per module; the
// vendor module the CPU cannot use is skipped.
func TestApplianceImageModules(t *testing.T) {
	root := t.TempDir()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	mods := filepath.Join(root, "lib", "modules", unix.ByteSliceToString(u.Release[:]))
	for _, f := range []struct{ name, content string }{
		{Marker, "understudy appliance image\nkernel test\n"},
		{ModuleList, "kvm\nkvm_intel\nkvm_amd\n"},
		{"cpuinfo", "processor\t: 0\nflags\t\t: fpu svm lm\n"},
		{filepath.Join(mods, "modules.dep"), "kernel/kvm.ko:\nkernel/kvm-amd.ko: kernel/kvm.ko\nkernel/kvm-intel.ko: kernel/kvm.ko\n"},
		{filepath.Join(mods, "kernel/kvm.ko"), "not a module"},
		{filepath.Join(mods, "kernel/kvm-amd.ko"), "not a module"},
		{filepath.Join(mods, "kernel/kvm-intel.ko"), "not a module"},
	} {
		p := f.name
		if !filepath.IsAbs(p) {
			p = filepath.Join(root, p)
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f.content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	code, out := runAppliance(t, Options{Root: root, CPUInfo: filepath.Join(root, "cpuinfo"), KVM: filepath.Join(root, "nokvm")}, "understudy.role=test kvm_amd.nested=1")
	if code != 0 {
		t.Errorf("Run = %d, want 0 (module failures are reported, not fatal)", code)
	}
	wantLines(t, out, Tag+"image: kernel test", Tag+"module kvm_intel: skipped: the CPU has no vmx",
		Tag+"module kvm: not loaded: load module ", Tag+"module kvm_amd: not loaded: load module kvm_amd: not tried: it needs kvm",
		Tag+"kvm: unavailable (module none loaded)")
}

// TestApplianceRoleRuns checks that a role runs `understudy ROLE ARGS` with
// the arguments the command line gives, through a stand-in for this binary
// that prints its arguments and exits 7.
func TestApplianceRoleRuns(t *testing.T) {
	dir := t.TempDir()
	self := filepath.Join(dir, "understudy")
	if err := os.WriteFile(self, []byte("#!/bin/sh\necho \"args:$*\"\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, role := range []string{"run", "intermediary", "backup"} {
		o := Options{Root: dir, CPUInfo: filepath.Join(dir, "cpuinfo"), KVM: filepath.Join(dir, "nokvm"), Self: self}
		code, out := runAppliance(t, o, "understudy.role="+role+` understudy.args="--keys /k --name 'node a'"`)
		if code != 7 {
			t.Errorf("role %s: status %d, want the command's 7", role, code)
		}
		wantLines(t, out, Tag+"ready role="+role, Tag+"exec: understudy "+role+" --keys /k --name 'node a'",
			"args:"+role+" --keys /k --name node a\n", Tag+"exec: exit status 7")
	}
}

// TestApplianceWith: understudy.with runs beside exec and the then chain
// (each waits for a file the other makes, so neither could finish alone),
// the role waits for it and takes its failure; when the chain fails, the
// with command is stopped instead of waited for.
func TestApplianceWith(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	wait := func(f string) string {
		return `for i in $(seq 500); do [ -e ` + f + ` ] && break; sleep 0.02; done; [ -e ` + f + ` ]`
	}
	code, out := runAppliance(t, Options{}, `understudy.role=test understudy.with="bash -c 'touch `+a+`; `+wait(b)+` && echo with-done'" understudy.exec="bash -c '`+wait(a)+` && echo exec-done'" understudy.then="bash -c 'touch `+b+`; echo then-done'"`)
	if code != 0 {
		t.Errorf("exit code %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, Tag+"with: bash -c", Tag+"exec: bash -c", "exec-done\n", "then-done\n", "with-done\n", Tag+"with: exit status 0 after ")
	// with-done needs b, which only the then command makes, and exec-done
	// needs a, which only the with command makes: both lines prove the
	// commands ran side by side. Their order on the console proves nothing
	// (each command's output is copied by its own goroutine), but the role's
	// end must follow the with command's.
	if w, d := strings.Index(out, Tag+"with: exit status 0"), strings.Index(out, Tag+"done status=0"); w < 0 || d < w {
		t.Errorf("the role ended before its with command:\n%s", out)
	}

	code, out = runAppliance(t, Options{}, `understudy.role=test understudy.with="bash -c 'exit 5'" understudy.exec=true`)
	if code != 5 {
		t.Errorf("with failing: exit code %d, want its 5:\n%s", code, out)
	}
	start := time.Now()
	code, out = runAppliance(t, Options{}, `understudy.role=test understudy.with="sleep 60" understudy.exec="bash -c 'exit 3'"`)
	if code != 3 || time.Since(start) > 50*time.Second {
		t.Errorf("chain failing: exit code %d after %v, want 3 and the with command stopped:\n%s", code, time.Since(start), out)
	}
	wantLines(t, out, Tag+"with: stopping it: the commands failed")
	if code, out := runAppliance(t, Options{}, `understudy.role=run understudy.with=true`); code != statusUsage || !strings.Contains(out, "with and timeout are for understudy.role=test") {
		t.Errorf("with for role run: %d, %q; want a usage error", code, out)
	}
}

// TestApplianceStdinRestored: a then command (a restore) gets understudy.stdin
// after the restore's line, with no new prompt: the restored guest still
// waits for the line it asked for before its snapshot.
func TestApplianceStdinRestored(t *testing.T) {
	script := `if read -t 0.1 early; then echo too early: $early; exit 1; fi; ` +
		`echo ` + boot.RestoredLine + `/tmp/snap in 5 ms; read -r line; echo read again: $line`
	code, out := runAppliance(t, Options{}, `understudy.role=test understudy.stdin=hello-43 understudy.exec=true understudy.then="bash -c '`+script+`'"`)
	if code != 0 {
		t.Errorf("exit code %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, Tag+`stdin: writing "hello-43" after the prompt`, "read again: hello-43\n")
}

// recordWriter keeps each write.
type recordWriter struct{ writes []string }

func (r *recordWriter) Write(b []byte) (int, error) {
	r.writes = append(r.writes, string(b))
	return len(b), nil
}

// TestLineWriter: whole lines pass in one write each however the writes
// split them; a partial line waits for its end, for Flush, or for
// maxPartial bytes.
func TestLineWriter(t *testing.T) {
	var r recordWriter
	l := &lineWriter{w: &r}
	for _, s := range []string{"ab", "c\nde", "f\ng\nh", "", "i\n", "tail"} {
		if n, err := l.Write([]byte(s)); n != len(s) || err != nil {
			t.Fatalf("Write(%q) = %d, %v", s, n, err)
		}
	}
	want := []string{"abc\n", "def\n", "g\n", "hi\n"}
	if strings.Join(r.writes, "|") != strings.Join(want, "|") {
		t.Errorf("writes %q, want %q", r.writes, want)
	}
	l.Flush()
	if r.writes[len(r.writes)-1] != "tail" {
		t.Errorf("after Flush: %q, want the partial line", r.writes)
	}
	r.writes = nil
	long := strings.Repeat("x", maxPartial)
	l.Write([]byte(long))
	if len(r.writes) != 1 || r.writes[0] != long {
		t.Errorf("a %d-byte line without a newline: writes %d, want it passed on", maxPartial, len(r.writes))
	}
}
