package main

import (
	"bytes"
	"encoding/binary"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// testKernel builds the stand-in bzImage whose 64-bit entry runs code.
func testKernel(code []byte) []byte { return linuxtest.Kernel(code, 0x100000) }

var (
	// Print "up\n" on COM1, then power off through ACPI (PM1a control,
	// SLP_TYP 5 | SLP_EN), then halt.
	codeUpPowerOff = []byte{
		0x66, 0xba, 0xf8, 0x03, 0xb0, 'u', 0xee, 0xb0, 'p', 0xee, 0xb0, '\n', 0xee,
		0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef, 0xf4, 0xeb, 0xfd,
	}
	// Reset through the keyboard controller.
	codeReboot = []byte{0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd}
	// Print "bye\n", then cli; hlt forever, as Linux's halt ends.
	codeHalt = []byte{0x66, 0xba, 0xf8, 0x03, 0xb0, 'b', 0xee, 0xb0, 'y', 0xee, 0xb0, 'e', 0xee, 0xb0, '\n', 0xee, 0xfa, 0xf4, 0xeb, 0xfd}
)

func writeFile(t *testing.T, dir, name string, b []byte, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRunLinuxPowerOff(t *testing.T) {
	requireKVM(t)
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeUpPowerOff), 0o644)
	code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--cpus", "2")
	if code != 0 || out != "up\n" || !strings.Contains(errs, "guest powered off") || !strings.Contains(errs, "S5") {
		t.Errorf("run --kernel = %d, stdout %q, stderr %q; want 0, \"up\\n\", powered off", code, out, errs)
	}
}

// TestRunLinuxLargePages: --large-pages manages a Linux guest's RAM (every
// 2 MiB region of it is a candidate) and prints the controller's last
// status line; the prioritized policy never revokes guest memory (the
// refault sampler): it samples with DAMON or, where the kernel has none for
// this process (this host), with the guest's own accessed bits.
func TestRunLinuxLargePages(t *testing.T) {
	requireKVM(t)
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeUpPowerOff), 0o644)
	code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--large-pages", "policy=all,exit-detect=both")
	if code != 0 || out != "up\n" || !strings.Contains(errs, "understudy: large-pages: policy=all ") || !strings.Contains(errs, "guest powered off") {
		t.Errorf("run --kernel --large-pages policy=all = %d, stdout %q, stderr %q; want 0, \"up\\n\", a large-pages status line", code, out, errs)
	}
	code, _, errs = runCLI("run", "--kernel", k, "--mem", "64M", "--large-pages", "budget=2,exit-detect=both")
	if code != 0 || (!strings.Contains(errs, "sampling with damon") && !strings.Contains(errs, "sampling with guest")) || strings.Contains(errs, "source=refault") {
		t.Errorf("run --kernel --large-pages budget=2 = %d, %q; want a run sampling with DAMON or the guest's accessed bits", code, errs)
	}
}

// TestRunLinuxHalt: a guest that halts with interrupts disabled on every
// vCPU ends the run with exit 0 and says so.
func TestRunLinuxHalt(t *testing.T) {
	requireKVM(t)
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeHalt), 0o644)
	code, out, errs := runCLI("run", "--kernel", k, "--mem", "64M", "--cpus", "2")
	if code != 0 || out != "bye\n" || !strings.Contains(errs, "understudy: guest halted after ") ||
		!strings.Contains(errs, "1 of 2 vCPUs halted with interrupts disabled, 1 never started") {
		t.Errorf("run --kernel (halt) = %d, stdout %q, stderr %q; want 0, \"bye\\n\", guest halted", code, out, errs)
	}
}

func TestRunLinuxReboot(t *testing.T) {
	requireKVM(t)
	k := writeFile(t, t.TempDir(), "bzImage", testKernel(codeReboot), 0o644)
	code, _, errs := runCLI("run", "--kernel", k, "--mem", "64M")
	if code != exitError || !strings.Contains(errs, "guest rebooted") || !strings.Contains(errs, "keyboard controller") {
		t.Errorf("run --kernel (reboot) = %d, %q; want exit 1 and a reboot message", code, errs)
	}
}

