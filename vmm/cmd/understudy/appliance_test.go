package main

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

func applianceParams(t testing.TB, s string) boot.Params {
	t.Helper()
	ps, err := boot.ParseCmdline(s)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func TestParseApplianceConfig(t *testing.T) {
	c, err := parseApplianceConfig(applianceParams(t, `console=ttyS0 quiet understudy.role=test `+
		`understudy.exec="understudy run --kernel /boot/vmlinuz --cmdline 'console=ttyS0 guest.mode=net'" `+
		`understudy.tap=tap0,192.0.2.1/24 understudy.tap=tap1 understudy.probe=tcp:192.0.2.2:7777 `+
		`understudy.testdisk=/tmp/d.img:tok-1 understudy.timeout=90s understudy.modules=kvm,kvm-amd understudy.stdin=line-1`))
	if err != nil {
		t.Fatal(err)
	}
	want := applianceConfig{
		role:     "test",
		args:     []string{"understudy", "run", "--kernel", "/boot/vmlinuz", "--cmdline", "console=ttyS0 guest.mode=net"},
		modules:  []string{"kvm", "kvm_amd"},
		taps:     []tapSpec{{"tap0", netip.MustParsePrefix("192.0.2.1/24")}, {name: "tap1"}},
		probe:    netip.MustParseAddrPort("192.0.2.2:7777"),
		testDisk: &testDisk{"/tmp/d.img", "tok-1"},
		stdin:    "line-1",
		timeout:  90 * time.Second,
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("parseApplianceConfig = %+v, want %+v", c, want)
	}
	c, err = parseApplianceConfig(applianceParams(t, `understudy.role=backup understudy.args="--keys /k --listen tcp://0.0.0.0:7000" understudy.modules=none`))
	if err != nil || c.role != "backup" || len(c.args) != 4 || !c.noMods || c.timeout != 10*time.Minute {
		t.Errorf("parseApplianceConfig(backup) = %+v, %v", c, err)
	}
}

func TestParseApplianceConfigErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"console=ttyS0", "no understudy.role"},
		{"understudy.role=primary", "want run, intermediary, backup or test"},
		{"understudy.role=run understudy.role=run", "given twice"},
		{"understudy.role", "needs a value"},
		{`understudy.role="  "`, "needs a value"},
		{"understudy.role=test understudy.colour=red", "unknown option understudy.colour"},
		{"understudy.role=test understudy.args=x", "takes understudy.exec="},
		{"understudy.role=run understudy.exec=x", "is for understudy.role=test"},
		{"understudy.role=run understudy.probe=tcp:192.0.2.2:1", "are for understudy.role=test"},
		{"understudy.role=test understudy.probe=tcp:192.0.2.2:1", "need a command"},
		{`understudy.role=test understudy.exec="a 'b"`, "single quote is not closed"},
		{"understudy.role=test understudy.timeout=-1s", "want a duration"},
		{"understudy.role=test understudy.timeout=25h", "want a duration"},
		{"understudy.role=test understudy.timeout=soon", "want a duration"},
		{"understudy.role=test understudy.modules=kvm,,tun", "not a module name"},
		{"understudy.role=test understudy.modules=../x", "not a module name"},
		{"understudy.role=test understudy.tap=a/b", "bad network interface name"},
		{"understudy.role=test understudy.tap=tap0,192.0.2.1", "want NAME,A.B.C.D/N"},
		{"understudy.role=test understudy.tap=tap0,2001:db8::1/64", "want NAME,A.B.C.D/N"},
		{"understudy.role=test understudy.tap=tap0 understudy.tap=tap0", "tap0 given twice"},
		{"understudy.role=test understudy.tap=a understudy.tap=b understudy.tap=c understudy.tap=d understudy.tap=e understudy.tap=f understudy.tap=g understudy.tap=h understudy.tap=i", "more than 8"},
		{"understudy.role=test understudy.exec=x understudy.probe=192.0.2.2:1", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.probe=tcp:192.0.2.2:0", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.probe=tcp:host:80", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=rel/d.img:t", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/../d:t", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/d:a/b", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/d", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.stdin=a/b", "want TEXT of 1..64"},
		{"understudy.role=test understudy.stdin=abc", "need a command"},
		{"understudy.role=run understudy.stdin=abc", "are for understudy.role=test"},
	} {
		_, err := parseApplianceConfig(applianceParams(t, tt.in))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseApplianceConfig(%q) = %v, want an error containing %q", tt.in, err, tt.want)
		}
	}
}

