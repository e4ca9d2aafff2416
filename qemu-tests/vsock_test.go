package qemutests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"
)

// TestApplianceVsock runs ft/transport's vsock test inside the appliance,
// whose kernel has vsock_loopback (the host's has no vsock transport): the
// mutual-TLS handshake, a message exchange and the refusal of a foreign
// peer over vsock://1:PORT. The test binary goes in as a second initramfs
// archive appended to the appliance's (the kernel unpacks both), and the
// appliance's test role runs it.
func TestApplianceVsock(t *testing.T) {
	e := setup(t)
	dir := t.TempDir()
	bin := filepath.Join(dir, "transport.test")
	build := exec.Command("go", "test", "-c", "-o", bin, "./ft/transport/")
	build.Dir = e.repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go test -c ./ft/transport: %v\n%s", err, out)
	}
	code, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(filepath.Join(e.image, "appliance.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	var extra bytes.Buffer
	w := cpio.Newc.Writer(&extra)
	if err := cpio.WriteRecordsAndDirs(w, []cpio.Record{cpio.StaticFile("test/transport.test", string(code), 0o755)}); err != nil {
		t.Fatal(err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "appliance+test.cpio")
	if err := os.WriteFile(initrd, append(base, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}
	m := e.bootInitrd(t, `understudy.role=test understudy.exec="/test/transport.test -test.run ^TestVsockLoopback$ -test.v"`, initrd)
	expect(t, m, nestedTimeout,
		"understudy-appliance: module vsock_loopback: loaded",
		"--- PASS: TestVsockLoopback",
	)
	poweredOff(t, m, 0)
}
