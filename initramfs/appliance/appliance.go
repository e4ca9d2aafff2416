package appliance

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// Statuses Run returns besides a command's own, as understudy's exit codes.
const (
	statusError = 1 // something failed
	statusUsage = 2 // the kernel command line asks for something wrong
)

// Options configure Run. Every path has the image's default when empty;
// tests point them elsewhere to run the uinit outside the image.
type Options struct {
	Out      io.Writer // the console; Run serializes its writes
	Cmdline  string    // the kernel command line file (/proc/cmdline)
	Root     string    // the image's root directory (/)
	CPUInfo  string    // /proc/cpuinfo, for the KVM vendor module
	KVM      string    // the KVM device (arch.DefaultDevice)
	Self     string    // the understudy binary, run for "understudy" commands
	Version  string    // understudy's version, for the first line
	PowerOff bool      // power the machine off at the end, inside the image only
}

// appliance is one run of the uinit.
type appliance struct {
	Options
}

// Run is the uinit: it reports, loads modules, creates taps, runs the role
// the kernel command line names, prints "done status=N" and, with
// o.PowerOff inside the image, powers the machine off. It returns the
// status it reported: the command's exit code, statusUsage for a bad
// command line, statusError for any other failure.
func Run(ctx context.Context, o Options) int {
	console := o.Out
	o.Cmdline = cmp.Or(o.Cmdline, "/proc/cmdline")
	o.Root = cmp.Or(o.Root, "/")
	o.CPUInfo = cmp.Or(o.CPUInfo, "/proc/cpuinfo")
	o.KVM = cmp.Or(o.KVM, arch.DefaultDevice)
	o.Out = &lockedWriter{w: console} // the uinit, its probe and the command it runs all write to it
	a := &appliance{Options: o}
	code := a.run(ctx)
	a.printf("done status=%d", code)
	if !o.PowerOff {
		return code
	}
	if !a.inImage() {
		a.printf("not powering off: %s is not the appliance image (no %s)", a.Root, Marker)
		return code
	}
	a.printf("powering off")
	boot.DrainConsole(console)
	if err := boot.PowerOff(); err != nil {
		a.printf("%v", err)
	}
	return code
}

// lockedWriter serializes writes.
type lockedWriter struct {
	mu sync.Mutex // guards w
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (a *appliance) printf(format string, args ...any) {
	fmt.Fprintf(a.Out, Tag+format+"\n", args...)
}

func (a *appliance) path(rel string) string { return filepath.Join(a.Root, filepath.FromSlash(rel)) }

// inImage reports whether the root is the appliance image. Outside it the
// uinit neither loads modules, nor creates taps, nor powers off.
func (a *appliance) inImage() bool {
	_, err := os.Stat(a.path(Marker))
	return err == nil
}

// run does everything but powering off; it returns the status to report.
func (a *appliance) run(ctx context.Context) int {
	a.printf("starting: understudy %s", a.Version)
	if b, err := os.ReadFile(a.path(Marker)); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			a.printf("image: %s", l)
		}
	}
	raw, err := os.ReadFile(a.Cmdline)
	if err != nil {
		a.printf("error: %v", err)
		return statusError
	}
	params, err := boot.ParseCmdline(string(raw))
	if err != nil {
		a.printf("error: %v", err)
		return statusUsage
	}
	// Without a role on the command line, a config disk names it: the
	// options are checked together once the disk (read after the modules,
	// virtio_blk among them) has been.
	cfg, err := parseParams(params)
	if err == nil && cfg.role != "" {
		err = cfg.check()
	}
	if err != nil {
		a.printf("error: %v", err)
		return statusUsage
	}
	if cfg.role != "" {
		a.printf("role %s", cfg.role)
	}
	for _, p := range params.WithPrefix("understudy.") {
		a.printf("option %s=%q", p.Key, p.Value)
	}
	kvmModule := a.loadModules(cfg, params)
	a.reportKVM(kvmModule)
	cmdlineRole := cfg.role
	if cfg.role != "test" {
		if err := a.applyConfigDisk(&cfg); err != nil {
			a.printf("error: %v", strings.TrimPrefix(err.Error(), errUsage.Error()+": "))
			if errors.Is(err, errUsage) {
				return statusUsage
			}
			return statusError
		}
	}
	if err := cfg.check(); err != nil {
		a.printf("error: %v", err)
		return statusUsage
	}
	if cmdlineRole == "" {
		a.printf("role %s", cfg.role) // the config disk's
	}
	if err := a.makeTaps(cfg.taps); err != nil {
		a.printf("error: %v", err)
		return statusError
	}
	if err := a.makeBridge(cfg.bridge); err != nil {
		a.printf("error: %v", err)
		return statusError
	}
	a.printf("ready role=%s", cfg.role)
	switch cfg.role {
	case "test":
		return a.runTest(ctx, cfg)
	default:
		return a.runCommand(ctx, command{argv: append([]string{"understudy", cfg.role}, cfg.args...), label: "exec", env: cfg.roleEnv()})
	}
}

