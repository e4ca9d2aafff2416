package initramfs

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/u-root/gobusybox/src/pkg/golang"
	"github.com/u-root/mkuimage/cpio"
	"github.com/u-root/mkuimage/uimage"
	"github.com/u-root/uio/llog"
	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// The u-root commands in the appliance, built into one busybox binary. The
// appliance has no shell (its uinit powers the machine off when its role
// ends); the others are there to be run by the test role
// (understudy.exec="dmesg") when something needs looking at.
var URootCommands = []string{"init", "ls", "cat", "ip", "dmesg", "mount", "ps", "uname", "lsmod", "free", "hexdump", "sleep"}

// ApplianceModules are the modules the appliance image carries and its uinit
// loads (with their dependencies): KVM, vsock, tap, veth, the bridge (a
// nested guest's tap and the node's NIC on one segment) and the qdiscs for
// shaping links, and virtio so the appliance can use QEMU's virtio devices.
// kvm_amd and kvm_intel are both carried; the uinit loads the one the CPU
// supports.
var ApplianceModules = []string{
	"kvm", "kvm_amd", "kvm_intel", "vhost_vsock", "vsock_loopback", "tun", "veth", "bridge", "sch_netem", "sch_tbf",
	"virtio_pci", "virtio_mmio", "virtio_net", "virtio_blk",
}

// GuestModules are the modules the nested guest's initramfs carries; its
// init loads those its mode needs.
var GuestModules = []string{"virtio_pci", "virtio_mmio", "virtio_net", "virtio_blk"}

// Options configure Build.
type Options struct {
	OutDir      string    // where the image goes (build/image)
	CacheDir    string    // downloads and unpacked kernels (build/cache)
	Understudy  string    // the static understudy binary to make the uinit
	RepoDir     string    // the Go module root: guestinit and the u-root commands are built from here
	MetaPackage string    // the kernel metapackage; DefaultMetaPackage if empty
	Suite       string    // the Debian suite to take it from ("": the host's apt sources)
	MkUimage    string    // the mkuimage version linked in (for the record)
	Log         io.Writer // progress lines
}

// Result describes a built image.
type Result struct {
	Kernel    Kernel
	Appliance string // the appliance initramfs (newc cpio, uncompressed)
	Guest     string // the nested guests' initramfs
	Vmlinuz   string // the kernel, for QEMU's -kernel and the nested guests
	Builtin   []string
}

