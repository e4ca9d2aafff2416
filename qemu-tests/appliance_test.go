package qemutests

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// Timeouts. Under TCG the appliance is ready about 5 s after QEMU starts
// and a nested guest reaches its init some 10 s after `understudy run`
// starts; these leave room for a loaded 2-core machine.
const (
	bootTimeout   = 2 * time.Minute // QEMU start to the uinit's "ready"
	nestedTimeout = 4 * time.Minute // "ready" to the nested guest's end
	exitTimeout   = time.Minute     // the uinit's "done" to QEMU's exit
	// protectedTimeout bounds a wait on a protected nested guest's progress:
	// its boot under checkpoints (the first full image crosses two TCG
	// nodes' TLS link) or a client's writes, each held for a checkpoint's
	// acknowledgement. On a slow machine that has taken more than
	// nestedTimeout (once the guest's kernel needed 171 s to reach init).
	protectedTimeout = 3 * nestedTimeout
)

// The nested guest's network (inside the appliance only: QEMU has no NIC,
// -nic none, so nothing leaves it). 192.0.2.0/24 is TEST-NET-1.
const (
	tapName   = "tap0"
	tapAddr   = "192.0.2.1/24"
	guestAddr = "192.0.2.2"
	guestPort = "7777"
	guestMAC  = "52:54:00:12:34:56"
	// guestAnswer is what initramfs/guestinit answers on guestPort.
	guestAnswer = "hello from the nested guest over virtio-net"
)

// env is what every test needs: the image, the accelerator and where to
// keep logs.
type env struct {
	repo      string // the repository root
	image     string // build/image
	artifacts string // build/qemu-tests
	accel     Accel
	required  bool // UNDERSTUDY_QEMU_REQUIRED=1: fail rather than skip
}

// setup finds the image and QEMU. Without them it skips, naming `make image`,
// unless UNDERSTUDY_QEMU_REQUIRED=1, when it fails.
func setup(t testing.TB) env {
	t.Helper()
	missing := t.Skipf
	required := os.Getenv("UNDERSTUDY_QEMU_REQUIRED") == "1"
	if required {
		missing = t.Fatalf
	}
	repo, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	e := env{required: required, repo: repo, image: filepath.Join(repo, "build", "image"), artifacts: filepath.Join(repo, "build", "qemu-tests")}
	if d := os.Getenv("UNDERSTUDY_IMAGE"); d != "" {
		e.image = d
	}
	if d := os.Getenv("UNDERSTUDY_QEMU_ARTIFACTS"); d != "" {
		e.artifacts = d
	}
	for _, f := range []string{appliance.ImageKernel, appliance.ImageAppliance} {
		if _, err := os.Stat(filepath.Join(e.image, f)); err != nil {
			missing("no appliance image (%v): run `make image` first (`make test` does)", err)
		}
	}
	if _, err := exec.LookPath(QEMU); err != nil {
		missing("%v: install QEMU (apt-get install qemu-system-x86; .ci/run does)", err)
	}
	e.accel = DetectAccel(ThisHost)
	return e
}

func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// deadlineMargin is how long before go test's -timeout the harness kills a
// test's QEMU: time enough for the test to fail, clean up and keep its
// console log, which the -timeout panic would not leave it.
const deadlineMargin = 30 * time.Second

// testDeadline is when the harness kills t's QEMU (Config.Deadline): a
// margin before go test's -timeout, or never without one. Tests run one
// after another, so a test that hangs fails at this deadline and those
// after it fail at once, each with its log, instead of go test panicking.
func testDeadline(t testing.TB) time.Time {
	dt, ok := t.(interface{ Deadline() (time.Time, bool) }) // benchmarks have none
	if !ok {
		return time.Time{}
	}
	d, ok := dt.Deadline()
	if !ok {
		return time.Time{}
	}
	return d.Add(-deadlineMargin)
}

// kvmModule is the vendor module the appliance should load.
func (e env) kvmModule() string {
	if e.accel.Name == "tcg" {
		return "kvm_amd" // -cpu qemu64,+svm
	}
	b, _ := os.ReadFile("/proc/cpuinfo")
	if strings.Contains(string(b), " vmx") {
		return "kvm_intel"
	}
	return "kvm_amd"
}