// loadModules loads the image's modules (or those the command line names)
// and returns the vendor KVM module it loaded, if any.
func (a *appliance) loadModules(cfg config, params boot.Params) string {
	if cfg.noMods {
		a.printf("modules: none asked for")
		return ""
	}
	if !a.inImage() {
		a.printf("modules: not loaded: %s is not the appliance image", a.Root)
		return ""
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		a.printf("modules: %v", err)
		return ""
	}
	dir := a.path("lib/modules/" + unix.ByteSliceToString(u.Release[:]))
	f, err := os.Open(filepath.Join(dir, "modules.dep"))
	if err != nil {
		a.printf("modules: %v", err)
		return ""
	}
	dep, err := boot.ParseDepFile(f)
	f.Close()
	if err != nil {
		a.printf("modules: %v", err)
		return ""
	}
	names := cfg.modules
	if names == nil {
		if names, err = readList(a.path(ModuleList)); err != nil {
			a.printf("modules: %v", err)
			return ""
		}
	}
	names, vendor := a.pickKVMVendor(names)
	loaded := ""
	for _, r := range boot.LoadModules(dir, dep, names, params) {
		switch {
		case r.Err != nil:
			a.printf("module %s: not loaded: %v", r.Name, r.Err)
		case r.Already:
			a.printf("module %s: already loaded", r.Name)
		default:
			a.printf("module %s: loaded in %v%s", r.Name, r.Took.Round(time.Millisecond), paramNote(r.Params))
		}
		if r.Err == nil && r.Name == vendor {
			loaded = vendor
		}
	}
	return loaded
}

func paramNote(p string) string {
	if p == "" {
		return ""
	}
	return " with " + p
}

// pickKVMVendor keeps only the KVM module that the CPU can use (kvm_amd
// needs svm, kvm_intel needs vmx) and returns it.
func (a *appliance) pickKVMVendor(names []string) ([]string, string) {
	flags := cpuFlags(a.CPUInfo)
	vendor := ""
	switch {
	case flags["svm"]:
		vendor = "kvm_amd"
	case flags["vmx"]:
		vendor = "kvm_intel"
	}
	var out []string
	for _, n := range names {
		if (n == "kvm_amd" || n == "kvm_intel") && n != vendor {
			a.printf("module %s: skipped: the CPU has no %s", n, map[string]string{"kvm_amd": "svm", "kvm_intel": "vmx"}[n])
			continue
		}
		out = append(out, n)
	}
	return out, vendor
}

// cpuFlags returns the flags of the first processor in a cpuinfo file.
func cpuFlags(file string) map[string]bool {
	flags := map[string]bool{}
	b, err := os.ReadFile(file)
	if err != nil {
		return flags
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "flags" {
			for _, f := range strings.Fields(v) {
				flags[f] = true
			}
			break
		}
	}
	return flags
}

func readList(file string) ([]string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			if !validModName(l) {
				return nil, fmt.Errorf("%s: %q is not a module name", file, l)
			}
			out = append(out, boot.NormalizeModuleName(l))
		}
	}
	return out, nil
}

// reportKVM opens the KVM device (arch.Open checks KVM_GET_API_VERSION is
// 12) and creates a VM, which is what "usable" means here.
func (a *appliance) reportKVM(module string) {
	if module == "" {
		for _, m := range []string{"kvm_amd", "kvm_intel"} {
			if _, err := os.Stat("/sys/module/" + m); err == nil {
				module = m
			}
		}
	}
	if module == "" {
		module = "none loaded"
	}
	sys, err := arch.Open(a.KVM)
	if err != nil {
		a.printf("kvm: unavailable (module %s): %v", module, err)
		return
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		a.printf("kvm: unavailable (module %s): %s opens, API version 12, but KVM_CREATE_VM fails: %v", module, a.KVM, err)
		return
	}
	vm.Close()
	a.printf("kvm: usable: %s API version 12, VM created, module %s", a.KVM, module)
}

func (a *appliance) makeTaps(taps []tapSpec) error {
	for _, t := range taps {
		if !a.inImage() {
			a.printf("tap %s: not created: %s is not the appliance image", t.name, a.Root)
			continue
		}
		if err := boot.CreateTap(t.name); err != nil {
			return err
		}
		if t.addr.IsValid() {
			if err := boot.SetAddr(t.name, t.addr); err != nil {
				return err
			}
		}
		if err := boot.LinkUp(t.name); err != nil {
			return err
		}
		if t.addr.IsValid() {
			a.printf("tap %s: created, address %v, up", t.name, t.addr)
		} else {
			a.printf("tap %s: created, up", t.name)
		}
	}
	return nil
}

// portTimeout bounds the wait for a bridge port that is not there yet (the
// node's NIC, until its driver has probed it).
const portTimeout = 30 * time.Second

// makeBridge creates the bridge b asks for (if any), adds its ports, sets
// them up and gives the bridge its address.
func (a *appliance) makeBridge(b *bridgeSpec) error {
	if b == nil {
		return nil
	}
	if !a.inImage() {
		a.printf("bridge %s: not created: %s is not the appliance image", b.name, a.Root)
		return nil
	}
	if err := boot.CreateBridge(b.name); err != nil {
		return err
	}
	for _, p := range b.ports {
		if err := boot.WaitLink(p, portTimeout); err != nil {
			return fmt.Errorf("bridge %s: port %s: %w", b.name, p, err)
		}
		if err := boot.AddBridgePort(b.name, p); err != nil {
			return err
		}
		if err := boot.LinkUp(p); err != nil {
			return err
		}
	}
	if b.addr.IsValid() {
		if err := boot.SetAddr(b.name, b.addr); err != nil {
			return err
		}
	}
	for _, l := range []string{"lo", b.name} {
		if err := boot.LinkUp(l); err != nil {
			return err
		}
	}
	a.printf("bridge %s: created, ports %s, address %v, up", b.name, strings.Join(b.ports, " "), b.addr)
	return nil
}