// TestRunLinuxBadInput: each bad Linux command line gives one clear error
// line and a non-zero exit, before the guest runs.
func TestRunLinuxBadInput(t *testing.T) {
	dir := t.TempDir()
	k := writeFile(t, dir, "bzImage", testKernel(codeUpPowerOff), 0o644)
	bad := testKernel(codeUpPowerOff)
	copy(bad[0x202:], "XXXX")
	badK := writeFile(t, dir, "bad", bad, 0o644)
	trunc := writeFile(t, dir, "trunc", testKernel(codeUpPowerOff)[:3000], 0o644)
	old := testKernel(codeUpPowerOff)
	binary.LittleEndian.PutUint16(old[0x206:], 0x0209)
	oldK := writeFile(t, dir, "old", old, 0o644)
	ro := writeFile(t, dir, "ro.img", make([]byte, 4096), 0o444)
	bigInitrd := filepath.Join(dir, "initrd")
	f, err := os.Create(bigInitrd)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(128 << 20)
	f.Close()
	absentKVM := filepath.Join(dir, "kvm")
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"run", "--kernel", filepath.Join(dir, "none")}, exitError, "no such file"},
		{[]string{"run", "--kernel", badK}, exitError, `no setup header signature "HdrS"`},
		{[]string{"run", "--kernel", trunc}, exitError, "truncated"},
		{[]string{"run", "--kernel", oldK}, exitError, "too old"},
		{[]string{"run", "--kernel", k, "--mem", "64M", "--initrd", bigInitrd}, exitError, "larger than guest memory"},
		{[]string{"run", "--kernel", k, "--disk", ro}, exitError, "cannot be opened for writing"},
		{[]string{"run", "--kernel", k, "--net", "tap=ustest-nope9"}, exitError, "ustest-nope9"},
		{[]string{"run", "--kernel", k, "--net", "tap=tap0,mac=zz:00:00:00:00:01"}, exitUsage, "not an Ethernet MAC"},
		{[]string{"run", "--kernel", k, "--net", "mac=02:00:00:00:00:01"}, exitUsage, "tap=NAME is required"},
		{[]string{"run", "--kernel", k, "--disk", ",ro"}, exitUsage, "no file given"},
		{[]string{"run", "--kernel", k, "--payload", "hello"}, exitUsage, "--payload cannot be combined with --kernel"},
		{[]string{"run", "--kernel", k, "--save", "x", "--save-after", "1"}, exitUsage, "cannot be combined with --kernel"},
		{[]string{"run", "--payload", "hello", "--initrd", k}, exitUsage, "--initrd needs --kernel"},
		{[]string{"run", "--disk", ro}, exitUsage, "--disk needs --kernel"},
		{[]string{"run", "--kernel", k, "--cpus", "0"}, exitError, "--cpus 0"},
		{[]string{"run", "--kernel", k, "--cmdline", "a\nb"}, exitUsage, "newline"},
		{[]string{"run", "--kernel", k, "--large-pages", "budget=2,source=refault"}, exitUsage, "source=refault: a Linux guest's virtio devices"},
		{[]string{"run", "--kernel", k, "--large-pages", "budget=2,exit-audit=0x7e0000000000"}, exitUsage, "exit-audit needs exit-detect"},
		{[]string{"run", "--kernel", k, "--large-pages", "budget=x"}, exitUsage, "budget"},
	}
	for _, tc := range tests {
		args := append(tc.args, "--kvm", absentKVM) // every error comes before KVM
		code, _, errs := runCLI(args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
		if code == exitError && strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("understudy %q: stderr has several lines: %q", tc.args, errs)
		}
		if strings.Contains(errs, "KVM is not available") {
			t.Errorf("understudy %q: error about KVM instead of the input: %q", tc.args, errs)
		}
	}
}