func TestSplitArgs(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  a  b\tc ", []string{"a", "b", "c"}},
		{"run --cmdline 'console=ttyS0 quiet' x", []string{"run", "--cmdline", "console=ttyS0 quiet", "x"}},
		{"a''b ''", []string{"ab", ""}},
		{"x'y z'w", []string{"xy zw"}},
	} {
		got, err := splitArgs(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("splitArgs(%q) = %q, %v, want %q", tt.in, got, err, tt.want)
		}
	}
	if _, err := splitArgs(strings.Repeat("a ", maxArgs+1)); err == nil {
		t.Errorf("splitArgs(%d words) = nil error", maxArgs+1)
	}
}

func FuzzSplitArgs(f *testing.F) {
	for _, s := range []string{"run --cmdline 'a b'", "'", "a''b", " \t "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		args, err := splitArgs(s)
		if err != nil {
			return
		}
		if len(args) > maxArgs {
			t.Fatalf("splitArgs(%q) gave %d words", s, len(args))
		}
		// Quoting every word and splitting again gives the same words.
		var q []string
		for _, a := range args {
			if strings.Contains(a, "'") {
				return
			}
			q = append(q, "'"+a+"'")
		}
		back, err := splitArgs(strings.Join(q, " "))
		if err != nil || (len(args) > 0 && !reflect.DeepEqual(back, args)) {
			t.Fatalf("splitArgs round trip of %q: %q, %v", args, back, err)
		}
	})
}

func FuzzParseApplianceConfig(f *testing.F) {
	for _, s := range []string{
		"understudy.role=test",
		`understudy.role=test understudy.exec="understudy run --cmdline 'a b'" understudy.probe=tcp:192.0.2.2:7777 understudy.tap=tap0,192.0.2.1/24`,
		"understudy.role=run understudy.args=--help understudy.modules=kvm,tun",
		"understudy.role=test understudy.exec=true understudy.testdisk=/tmp/x:t understudy.timeout=1s",
		"understudy.role=backup understudy.modules=none",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := boot.ParseCmdline(s)
		if err != nil {
			return
		}
		c, err := parseApplianceConfig(ps)
		if err != nil {
			return
		}
		switch c.role {
		case "run", "intermediary", "backup", "test":
		default:
			t.Fatalf("accepted role %q", c.role)
		}
		if c.timeout <= 0 || c.timeout > maxTimeout || len(c.taps) > maxTaps || len(c.args) > maxArgs {
			t.Fatalf("accepted %+v", c)
		}
		for _, tp := range c.taps {
			if boot.CheckIfName(tp.name) != nil {
				t.Fatalf("accepted tap name %q", tp.name)
			}
		}
		for _, m := range c.modules {
			if !validModName(m) {
				t.Fatalf("accepted module %q", m)
			}
		}
		if d := c.testDisk; d != nil && (!filepath.IsAbs(d.path) || filepath.Clean(d.path) != d.path || !validToken(d.text)) {
			t.Fatalf("accepted test disk %+v", d)
		}
		if c.stdin != "" && !validToken(c.stdin) {
			t.Fatalf("accepted stdin %q", c.stdin)
		}
	})
}