// boot starts the appliance with the given understudy.* parameters. The
// console streams into the test log; QEMU is killed when the test ends, and
// a failed test keeps the console log under e.artifacts.
func (e env) boot(t testing.TB, params string) *Machine {
	t.Helper()
	return e.bootInitrd(t, params, filepath.Join(e.image, appliance.ImageAppliance))
}

// bootInitrd is boot with another initramfs.
func (e env) bootInitrd(t testing.TB, params, initrd string) *Machine {
	t.Helper()
	return e.start(t, "", params, initrd, nil, "", 1024)
}

// start boots the appliance with initramfs initrd and memMiB of memory;
// with a netns, QEMU runs in it with the network flags given (a Segment's
// node), and name tells the node's console lines and kept log apart from
// the others'.
func (e env) start(t testing.TB, name, params, initrd string, network []string, netns string, memMiB int) *Machine {
	t.Helper()
	return e.startCPUs(t, name, params, initrd, network, netns, memMiB, 1)
}

// startCPUs is start with cpus vCPUs for the appliance.
func (e env) startCPUs(t testing.TB, name, params, initrd string, network []string, netns string, memMiB, cpus int) *Machine {
	t.Helper()
	log := filepath.Join(t.TempDir(), "console.log")
	label := "console"
	if name != "" {
		label = name
	}
	cfg := Config{
		Kernel: filepath.Join(e.image, appliance.ImageKernel),
		Initrd: initrd,
		Append: "console=ttyS0 panic=-1 quiet " + params,
		MemMiB: memMiB,
		CPUs:   cpus,
		Accel:  e.accel,
		OnLine: func(l Line) {
			t.Logf("%s %6.2fs| %s", label, l.At.Seconds(), l.Text)
		},
		LogPath:  log,
		Deadline: testDeadline(t),
		Network:  network,
		NetNS:    netns,
	}
	t.Logf("QEMU with %s (%s)", e.accel.Name, e.accel.Why)
	m, err := Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill(); keepLog(t, e, log, name) })
	return m
}

// keepLog copies a failed test's console log (of node name, if set) to
// e.artifacts and says where.
func keepLog(t testing.TB, e env, log string, name ...string) {
	if !t.Failed() {
		return
	}
	base := strings.ReplaceAll(t.Name(), "/", "_")
	if len(name) > 0 && name[0] != "" {
		base += "-" + name[0]
	}
	keep := filepath.Join(e.artifacts, base+".log")
	if err := os.MkdirAll(e.artifacts, 0o755); err == nil {
		if b, err := os.ReadFile(log); err == nil && os.WriteFile(keep, b, 0o644) == nil {
			t.Logf("console log kept at %s", keep)
			return
		}
	}
	t.Logf("could not keep the console log %s in %s", log, e.artifacts)
}

// expect waits for each marker in turn and returns the lines that matched.
func expect(t testing.TB, m *Machine, timeout time.Duration, markers ...string) []Line {
	t.Helper()
	var got []Line
	for _, mk := range markers {
		l, err := m.WaitFor(context.Background(), mk, timeout)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, l)
	}
	return got
}

// poweredOff waits for the uinit's report and for QEMU to exit cleanly.
func poweredOff(t testing.TB, m *Machine, status int) {
	t.Helper()
	expect(t, m, nestedTimeout, fmt.Sprintf("understudy-appliance: done status=%d", status), "understudy-appliance: powering off")
	if err := m.Wait(exitTimeout); err != nil {
		t.Fatalf("QEMU after power-off: %v", err)
	}
}

