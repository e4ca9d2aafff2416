package qemutests

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
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
	for _, tt := range []struct {
		dev, cpuinfo, want, why string
	}{
		{dev, write("fpu svm lm"), "kvm", "CPU has svm"},
		{dev, write("fpu vmx"), "kvm", "CPU has vmx"},
		{dev, write("fpu lm hypervisor"), "tcg", "neither vmx nor svm"},
		{filepath.Join(dir, "nokvm"), write("svm"), "tcg", "no usable"},
		{dev, filepath.Join(dir, "nocpuinfo"), "tcg", "no such file"},
	} {
		a := DetectAccel(tt.dev, tt.cpuinfo)
		if a.Name != tt.want || !strings.Contains(a.Why, tt.why) {
			t.Errorf("DetectAccel(%s, %s) = %s (%s), want %s (%s)", tt.dev, filepath.Base(tt.cpuinfo), a.Name, a.Why, tt.want, tt.why)
		}
	}
	t.Setenv("UNDERSTUDY_QEMU_ACCEL", "tcg")
	if a := DetectAccel(dev, write("svm")); a.Name != "tcg" || !slices.Contains(a.Args, "qemu64,+svm,+npt") {
		t.Errorf("DetectAccel with UNDERSTUDY_QEMU_ACCEL=tcg = %+v", a)
	}
	t.Setenv("UNDERSTUDY_QEMU_ACCEL", "kvm")
	if a := DetectAccel(filepath.Join(dir, "nokvm"), write("fpu")); a.Name != "kvm" || !slices.Contains(a.Args, "-enable-kvm") {
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
		Kernel: filepath.Join(e.image, "vmlinuz"), Append: "console=ttyS0 panic=0 loglevel=4", MemMiB: 256,
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
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("Wait(1s) took %v", d)
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