// runAppliance runs `understudy appliance` on a command line in a file,
// with root as the image root and cpuinfo flags as given, never powering
// off; it returns the exit code and the console output.
func runAppliance(t *testing.T, root, cmdline string, extra ...string) (int, string) {
	t.Helper()
	dir := t.TempDir()
	cl := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cl, []byte(cmdline+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if root == "" {
		root = dir
	}
	args := append([]string{"appliance", "--cmdline", cl, "--root", root, "--poweroff=false"}, extra...)
	code, out, errs := runCLI(args...)
	if errs != "" {
		t.Errorf("stderr: %q", errs)
	}
	return code, out
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
	code, out := runAppliance(t, "", `console=ttyS0 understudy.role=test understudy.exec="sh -c 'echo from-the-command; exit 3'" understudy.tap=tap9`)
	if code != 3 {
		t.Errorf("exit code %d, want the command's 3", code)
	}
	wantLines(t, out, applianceTag+"starting: understudy ", applianceTag+"role test\n",
		applianceTag+`option exec="sh -c 'echo from-the-command; exit 3'"`, "modules: not loaded: ", "is not the appliance image",
		applianceTag+"kvm: ", "tap tap9: not created", applianceTag+"ready role=test\n",
		applianceTag+"exec: sh -c 'echo from-the-command; exit 3'", "from-the-command\n",
		applianceTag+"exec: exit status 3 after ", applianceTag+"done status=3\n")
}

func TestApplianceBadCmdline(t *testing.T) {
	for _, tt := range []struct{ cmdline, want string }{
		{"console=ttyS0", "error: no understudy.role="},
		{`understudy.role="test`, "error: bad kernel command line: the quote at byte 16 is not closed"},
		{"understudy.role=test understudy.exec=/nonexistent/prog", "exec: fork/exec /nonexistent/prog"},
	} {
		code, out := runAppliance(t, "", tt.cmdline)
		if code == 0 || !strings.Contains(out, applianceTag+tt.want) || !strings.Contains(out, "done status=") {
			t.Errorf("appliance(%q) = %d, %q; want a failure reporting %q", tt.cmdline, code, out, tt.want)
		}
	}
}

func TestApplianceKVM(t *testing.T) {
	requireKVM(t)
	_, out := runAppliance(t, "", "understudy.role=test")
	wantLines(t, out, applianceTag+"kvm: usable: /dev/kvm API version 12, VM created")
	_, out = runAppliance(t, "", "understudy.role=test", "--kvm", filepath.Join(t.TempDir(), "nokvm"))
	wantLines(t, out, applianceTag+"kvm: unavailable (module none loaded): ")
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
	code, out := runAppliance(t, "", "understudy.role=test understudy.exec=\"sleep 0.5\" understudy.probe=tcp:127.0.0.1:"+strconv.Itoa(port))
	if code != 0 {
		t.Errorf("exit code %d, want 0", code)
	}
	wantLines(t, out, applianceTag+"probe tcp:127.0.0.1:"+strconv.Itoa(port)+`: answer "pong from the test" after `)

	ln.Close() // nothing listens now: the probe fails, and so does the run
	code, out = runAppliance(t, "", "understudy.role=test understudy.exec=\"sleep 0.5\" understudy.probe=tcp:127.0.0.1:"+strconv.Itoa(port))
	if code == 0 {
		t.Errorf("exit code 0 with a failed probe")
	}
	wantLines(t, out, "no connection before the command ended", applianceTag+"exec: exit status 0")
}

func TestApplianceTestDiskAndTimeout(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "d.img")
	code, out := runAppliance(t, "", "understudy.role=test understudy.exec=true understudy.testdisk="+disk+":tok-42")
	if code != 0 {
		t.Fatalf("exit code %d:\n%s", code, out)
	}
	b, err := os.ReadFile(disk)
	if err != nil || len(b) != testDiskSize || !strings.HasPrefix(string(b), "tok-42\n\x00") || !strings.HasPrefix(string(b[512<<10:]), "tok-42@524288\n\x00") {
		t.Errorf("test disk: %d bytes, %v; want 1 MiB with the text at 0 and 512 KiB", len(b), err)
	}
	code, out = runAppliance(t, "", "understudy.role=test understudy.exec=true understudy.testdisk="+disk+":tok-42")
	if code == 0 || !strings.Contains(out, "testdisk: open "+disk+": file exists") {
		t.Errorf("second testdisk on the same path = %d, %q; want file exists", code, out)
	}
	start := time.Now()
	code, out = runAppliance(t, "", `understudy.role=test understudy.exec="sleep 30" understudy.timeout=300ms`)
	if code == 0 || time.Since(start) > 10*time.Second {
		t.Errorf("timeout: exit %d after %v", code, time.Since(start))
	}
	wantLines(t, out, applianceTag+"exec: stopped after the 300ms timeout")
}