// TestApplianceBoots: the appliance boots to understudy's uinit, which
// reports its role and options, loads the KVM modules in dependency order,
// finds /dev/kvm usable, and powers off.
func TestApplianceBoots(t *testing.T) {
	e := setup(t)
	m := e.boot(t, "understudy.role=test understudy.timeout=5m")
	mod := e.kvmModule()
	lines := expect(t, m, bootTimeout,
		"understudy-appliance: starting: understudy ",
		"understudy-appliance: image: kernel linux-image-",
		"understudy-appliance: role test",
		`understudy-appliance: option timeout="5m"`,
		"understudy-appliance: module irqbypass: loaded",
		"understudy-appliance: module kvm: loaded",
		"understudy-appliance: module "+mod+": loaded",
		"understudy-appliance: module vhost_vsock: loaded",
		"understudy-appliance: module tun: loaded",
		"understudy-appliance: kvm: usable: /dev/kvm API version 12, VM created, module "+mod,
		"understudy-appliance: ready role=test",
	)
	poweredOff(t, m, 0)
	t.Logf("appliance: uinit started %.2fs, ready %.2fs after QEMU started (%s); QEMU ran %.2fs",
		lines[0].At.Seconds(), lines[len(lines)-1].At.Seconds(), e.accel.Name, m.Elapsed().Seconds())
}

// TestApplianceBadRole: a role the appliance does not know is reported and
// the appliance still powers off, with a failure status.
func TestApplianceBadRole(t *testing.T) {
	e := setup(t)
	m := e.boot(t, "understudy.role=primary")
	expect(t, m, bootTimeout, `understudy-appliance: error: understudy.role="primary": want run, intermediary, backup or test`)
	poweredOff(t, m, 2)
}

// nestedRun is `understudy run` of the nested guest, as the test role's
// understudy.exec; extra are more run flags, guest the guest.* parameters.
// The command line keeps understudy's defaults (reboot through the keyboard
// controller, which understudy sees; no PCI) and adds quiet: every console
// byte of a nested guest under TCG is expensive.
func nestedRun(extra, guest string) string {
	return fmt.Sprintf(`understudy.exec="understudy run --kernel /%s --initrd /%s --mem 256M %s--cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet %s'"`,
		appliance.GuestKernel, appliance.GuestInitrd, extra, guest)
}

// TestNestedLinuxBoot: inside the appliance, `understudy run --kernel`
// boots the Debian kernel with the guest initramfs; the guest's init prints
// its marker and powers off, and understudy exits 0.
func TestNestedLinuxBoot(t *testing.T) {
	e := setup(t)
	m := e.boot(t, "understudy.role=test "+nestedRun("", "guest.mode=poweroff"))
	lines := expect(t, m, bootTimeout, "understudy-appliance: ready role=test", "understudy-appliance: exec: understudy run --kernel")
	started := lines[1]
	got := expect(t, m, nestedTimeout, "understudy-guest: init reached", "understudy-guest: done, powering off",
		"understudy-appliance: exec: exit status 0")
	poweredOff(t, m, 0)
	uptime := strings.TrimSuffix(strings.TrimPrefix(got[0].Text, "understudy-guest: init reached (kernel uptime "), ")")
	t.Logf("nested boot: the guest's init ran %.2fs after `understudy run` started (guest kernel uptime then: %s); the whole guest run took %.2fs",
		(got[0].At - started.At).Seconds(), uptime, (got[2].At - started.At).Seconds())
}

// TestNestedNetwork: the appliance makes a tap device with an address, the
// nested guest gets a virtio-net device on it and serves TCP, and the
// appliance's probe reads the guest's answer.
func TestNestedNetwork(t *testing.T) {
	e := setup(t)
	m := e.boot(t, fmt.Sprintf("understudy.role=test understudy.tap=%s,%s understudy.probe=tcp:%s:%s %s",
		tapName, tapAddr, guestAddr, guestPort,
		nestedRun(fmt.Sprintf("--net tap=%s,mac=%s ", tapName, guestMAC), "guest.mode=net guest.addr="+guestAddr+"/24 guest.port="+guestPort)))
	expect(t, m, bootTimeout, "understudy-appliance: tap "+tapName+": created, address "+tapAddr+", up", "understudy-appliance: ready role=test")
	got := expect(t, m, nestedTimeout,
		"understudy-guest: init reached",
		"understudy-guest: module virtio_net: loaded",
		"understudy-guest: listening on "+guestAddr+":"+guestPort+" (eth0)",
		fmt.Sprintf(`understudy-appliance: probe tcp:%s:%s: answer %q`, guestAddr, guestPort, guestAnswer),
	)
	expect(t, m, nestedTimeout, "understudy-guest: answered 192.0.2.1:", "understudy-appliance: exec: exit status 0")
	poweredOff(t, m, 0)
	t.Logf("network: the guest answered %.2fs after its init started", (got[3].At - got[0].At).Seconds())
}

