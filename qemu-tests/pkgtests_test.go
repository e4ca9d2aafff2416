package qemutests

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"
	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// TestApplianceVsock runs ft/transport's vsock test inside the appliance,
// whose kernel has vsock_loopback (the host's has no vsock transport): the
// mutual-TLS handshake, a message exchange and the refusal of a foreign
// peer over vsock://1:PORT. The test binary goes in as a second initramfs
// archive appended to the appliance's (the kernel unpacks both), and the
// appliance's test role runs it.
func TestApplianceVsock(t *testing.T) {
	e := setup(t)
	m := e.bootTest(t, "./ft/transport/", "^TestVsockLoopback$")
	expect(t, m, nestedTimeout,
		"understudy-appliance: module vsock_loopback: loaded",
		"--- PASS: TestVsockLoopback",
	)
	poweredOff(t, m, 0)
}

// TestApplianceSampler runs the guest-physical access sampler's host-KVM
// test inside the appliance, on Debian's 6.1 kernel and its KVM (nested):
// the sampler revokes access to guest pages through the VMM's mapping and
// counts the refaults; the counter payload's records and pages must come
// out exactly right. This kernel has neither page_idle nor DAMON vaddr nor
// KVM_EXIT_MEMORY_FAULT, so this is the mechanism it gets.
func TestApplianceSampler(t *testing.T) {
	e := setup(t)
	m := e.bootTest(t, "./vmm/largepage/", "^TestSamplerKeepsCounterData$")
	expect(t, m, nestedTimeout, "--- PASS: TestSamplerKeepsCounterData")
	poweredOff(t, m, 0)
}

// bootTest builds pkg's test binary, appends it to the appliance's
// initramfs as a second archive (the kernel unpacks both) and boots the
// appliance's test role to run the tests matching run.
func (e env) bootTest(t *testing.T, pkg, run string) *Machine {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "pkg.test")
	build := exec.Command("go", "test", "-c", "-o", bin, pkg)
	build.Dir = e.repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go test -c %s: %v\n%s", pkg, err, out)
	}
	code, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(filepath.Join(e.image, appliance.ImageAppliance))
	if err != nil {
		t.Fatal(err)
	}
	var extra bytes.Buffer
	w := cpio.Newc.Writer(&extra)
	if err := cpio.WriteRecordsAndDirs(w, []cpio.Record{cpio.StaticFile("test/pkg.test", string(code), 0o755)}); err != nil {
		t.Fatal(err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "appliance+test.cpio")
	if err := os.WriteFile(initrd, append(base, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}
	return e.bootInitrd(t, fmt.Sprintf(`understudy.role=test understudy.exec="/test/pkg.test -test.run %s -test.v"`, run), initrd)
}

// TestApplianceDAMON runs vmm/largepage's DAMON sampler test in the appliance built
// with Debian's 6.12 kernel (bookworm-backports), which has DAMON with
// virtual-address operations: the touch guest's hot regions must count
// more accesses than any cold one. The test must pass there, not skip.
func TestApplianceDAMON(t *testing.T) {
	e := setup(t)
	e.image = filepath.Join(e.repo, "build", "image-damon")
	if d := os.Getenv("UNDERSTUDY_IMAGE_DAMON"); d != "" {
		e.image = d
	}
	if _, err := os.Stat(filepath.Join(e.image, appliance.ImageAppliance)); err != nil {
		if os.Getenv("UNDERSTUDY_QEMU_REQUIRED") == "1" {
			t.Fatalf("no DAMON appliance image (%v): run `make image` first", err)
		}
		t.Skipf("no DAMON appliance image (%v): run `make image` first", err)
	}
	m := e.bootTest(t, "./vmm/largepage/", "^TestDAMONSampler$")
	expect(t, m, nestedTimeout, "--- PASS: TestDAMONSampler")
	poweredOff(t, m, 0)
}