// Build makes the appliance: the Debian kernel, the nested guests'
// initramfs (guestinit and virtio modules) and the appliance initramfs
// (u-root's init, understudy as uinit, the KVM and other modules, the
// nested guest's kernel and initramfs). It prints a line for every step.
func Build(ctx context.Context, o Options) (*Result, error) {
	if o.MetaPackage == "" {
		o.MetaPackage = DefaultMetaPackage
	}
	if o.Log == nil {
		o.Log = io.Discard
	}
	start := time.Now()
	stepStart := start
	step := func(format string, args ...any) {
		now := time.Now()
		fmt.Fprintf(o.Log, "mkimage: %-60s (%5.1fs)\n", fmt.Sprintf(format, args...), now.Sub(stepStart).Seconds())
		stepStart = now
	}
	logf := func(format string, args ...any) { fmt.Fprintf(o.Log, "mkimage:   "+format+"\n", args...) }
	if _, err := os.Stat(o.Understudy); err != nil {
		return nil, fmt.Errorf("the understudy binary: %w (make build makes it)", err)
	}
	for _, d := range []string{o.OutDir, o.CacheDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}

	uroot, err := goListVersion(ctx, o.RepoDir, "github.com/u-root/u-root")
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "mkimage: kernel: resolving %s %s\n", o.MetaPackage, o.Suite)
	kcache := filepath.Join(o.CacheDir, "kernel")
	if o.Suite != "" {
		kcache += "-" + o.Suite // each suite keeps its own kernel
	}
	k, err := FetchKernel(ctx, kcache, o.MetaPackage, o.Suite, logf)
	if err != nil {
		return nil, err
	}
	how := "downloaded and unpacked"
	if k.Cached {
		how = "cached"
	}
	step("kernel %s %s (%s), %s", k.Package, k.Version, k.Release, how)

	tree, err := IndexModules(k.ModulesDir())
	if err != nil {
		return nil, err
	}
	appMods, builtin, err := tree.Resolve(ApplianceModules)
	if err != nil {
		return nil, err
	}
	guestMods, gBuiltin, err := tree.Resolve(GuestModules)
	if err != nil {
		return nil, err
	}
	builtin = append(builtin, gBuiltin...)
	if len(builtin) == 0 {
		builtin = []string{"none"}
	}
	step("modules: %d for the appliance, %d for the guest; built in: %s", len(appMods), len(guestMods), strings.Join(builtin, " "))

	// A stage of this build's own: two builds sharing a cache do not
	// clobber each other's files.
	stage, err := os.MkdirTemp(o.CacheDir, "stage-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(stage)

	guestinit := filepath.Join(stage, "guestinit")
	if err := goBuild(ctx, o.RepoDir, guestinit, "./initramfs/guestinit"); err != nil {
		return nil, err
	}
	step("built guestinit (static)")

	kvload := filepath.Join(stage, "kvload")
	if err := goBuild(ctx, o.RepoDir, kvload, "./internal/cmd/kvload"); err != nil {
		return nil, err
	}
	nodefile := filepath.Join(stage, "nodefile")
	if err := goBuild(ctx, o.RepoDir, nodefile, "./initramfs/cmd/nodefile"); err != nil {
		return nil, err
	}
	step("built kvload and nodefile (static)")

	guestCPIO := filepath.Join(o.OutDir, appliance.ImageGuest)
	if err := writeGuestCPIO(guestCPIO, guestinit, filepath.Join(stage, "guest"), k.Release, guestMods); err != nil {
		return nil, err
	}
	step("wrote %s (%s)", guestCPIO, sizeOf(guestCPIO))

	vmlinuz := filepath.Join(o.OutDir, appliance.ImageKernel)
	if err := copyFile(k.Vmlinuz(), vmlinuz); err != nil {
		return nil, err
	}

	appStage := filepath.Join(stage, "appliance")
	modFiles, err := StageModules(appStage, k.Release, appMods)
	if err != nil {
		return nil, err
	}
	marker := fmt.Sprintf("understudy appliance image\nkernel %s %s %s\nu-root %s\nbuilt %s\n",
		k.Package, k.Version, k.Release, uroot, time.Now().UTC().Format(time.RFC3339))
	extra := map[string]string{
		appliance.Marker:     marker,
		appliance.ModuleList: strings.Join(ApplianceModules, "\n") + "\n",
	}
	files := []string{
		o.Understudy + ":" + appliance.Binary,
		kvload + ":" + appliance.KVLoad,
		nodefile + ":" + appliance.NodeFile,
		k.Vmlinuz() + ":" + appliance.GuestKernel,
		guestCPIO + ":" + appliance.GuestInitrd,
	}
	for _, f := range modFiles {
		files = append(files, filepath.Join(appStage, filepath.FromSlash(f))+":"+f)
	}
	for name, content := range extra {
		p := filepath.Join(appStage, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			return nil, err
		}
		files = append(files, p+":"+name)
	}
	base, built, err := uRootBase(ctx, o, uroot, filepath.Join(stage, "uimage"))
	if err != nil {
		return nil, err
	}
	how = "cached"
	if built {
		how = "built"
	}
	step("u-root %s base (%s): %s", uroot, how, base)

	applianceCPIO := filepath.Join(o.OutDir, appliance.ImageAppliance)
	partial := applianceCPIO + ".partial"
	err = uimage.Create(llog.New(slog.LevelWarn, llog.WritePrintf(o.Log)),
		uimage.WithBaseFile(base),
		uimage.WithExistingInit(true),
		uimage.WithTempDir(stage),
		uimage.WithUinit("/"+appliance.Binary, "appliance"),
		uimage.WithFiles(files...),
		uimage.WithSkipLDD(),
		uimage.WithCPIOOutput(partial),
	)
	if err != nil {
		os.Remove(partial)
		return nil, fmt.Errorf("mkuimage: %w", err)
	}
	if err := os.Rename(partial, applianceCPIO); err != nil {
		return nil, err
	}
	step("wrote %s (%s)", applianceCPIO, sizeOf(applianceCPIO))

	version := fmt.Sprintf("kernel-package %s\nkernel-version %s\nkernel-release %s\nu-root %s\nmkuimage %s\nappliance-modules %s\nguest-modules %s\n",
		k.Package, k.Version, k.Release, uroot, o.MkUimage, names(appMods), names(guestMods))
	if err := os.WriteFile(filepath.Join(o.OutDir, appliance.ImageVersion), []byte(version), 0o644); err != nil {
		return nil, err
	}
	fmt.Fprintf(o.Log, "mkimage: done in %.1fs: %s, %s, %s, %s\n", time.Since(start).Seconds(),
		vmlinuz, applianceCPIO, guestCPIO, filepath.Join(o.OutDir, appliance.ImageVersion))
	return &Result{Kernel: k, Appliance: applianceCPIO, Guest: guestCPIO, Vmlinuz: vmlinuz, Builtin: builtin}, nil
}

func names(mods []Module) string {
	var s []string
	for _, m := range mods {
		s = append(s, m.Name)
	}
	return strings.Join(s, " ")
}