// TestNestedDisk: the appliance writes a disk image with a fresh token, the
// nested guest gets it as a virtio-blk disk and prints what it reads at two
// offsets.
func TestNestedDisk(t *testing.T) {
	e := setup(t)
	token := fmt.Sprintf("tok-%d", time.Now().UnixNano())
	m := e.boot(t, fmt.Sprintf("understudy.role=test understudy.testdisk=/tmp/disk.img:%s %s",
		token, nestedRun("--disk /tmp/disk.img ", "guest.mode=disk")))
	expect(t, m, bootTimeout, "understudy-appliance: ready role=test", "understudy-appliance: testdisk /tmp/disk.img: ")
	want := []string{"understudy-guest: init reached", "understudy-guest: module virtio_blk: loaded"}
	for _, off := range boot.TestDiskOffsets {
		want = append(want, fmt.Sprintf(`understudy-guest: disk /dev/vda offset %d: %q`, off, boot.TestDiskText(token, off)))
	}
	expect(t, m, nestedTimeout, append(want, "understudy-appliance: exec: exit status 0")...)
	poweredOff(t, m, 0)
}

// TestNestedHalt: the nested guest (two vCPUs) halts instead of powering
// off (reboot(LINUX_REBOOT_CMD_HALT): every CPU stops with interrupts
// disabled, which KVM handles without telling understudy); understudy's
// halt check sees it and exits 0, saying the guest halted (before the
// test's own timeout; how long it took is logged, as TCG's speed varies).
func TestNestedHalt(t *testing.T) {
	e := setup(t)
	m := e.boot(t, "understudy.role=test "+nestedRun("--cpus 2 ", "guest.mode=halt"))
	expect(t, m, bootTimeout, "understudy-appliance: ready role=test", "understudy-appliance: exec: understudy run --kernel")
	got := expect(t, m, nestedTimeout, "understudy-guest: init reached", "understudy-guest: mode halt", "understudy-guest: done, halting",
		"understudy: guest halted after ", "understudy-appliance: exec: exit status 0")
	if !strings.Contains(got[3].Text, "2 of 2 vCPUs halted with interrupts disabled") {
		t.Errorf("understudy's halt line %q does not say both vCPUs halted", got[3].Text)
	}
	poweredOff(t, m, 0)
	// Two checks 0.5 s apart, plus the guest's own way from its marker to
	// the halt, under TCG.
	took := got[4].At - got[2].At
	t.Logf("halt: understudy exited %.2fs after the guest's init asked to halt", took.Seconds())
}

// TestNestedConsoleInput: the appliance types a line into the nested
// `understudy run`'s stdin once the guest's init waits for it; the line
// goes through understudy's 8250 UART and the guest kernel's serial
// driver and tty, and the guest prints it back.
func TestNestedConsoleInput(t *testing.T) {
	e := setup(t)
	token := fmt.Sprintf("typed-%d", time.Now().UnixNano())
	m := e.boot(t, fmt.Sprintf("understudy.role=test understudy.stdin=%s %s", token, nestedRun("", "guest.mode=echo")))
	expect(t, m, bootTimeout, "understudy-appliance: ready role=test")
	got := expect(t, m, nestedTimeout,
		"understudy-guest: init reached",
		"understudy-guest: echo: waiting for a line on /dev/ttyS0",
		fmt.Sprintf(`understudy-appliance: stdin: writing %q after the prompt`, token),
		fmt.Sprintf(`understudy-guest: echo: got %q`, token),
		"understudy-guest: done, powering off",
		"understudy-appliance: exec: exit status 0",
	)
	poweredOff(t, m, 0)
	t.Logf("console input: the guest echoed the line %.2fs after its prompt", (got[3].At - got[1].At).Seconds())
}
