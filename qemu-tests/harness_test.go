package qemutests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

func TestDetectAccel(t *testing.T) {
	t.Setenv("UNDERSTUDY_QEMU_ACCEL", "")
	dir := t.TempDir()
	dev := filepath.Join(dir, "kvm")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	write := func(flags string) string {
		p := filepath.Join(dir, "cpuinfo-"+strings.ReplaceAll(flags, " ", "_"))
		if err := os.WriteFile(p, []byte("processor\t: 0\nflags\t\t: "+flags+"\n\nprocessor\t: 1\nflags\t\t: vmx\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// sysModule makes a /sys/module with the vendor module's nested
	// parameter ("" : the module is not loaded).
	sysModule := func(mod, nested string) string {
		d := filepath.Join(t.TempDir(), "module")
		if nested == "" {
			return d
		}
		p := filepath.Join(d, mod, "parameters")
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "nested"), []byte(nested+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return d
	}
	for _, tt := range []struct {
		h         Host
		want, why string
	}{
		{Host{dev, write("fpu svm lm"), sysModule("kvm_amd", "1")}, "kvm", "the CPU has svm and kvm_amd allows nested guests"},
		{Host{dev, write("fpu svm lm"), sysModule("kvm_amd", "Y")}, "kvm", "kvm_amd allows nested guests"},
		{Host{dev, write("fpu vmx"), sysModule("kvm_intel", "Y")}, "kvm", "the CPU has vmx and kvm_intel allows nested guests"},
		{Host{dev, write("fpu vmx"), sysModule("kvm_intel", "N")}, "tcg", `kvm_intel's nested is "N"`},
		{Host{dev, write("fpu svm"), sysModule("kvm_amd", "0")}, "tcg", `kvm_amd's nested is "0"`},
		{Host{dev, write("fpu vmx"), sysModule("kvm_amd", "Y")}, "tcg", "kvm_intel is not loaded with nested virtualization"},
		{Host{dev, write("fpu vmx"), sysModule("", "")}, "tcg", "kvm_intel is not loaded"},
		{Host{dev, write("fpu lm hypervisor"), sysModule("kvm_intel", "Y")}, "tcg", "neither vmx nor svm"},
		{Host{filepath.Join(dir, "nokvm"), write("svm"), sysModule("kvm_amd", "1")}, "tcg", "no usable"},
		{Host{dev, filepath.Join(dir, "nocpuinfo"), sysModule("kvm_amd", "1")}, "tcg", "no such file"},
	} {
		a := DetectAccel(tt.h)
		if a.Name != tt.want || !strings.Contains(a.Why, tt.why) {
			t.Errorf("DetectAccel(%+v) = %s (%s), want %s (%s)", tt.h, a.Name, a.Why, tt.want, tt.why)
		}
	}
	t.Setenv("UNDERSTUDY_QEMU_ACCEL", "tcg")
	if a := DetectAccel(Host{dev, write("svm"), sysModule("kvm_amd", "1")}); a.Name != "tcg" || !slices.Contains(a.Args, "qemu64,+svm,+npt") {
		t.Errorf("DetectAccel with UNDERSTUDY_QEMU_ACCEL=tcg = %+v", a)
	}
	t.Setenv("UNDERSTUDY_QEMU_ACCEL", "kvm")
	if a := DetectAccel(Host{filepath.Join(dir, "nokvm"), write("fpu"), dir}); a.Name != "kvm" || !slices.Contains(a.Args, "-enable-kvm") {
		t.Errorf("DetectAccel with UNDERSTUDY_QEMU_ACCEL=kvm = %+v", a)
	}
}

func TestConfigArgs(t *testing.T) {
	got := strings.Join(Config{Kernel: "k", Initrd: "i", Append: "console=ttyS0 x=1"}.Args(), " ")
	want := "-accel tcg -cpu qemu64,+svm,+npt -m 1024 -smp 1 -nographic -no-reboot -nic none -kernel k -append console=ttyS0 x=1 -initrd i"
	if got != want {
		t.Errorf("Args() = %q, want %q", got, want)
	}
	got = strings.Join(Config{Kernel: "k", MemMiB: 512, CPUs: 2, Accel: KVM, Network: []string{"-nic", "user"}, Extra: []string{"-s"}}.Args(), " ")
	want = "-enable-kvm -cpu host -m 512 -smp 2 -nographic -no-reboot -nic user -kernel k -append  -s"
	if got != want {
		t.Errorf("Args() = %q, want %q", got, want)
	}
}

// TestHarnessKillsOnTimeout boots the appliance's kernel with no initramfs
// and panic=0, so it panics and hangs: WaitFor sees the panic, Wait kills
// QEMU after its timeout, and later waits report that QEMU exited.
func TestHarnessKillsOnTimeout(t *testing.T) {
	e := setup(t)
	log := filepath.Join(t.TempDir(), "console.log")
	m, err := Start(Config{
		Kernel: filepath.Join(e.image, appliance.ImageKernel), Append: "console=ttyS0 panic=0 loglevel=4", MemMiB: 256,
		Accel: e.accel, LogPath: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Kill()
	if _, err := m.WaitFor(context.Background(), "Kernel panic", bootTimeout); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := m.Wait(time.Second); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("Wait on a hung QEMU = %v, want it killed", err)
	}
	if d := time.Since(start); d < time.Second {
		t.Errorf("Wait(1s) killed QEMU after %v, before its second", d)
	}
	if _, err := m.WaitFor(context.Background(), "never printed", time.Minute); !errors.Is(err, ErrExited) {
		t.Errorf("WaitFor after the kill = %v, want ErrExited", err)
	}
	m.Kill()
	b, err := os.ReadFile(log)
	if err != nil || !strings.HasPrefix(string(b), "# "+QEMU+" ") || !strings.Contains(string(b), "Kernel panic") {
		t.Errorf("console log: %v, %.200q", err, b)
	}
	if n := len(m.Lines()); n == 0 {
		t.Error("no console lines kept")
	}
}

// hungKernel starts QEMU on the appliance's kernel without an initramfs and
// with panic=0, so that it panics and hangs.
func hungKernel(t *testing.T, e env, deadline time.Time) (*Machine, string) {
	t.Helper()
	log := filepath.Join(t.TempDir(), "console.log")
	m, err := Start(Config{
		Kernel: filepath.Join(e.image, appliance.ImageKernel), Append: "console=ttyS0 panic=0 loglevel=4", MemMiB: 256,
		Accel: e.accel, LogPath: log, Deadline: deadline,
	})
	if err != nil {
		t.Fatal(err)
	}
	return m, log
}

// TestHarnessDeadline: at Config.Deadline the harness kills QEMU, and a
// wait under way fails at once, saying why, long before its own timeout.
func TestHarnessDeadline(t *testing.T) {
	e := setup(t)
	m, _ := hungKernel(t, e, time.Now().Add(3*time.Second))
	defer m.Kill()
	start := time.Now()
	_, err := m.WaitFor(context.Background(), "never printed", 10*time.Minute)
	if !errors.Is(err, ErrExited) || !strings.Contains(err.Error(), "killed by the harness at the test's deadline") {
		t.Errorf("WaitFor past the deadline = %v, want QEMU killed at the deadline", err)
	}
	if d := time.Since(start); d >= 10*time.Minute {
		t.Errorf("WaitFor took %v, its own timeout, with a deadline 3 s away", d)
	}
	if err := m.Wait(time.Minute); err == nil || !strings.Contains(err.Error(), "deadline") {
		t.Errorf("Wait after the deadline = %v, want the reason", err)
	}
	if d := testDeadline(t); !d.IsZero() {
		if dl, _ := t.Deadline(); dl.Sub(d) != deadlineMargin {
			t.Errorf("testDeadline = %v, want %v before %v", d, deadlineMargin, dl)
		}
	}
}

// TestHarnessQEMUDiesWithTest: a test process that dies (SIGKILL: no
// cleanups, as when go test's -timeout ends it) takes its QEMU with it. The
// test binary runs itself as that process (TestHarnessChild).
func TestHarnessQEMUDiesWithTest(t *testing.T) {
	e := setup(t)
	child := exec.Command(os.Args[0], "-test.run", "^TestHarnessChild$", "-test.v")
	child.Env = append(os.Environ(), "UNDERSTUDY_HARNESS_CHILD=1", "UNDERSTUDY_IMAGE="+e.image)
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	child.Stderr = child.Stdout
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer child.Process.Kill()
	pid := 0
	sc := bufio.NewScanner(out)
	for pid == 0 && sc.Scan() {
		t.Logf("child| %s", sc.Text())
		if _, after, ok := strings.Cut(sc.Text(), "qemu-pid "); ok {
			pid, _ = strconv.Atoi(strings.TrimSpace(after))
		}
	}
	if pid == 0 {
		t.Fatalf("the child printed no QEMU pid: %v", sc.Err())
	}
	// The pid is printed once the process is started; its exec of QEMU may
	// still be under way (an empty or the parent's cmdline meanwhile) on a
	// loaded host.
	for start := time.Now(); ; time.Sleep(10 * time.Millisecond) {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(string(cmdline), QEMU) {
			break
		}
		if err != nil || time.Since(start) > 30*time.Second {
			t.Fatalf("pid %d is not QEMU (%q, %v)", pid, cmdline, err)
		}
	}
	child.Process.Kill()
	go io.Copy(io.Discard, out)
	child.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		// Gone, or a zombie waiting for whoever inherited it.
		if err != nil || strings.Contains(string(stat), ") Z ") {
			return
		}
		if time.Now().After(deadline) {
			syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("QEMU (pid %d) still runs 30 s after its test process died: %s", pid, stat)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestHarnessChild is TestHarnessQEMUDiesWithTest's test process: it starts
// QEMU, prints its pid and waits to be killed.
func TestHarnessChild(t *testing.T) {
	if os.Getenv("UNDERSTUDY_HARNESS_CHILD") != "1" {
		t.Skip("run by TestHarnessQEMUDiesWithTest")
	}
	e := setup(t)
	m, _ := hungKernel(t, e, time.Time{})
	fmt.Printf("qemu-pid %d\n", m.cmd.Process.Pid)
	time.Sleep(5 * time.Minute)
}

// TestConfigCommand: with NetNS, QEMU runs through ip netns exec.
func TestConfigCommand(t *testing.T) {
	c := Config{Kernel: "k", Append: "x"}
	if prog, args := c.Command(); prog != QEMU || !slices.Equal(args, c.Args()) {
		t.Errorf("Command() = %s %q, want %s %q", prog, args, QEMU, c.Args())
	}
	c.NetNS = "ns1"
	prog, args := c.Command()
	if want := append([]string{"netns", "exec", "ns1", QEMU}, c.Args()...); prog != "ip" || !slices.Equal(args, want) {
		t.Errorf("Command() with NetNS = %s %q, want ip %q", prog, args, want)
	}
}

// TestSegment: a segment is a namespace with a bridge; each node's tap is
// one of its ports, up; the QEMU flags name the tap and the MAC; Close
// deletes the namespace.
func TestSegment(t *testing.T) {
	s, err := NewSegment()
	if err != nil {
		if os.Geteuid() != 0 {
			t.Skip(err)
		}
		t.Fatal(err)
	}
	defer s.Close()
	for i, mac := range []string{"52:54:00:00:01:01", "52:54:00:00:01:02"} {
		flags, err := s.AddNode(mac)
		if err != nil {
			t.Fatal(err)
		}
		got := strings.Join(flags, " ")
		want := fmt.Sprintf("-netdev tap,id=seg0,ifname=tap%d,script=no,downscript=no -device virtio-net-pci,netdev=seg0,mac=%s", i, mac)
		if got != want {
			t.Errorf("AddNode flags %q, want %q", got, want)
		}
	}
	out, err := exec.Command("ip", "-n", s.NetNS, "-o", "link", "show", "master", s.Bridge).CombinedOutput()
	if err != nil {
		t.Fatalf("ip link show master: %v: %s", err, out)
	}
	for _, tap := range []string{"tap0", "tap1"} {
		if !strings.Contains(string(out), ": "+tap+": ") {
			t.Errorf("%s is not a port of %s: %s", tap, s.Bridge, out)
		}
	}
	if out, err := exec.Command("ip", "-n", s.NetNS, "-o", "route").CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) != 0 {
		t.Errorf("the segment's namespace has routes (%v): %s", err, out)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("ip", "netns", "list").CombinedOutput(); strings.Contains(string(out), s.NetNS) {
		t.Errorf("namespace %s still there after Close: %s", s.NetNS, out)
	}
	if _, err := s.AddNode("52:54:00:00:01:03"); err == nil {
		t.Error("AddNode after Close succeeded")
	}
}