// uRootBase returns the u-root part of the appliance, the URootCommands in
// one busybox binary with /init, building it with mkuimage (gobusybox) into
// the cache unless a build for the same u-root, mkuimage and Go versions and
// commands is there; built says whether it was built now.
func uRootBase(ctx context.Context, o Options, uroot, tmp string) (path string, built bool, err error) {
	goVersion, err := exec.CommandContext(ctx, "go", "env", "GOVERSION").Output()
	if err != nil {
		return "", false, fmt.Errorf("go env GOVERSION: %w", cmdErr(err))
	}
	key := sha256.Sum256([]byte(strings.Join(append([]string{uroot, o.MkUimage, strings.TrimSpace(string(goVersion))}, URootCommands...), "\n")))
	path = filepath.Join(o.CacheDir, "uroot", fmt.Sprintf("uroot-%s-%x.cpio", uroot, key[:6]))
	if _, err := os.Stat(path); err == nil {
		return path, false, nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", false, err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", false, err
	}
	var cmds []string
	for _, c := range URootCommands {
		cmds = append(cmds, "github.com/u-root/u-root/cmds/core/"+c)
	}
	fmt.Fprintf(o.Log, "mkimage: building u-root %s (%s) with mkuimage\n", uroot, strings.Join(URootCommands, " "))
	partial := path + ".partial"
	err = uimage.Create(llog.New(slog.LevelWarn, llog.WritePrintf(o.Log)),
		uimage.WithEnv(golang.DisableCGO(), golang.WithWorkingDir(o.RepoDir)),
		uimage.WithTempDir(tmp),
		uimage.WithBusyboxCommands(cmds...),
		uimage.WithInit("init"),
		uimage.WithSkipLDD(),
		uimage.WithCPIOOutput(partial),
	)
	if err != nil {
		os.Remove(partial)
		return "", false, fmt.Errorf("mkuimage: %w", err)
	}
	// Old bases (other versions) are not needed any more.
	old, _ := filepath.Glob(filepath.Join(filepath.Dir(path), "uroot-*.cpio"))
	for _, f := range old {
		os.Remove(f)
	}
	return path, true, os.Rename(partial, path)
}

// goListVersion returns the version of module mod that go.mod in dir selects.
func goListVersion(ctx context.Context, dir, mod string) (string, error) {
	cmd := exec.CommandContext(ctx, "go", "list", "-m", "-f", "{{.Version}}", mod)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("go list -m %s: %w (is it in go.mod?)", mod, cmdErr(err))
	}
	return strings.TrimSpace(string(out)), nil
}

// goBuild builds a static binary of package pkg.
func goBuild(ctx context.Context, dir, out, pkg string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w: %s", pkg, err, strings.TrimSpace(string(b)))
	}
	return nil
}

// writeGuestCPIO writes the nested guests' initramfs: /init (guestinit),
// /dev/console, the mount points and the modules with their modules.dep.
func writeGuestCPIO(out, initBin, stage, release string, mods []Module) error {
	modFiles, err := StageModules(stage, release, mods)
	if err != nil {
		return err
	}
	initData, err := os.ReadFile(initBin)
	if err != nil {
		return err
	}
	recs := []cpio.Record{
		cpio.StaticRecord(initData, cpio.Info{Name: "init", Mode: cpio.S_IFREG | 0o755}),
		cpio.CharDev("dev/console", 0o600, 5, 1),
	}
	for _, f := range modFiles {
		b, err := os.ReadFile(filepath.Join(stage, filepath.FromSlash(f)))
		if err != nil {
			return err
		}
		recs = append(recs, cpio.StaticRecord(b, cpio.Info{Name: f, Mode: cpio.S_IFREG | 0o644}))
	}
	dirs := map[string]bool{"dev": true, "proc": true, "sys": true}
	for _, r := range recs {
		for d := path.Dir(r.Name); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var dl []string
	for d := range dirs {
		dl = append(dl, d)
	}
	sort.Strings(dl) // parents sort before their children
	var all []cpio.Record
	for _, d := range dl {
		all = append(all, cpio.Directory(d, 0o755))
	}
	all = append(all, recs...)
	partial := out + ".partial"
	f, err := os.Create(partial)
	if err != nil {
		return err
	}
	w := cpio.Newc.Writer(f)
	for _, r := range all {
		if err := w.WriteRecord(cpio.MakeReproducible(r)); err != nil {
			f.Close()
			return fmt.Errorf("%s: %w", out, err)
		}
	}
	if err := cpio.WriteTrailer(w); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(partial, out)
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o644)
}

func sizeOf(p string) string {
	fi, err := os.Stat(p)
	if err != nil {
		return "?"
	}
	return fmt.Sprintf("%.1f MiB", float64(fi.Size())/(1<<20))
}
