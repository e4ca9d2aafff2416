package initramfs

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseDepends(t *testing.T) {
	out := "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
	if got, err := parseDepends(out, "linux-image-"); err != nil || got != "linux-image-6.1.0-56-amd64" {
		t.Errorf("parseDepends = %q, %v", got, err)
	}
	out = "linux-image-amd64\n |Depends: <linux-image-virtual>\n  Depends: linux-base\n |Depends: linux-image-6.12.9-amd64\n"
	if got, err := parseDepends(out, "linux-image-"); err != nil || got != "linux-image-6.12.9-amd64" {
		t.Errorf("parseDepends(alternatives) = %q, %v", got, err)
	}
	for _, bad := range []string{"", "linux-image-amd64\n", "  Depends: linux-image-$(reboot)\n", "  Recommends: linux-image-6.1\n"} {
		if got, err := parseDepends(bad, "linux-image-"); err == nil {
			t.Errorf("parseDepends(%q) = %q, want an error", bad, got)
		}
	}
}

func TestParseVersion(t *testing.T) {
	if got, err := parseVersion("Package: linux-image-6.1.0-56-amd64\nVersion: 6.1.192-2\nSize: 1\n"); err != nil || got != "6.1.192-2" {
		t.Errorf("parseVersion = %q, %v", got, err)
	}
	if got, err := parseVersion("Version: 1:2.0~rc1+dfsg-3\n"); err != nil || got != "1:2.0~rc1+dfsg-3" {
		t.Errorf("parseVersion(epoch) = %q, %v", got, err)
	}
	for _, bad := range []string{"", "Package: x\n", "Version: ../../x\n", "Version: v1\n", "Version: \n"} {
		if got, err := parseVersion(bad); err == nil {
			t.Errorf("parseVersion(%q) = %q, want an error", bad, got)
		}
	}
	if got := debName("p", "1:2.0-1"); got != "p_1%3a2.0-1_amd64.deb" {
		t.Errorf("debName = %q", got)
	}
	for s, want := range map[string]bool{"linux-image-6.1.0-56-amd64": true, "g++": true, "a": false, "-x": false, "Abc": false, "a_b": false} {
		if validPackageName(s) != want {
			t.Errorf("validPackageName(%q) = %v", s, !want)
		}
	}
}

// fakeKernel writes an unpacked kernel package the way FetchKernel leaves it.
func fakeKernel(t *testing.T, cache, pkg, version, release string) string {
	t.Helper()
	root := filepath.Join(cache, pkg+"_"+version)
	for _, d := range []string{"boot", "lib/modules/" + release} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for f, content := range map[string]string{"boot/vmlinuz-" + release: "kernel", ".unpacked": pkg + " " + version + "\n"} {
		if err := os.WriteFile(filepath.Join(root, f), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestCachedKernelAndPrune(t *testing.T) {
	cache := t.TempDir()
	if _, err := cachedKernel(cache); err == nil {
		t.Error("cachedKernel(empty) = nil error")
	}
	oldRoot := fakeKernel(t, cache, "linux-image-6.1.0-55-amd64", "6.1.190-1", "6.1.0-55-amd64")
	if err := os.WriteFile(filepath.Join(cache, debName("linux-image-6.1.0-55-amd64", "6.1.190-1")), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	k, err := cachedKernel(cache)
	if err != nil || k.Release != "6.1.0-55-amd64" || k.Version != "6.1.190-1" || k.Vmlinuz() != filepath.Join(oldRoot, "boot/vmlinuz-6.1.0-55-amd64") {
		t.Errorf("cachedKernel = %+v, %v", k, err)
	}
	newRoot := fakeKernel(t, cache, "linux-image-6.1.0-56-amd64", "6.1.192-2", "6.1.0-56-amd64")
	if _, err := cachedKernel(cache); err == nil || !strings.Contains(err.Error(), "2 unpacked kernels") {
		t.Errorf("cachedKernel(two) = %v", err)
	}
	if err := os.WriteFile(filepath.Join(cache, "other-file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	pruneKernels(cache, Kernel{Package: "linux-image-6.1.0-56-amd64", Version: "6.1.192-2", Root: newRoot}, t.Logf)
	ents, _ := os.ReadDir(cache)
	var left []string
	for _, e := range ents {
		left = append(left, e.Name())
	}
	if strings.Join(left, " ") != "linux-image-6.1.0-56-amd64_6.1.192-2 other-file" {
		t.Errorf("after pruneKernels the cache holds %v", left)
	}
	// A tree with two module directories is not a kernel package.
	if err := os.MkdirAll(filepath.Join(newRoot, "lib/modules/extra"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := kernelRelease(newRoot); err == nil || !strings.Contains(err.Error(), "want one directory") {
		t.Errorf("kernelRelease(two releases) = %v", err)
	}
}

// TestAptForSuite: a suite gets its own sources list and package lists in
// the cache, and apt is pointed at them alone; a bad suite name is refused
// before apt runs.
func TestAptForSuite(t *testing.T) {
	logf := func(string, ...any) {}
	if opts, err := aptFor(t.Context(), t.TempDir(), "", logf); err != nil || opts != nil {
		t.Errorf("aptFor(no suite) = %q, %v; want the host's sources", opts, err)
	}
	for _, bad := range []string{"Bookworm", "bookworm backports", "../x", "-o"} {
		if _, err := aptFor(t.Context(), t.TempDir(), bad, logf); err == nil || !strings.Contains(err.Error(), "not a Debian suite") {
			t.Errorf("aptFor(%q) = %v, want a refusal", bad, err)
		}
	}
	dir := t.TempDir()
	opts, err := aptFor(t.Context(), dir, "bookworm-backports", logf)
	if err != nil {
		t.Skipf("apt-get update of bookworm-backports: %v (no network?)", err)
	}
	list, _ := os.ReadFile(filepath.Join(dir, "apt", "sources.list"))
	if string(list) != "deb "+DebianMirror+" bookworm-backports main\n" {
		t.Errorf("sources.list = %q", list)
	}
	if joined := strings.Join(opts, " "); !strings.Contains(joined, "Dir::State::Lists="+filepath.Join(dir, "apt", "lists")) {
		t.Errorf("apt options %q do not use the suite's own lists", joined)
	}
	if lists, _ := filepath.Glob(filepath.Join(dir, "apt", "lists", "*bookworm-backports*Packages*")); len(lists) == 0 {
		t.Errorf("apt-get update left no package list for the suite")
	}
}