// TestApplianceStdin: with understudy.stdin, the command's stdin gets the
// text once its output shows the prompt, and not before: the command reads
// with a 0.1 s timeout before printing the prompt and must find nothing.
func TestApplianceStdin(t *testing.T) {
	script := `if read -t 0.1 early; then echo too early: $early; exit 1; fi; ` +
		`echo ` + stdinPrompt + ` on /dev/ttyS0; read -r line; echo read: $line`
	code, out := runAppliance(t, "", `understudy.role=test understudy.stdin=hello-42 understudy.exec="bash -c '`+script+`'"`)
	if code != 0 {
		t.Errorf("exit code %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, stdinPrompt+" on /dev/ttyS0\n", applianceTag+`stdin: writing "hello-42" after the prompt`, "read: hello-42\n")
	// Without the option, stdin is /dev/null: read gets end of file.
	code, out = runAppliance(t, "", `understudy.role=test understudy.exec="bash -c 'read -r line || echo eof'"`)
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
	} {
		var out strings.Builder
		w := &promptWatcher{w: &out, prompt: []byte("PROMPT")}
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
		{imageMarker, "understudy appliance image\nkernel test\n"},
		{imageModuleList, "kvm\nkvm_intel\nkvm_amd\n"},
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
	var out strings.Builder
	a := appliance{out: &lockedWriter{w: &out}, cmdline: filepath.Join(root, "cmdline"), root: root, cpuinfo: filepath.Join(root, "cpuinfo"), kvmDev: filepath.Join(root, "nokvm")}
	if err := os.WriteFile(a.cmdline, []byte("understudy.role=test kvm_amd.nested=1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code := a.run(context.Background()); code != 0 {
		t.Errorf("run = %d, want 0 (module failures are reported, not fatal)", code)
	}
	wantLines(t, out.String(), applianceTag+"image: kernel test", applianceTag+"module kvm_intel: skipped: the CPU has no vmx",
		applianceTag+"module kvm: not loaded: load module ", applianceTag+"module kvm_amd: not loaded: load module kvm_amd: not tried: it needs kvm",
		applianceTag+"kvm: unavailable (module none loaded)")
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
		var out strings.Builder
		a := appliance{out: &lockedWriter{w: &out}, cmdline: filepath.Join(dir, "cmdline"), root: dir, cpuinfo: filepath.Join(dir, "cpuinfo"),
			kvmDev: filepath.Join(dir, "nokvm"), self: self}
		cl := "understudy.role=" + role + ` understudy.args="--keys /k --name 'node a'"`
		if err := os.WriteFile(a.cmdline, []byte(cl), 0o644); err != nil {
			t.Fatal(err)
		}
		if code := a.run(context.Background()); code != 7 {
			t.Errorf("role %s: status %d, want the command's 7", role, code)
		}
		wantLines(t, out.String(), applianceTag+"ready role="+role, applianceTag+"exec: understudy "+role+" --keys /k --name 'node a'",
			"args:"+role+" --keys /k --name node a\n", applianceTag+"exec: exit status 7")
	}
}