func TestParseNet(t *testing.T) {
	n, err := parseNet("tap=tap0,mac=02:00:00:aa:bb:cc")
	if err != nil || n.Tap != "tap0" || n.MAC.String() != "02:00:00:aa:bb:cc" {
		t.Errorf("parseNet = %+v, %v", n, err)
	}
	if n, err := parseNet("tap=vmtap"); err != nil || n.MAC != nil {
		t.Errorf("parseNet(no mac) = %+v, %v; want the default MAC (nil)", n, err)
	}
	for _, tc := range []struct{ in, errSub string }{
		{"", "tap=NAME is required"},
		{"tap", "want key=value"},
		{"tap=", "want key=value"},
		{"tap=a,tap=b", "given twice"},
		{"tap=" + strings.Repeat("x", 16), "1 to 15 characters"},
		{"tap=a/b", "not allowed"},
		{"tap=a b", "not allowed"},
		{"tap=..", "other than"},
		{"tap=t,mac=01:00:5e:00:00:01", "multicast"},
		{"tap=t,mac=00:00:00:00:00:00", "all zeros"},
		{"tap=t,mac=02:00:00:00:00:00:00:01", "not an Ethernet MAC"},
		{"tap=t,mac=hello", "not an Ethernet MAC"},
		{"tap=t,speed=10G", `unknown option "speed"`},
	} {
		if _, err := parseNet(tc.in); err == nil || !strings.Contains(err.Error(), tc.errSub) {
			t.Errorf("parseNet(%q) = %v, want an error about %q", tc.in, err, tc.errSub)
		}
	}
}

func TestParseDisk(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want vmm.DiskConfig
	}{
		{"/d/disk.img", vmm.DiskConfig{Path: "/d/disk.img"}},
		{"/d/disk.img,ro", vmm.DiskConfig{Path: "/d/disk.img", ReadOnly: true}},
		{"/d/disk.img,rw", vmm.DiskConfig{Path: "/d/disk.img"}},
		{"/d/a,b.img", vmm.DiskConfig{Path: "/d/a,b.img"}},
	} {
		if got, err := parseDisk(tc.in); err != nil || got != tc.want {
			t.Errorf("parseDisk(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", ",ro", ",rw", "a\x00b"} {
		if _, err := parseDisk(in); err == nil {
			t.Errorf("parseDisk(%q) = nil error", in)
		}
	}
}

func TestConsoleInput(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if consoleInput(r) == nil {
		t.Errorf("a pipe is not used as serial input")
	}
	f := writeFile(t, t.TempDir(), "file", []byte("x"), 0o644)
	rf, _ := os.Open(f)
	defer rf.Close()
	if consoleInput(rf) != nil {
		t.Errorf("a regular file is used as serial input")
	}
	null, _ := os.Open(os.DevNull)
	defer null.Close()
	if consoleInput(null) != nil {
		t.Errorf("/dev/null is used as serial input")
	}
}

func FuzzParseNet(f *testing.F) {
	for _, s := range []string{"tap=tap0", "tap=t,mac=02:00:00:00:00:01", "mac=x", "tap=a,tap=b", ",,", "tap=\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseNet(s)
		if err != nil {
			return
		}
		if virtio.CheckIfName(n.Tap) != nil {
			t.Errorf("parseNet(%q) accepted tap %q", s, n.Tap)
		}
		if n.MAC != nil && (len(n.MAC) != 6 || n.MAC[0]&1 != 0 || bytes.Equal(n.MAC, make(net.HardwareAddr, 6))) {
			t.Errorf("parseNet(%q) accepted MAC %v", s, n.MAC)
		}
	})
}

func FuzzParseDisk(f *testing.F) {
	for _, s := range []string{"disk.img", "disk.img,ro", ",ro", "a,b,ro", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := parseDisk(s)
		if err != nil {
			return
		}
		if d.Path == "" || strings.ContainsRune(d.Path, 0) {
			t.Errorf("parseDisk(%q) accepted path %q", s, d.Path)
		}
		if d.ReadOnly != strings.HasSuffix(s, ",ro") {
			t.Errorf("parseDisk(%q) read-only = %v", s, d.ReadOnly)
		}
	})
}
