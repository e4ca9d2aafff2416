package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// `understudy appliance` is the appliance image's uinit: u-root's init runs
// it once the kernel is up. It reads the role and its options from the
// kernel command line (understudy.role=..., understudy.OPT=...), loads the
// image's kernel modules in dependency order, reports what it found on the
// console (role, options, modules, KVM), runs the role, reports how it
// ended and powers the machine off.
//
// Every line it prints starts with applianceTag, so that a harness reading
// the serial console can find them among the kernel's.

const applianceTag = "understudy-appliance: "

// Paths inside the image, relative to its root (they match package
// initramfs, which writes them; this binary does not import it).
const (
	imageMarker     = "etc/understudy/image"
	imageModuleList = "etc/understudy/modules"
)

// Limits on what the command line may ask for.
const (
	maxTaps    = 8
	maxArgs    = 256
	maxTimeout = 24 * time.Hour
)

const applianceHelp = `The role and its options come from the kernel command line:
  understudy.role=ROLE         run, intermediary, backup or test (required)
  understudy.args="ARGS"       run, intermediary, backup: the role's flags, as for
                               "understudy ROLE ARGS"; group words with single quotes
  understudy.exec="CMD ARGS"   test: a command to run ("understudy" is this binary);
                               without it, test only reports and ends
  understudy.timeout=DUR       test: stop the command after DUR (default 10m)
  understudy.probe=tcp:A:P     test: while the command runs, connect to A:P until
                               it answers, and print the answer's first line
  understudy.testdisk=PATH:TEXT  test: create a 1 MiB file PATH with TEXT at offset 0
                               and TEXT@524288 at 512 KiB, before the command runs
  understudy.stdin=TEXT        test: the command's stdin is a pipe; once its output
                               shows a nested guest waiting for a line ("` + stdinPrompt + `"),
                               write TEXT and a newline to it
  understudy.tap=NAME[,A/N]    create tap device NAME (with IPv4 address A/N), up;
                               repeatable
  understudy.modules=M,M|none  modules to load instead of the image's list
`

// applianceConfig is what the kernel command line asks of the appliance.
type applianceConfig struct {
	role     string
	args     []string // role's flags, or test's command
	modules  []string // nil: the image's list
	noMods   bool     // understudy.modules=none
	taps     []tapSpec
	probe    netip.AddrPort // valid when asked for
	testDisk *testDisk
	stdin    string // "": the command's stdin is /dev/null
	timeout  time.Duration
}

type tapSpec struct {
	name string
	addr netip.Prefix // invalid: no address
}

type testDisk struct{ path, text string }

// textAt returns the text the test disk holds at off.
func (d *testDisk) textAt(off int64) string {
	if off == 0 {
		return d.text
	}
	return fmt.Sprintf("%s@%d", d.text, off)
}

// stdinPrompt is what understudy.stdin= waits for in the command's output
// before it writes: initramfs/guestinit's echo mode prints it once it
// reads from its serial console (bytes typed earlier, while the guest's
// serial driver starts, would be lost).
const stdinPrompt = "understudy-guest: echo: waiting for a line"

// testDiskOffsets are where a test disk holds its text; the guest init reads
// the same offsets.
var testDiskOffsets = []int64{0, 512 << 10}

const testDiskSize = 1 << 20

// parseApplianceConfig reads the understudy.* parameters of the kernel
// command line. Everything else is the kernel's or u-root's and is ignored.
func parseApplianceConfig(ps boot.Params) (applianceConfig, error) {
	c := applianceConfig{timeout: 10 * time.Minute}
	once := map[string]bool{}
	for _, p := range ps.WithPrefix("understudy.") {
		if p.Key != "tap" {
			if once[p.Key] {
				return c, fmt.Errorf("understudy.%s given twice", p.Key)
			}
			once[p.Key] = true
		}
		if !p.HasValue || strings.TrimSpace(p.Value) == "" {
			return c, fmt.Errorf("understudy.%s needs a value", p.Key)
		}
		v := p.Value
		var err error
		switch p.Key {
		case "role":
			switch v {
			case "run", "intermediary", "backup", "test":
				c.role = v
			default:
				return c, fmt.Errorf("understudy.role=%q: want run, intermediary, backup or test", v)
			}
		case "args", "exec":
			if c.args, err = splitArgs(v); err != nil {
				return c, fmt.Errorf("understudy.%s: %w", p.Key, err)
			}
		case "timeout":
			c.timeout, err = time.ParseDuration(v)
			if err != nil || c.timeout <= 0 || c.timeout > maxTimeout {
				return c, fmt.Errorf("understudy.timeout=%q: want a duration up to %v, as 10m", v, maxTimeout)
			}
		case "modules":
			if v == "none" {
				c.noMods = true
				continue
			}
			for _, m := range strings.Split(v, ",") {
				if !validModName(m) {
					return c, fmt.Errorf("understudy.modules: %q is not a module name", m)
				}
				c.modules = append(c.modules, boot.NormalizeModuleName(m))
			}
		case "tap":
			if len(c.taps) == maxTaps {
				return c, fmt.Errorf("understudy.tap: more than %d tap devices", maxTaps)
			}
			t, err := parseTapSpec(v)
			if err != nil {
				return c, err
			}
			for _, o := range c.taps {
				if o.name == t.name {
					return c, fmt.Errorf("understudy.tap: %s given twice", t.name)
				}
			}
			c.taps = append(c.taps, t)
		case "probe":
			rest, ok := strings.CutPrefix(v, "tcp:")
			if c.probe, err = netip.ParseAddrPort(rest); !ok || err != nil || c.probe.Port() == 0 {
				return c, fmt.Errorf("understudy.probe=%q: want tcp:ADDRESS:PORT, as tcp:192.0.2.2:7777", v)
			}
		case "testdisk":
			p, text, ok := strings.Cut(v, ":")
			if !ok || !path.IsAbs(p) || path.Clean(p) != p || p == "/" || len(p) > 256 || !validToken(text) {
				return c, fmt.Errorf("understudy.testdisk=%q: want /ABSOLUTE/PATH:TEXT, TEXT of 1..64 letters, digits, '.', '_' or '-'", v)
			}
			c.testDisk = &testDisk{path: p, text: text}
		case "stdin":
			if !validToken(v) {
				return c, fmt.Errorf("understudy.stdin=%q: want TEXT of 1..64 letters, digits, '.', '_' or '-'", v)
			}
			c.stdin = v
		default:
			return c, fmt.Errorf("unknown option understudy.%s", p.Key)
		}
	}
	switch {
	case c.role == "":
		return c, errors.New("no understudy.role= on the kernel command line")
	case c.role == "test" && once["args"]:
		return c, errors.New("understudy.role=test takes understudy.exec=, not understudy.args=")
	case c.role != "test" && once["exec"]:
		return c, fmt.Errorf("understudy.exec= is for understudy.role=test; %s takes understudy.args=", c.role)
	case c.role != "test" && (once["probe"] || once["testdisk"] || once["timeout"] || once["stdin"]):
		return c, fmt.Errorf("understudy.probe, testdisk, stdin and timeout are for understudy.role=test, not %s", c.role)
	case c.role == "test" && (c.probe.IsValid() || c.testDisk != nil || c.stdin != "") && len(c.args) == 0:
		return c, errors.New("understudy.probe, testdisk and stdin need a command: understudy.exec=")
	}
	return c, nil
}

func parseTapSpec(v string) (tapSpec, error) {
	name, addr, hasAddr := strings.Cut(v, ",")
	t := tapSpec{name: name}
	if err := boot.CheckIfName(name); err != nil {
		return t, fmt.Errorf("understudy.tap: %w", err)
	}
	if hasAddr {
		p, err := netip.ParsePrefix(addr)
		if err != nil || !p.Addr().Is4() || p.Bits() == 0 || p.Bits() == 32 {
			return t, fmt.Errorf("understudy.tap=%q: want NAME,A.B.C.D/N with N in 1..31", v)
		}
		t.addr = p
	}
	return t, nil
}

func validModName(s string) bool {
	if s == "" || len(s) > 56 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

func validToken(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// splitArgs splits a command line into words at spaces; single quotes group
// words with spaces ('console=ttyS0 quiet'). The kernel command line has
// already removed double quotes, so there is no other quoting.
func splitArgs(s string) ([]string, error) {
	var (
		args    []string
		cur     strings.Builder
		inWord  bool
		inQuote bool
	)
	for _, r := range s {
		switch {
		case r == '\'':
			inQuote = !inQuote
			inWord = true
		case (r == ' ' || r == '\t') && !inQuote:
			if inWord {
				args = append(args, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
		if len(args) > maxArgs {
			return nil, fmt.Errorf("more than %d words", maxArgs)
		}
	}
	if inQuote {
		return nil, errors.New("a single quote is not closed")
	}
	if inWord {
		args = append(args, cur.String())
	}
	if len(args) > maxArgs {
		return nil, fmt.Errorf("more than %d words", maxArgs)
	}
	return args, nil
}

// appliance is one run of the uinit. Paths are injected so that tests can
// run it outside the image.
type appliance struct {
	out     io.Writer
	cmdline string // the kernel command line file
	root    string // the image root
	cpuinfo string // /proc/cpuinfo
	kvmDev  string
	self    string // this binary, for "understudy" commands
}

func cmdAppliance(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("appliance", "appliance [--cmdline FILE] [--root DIR] [--kvm DEV] [--poweroff=false]", stderr)
	a := appliance{out: stdout, cpuinfo: "/proc/cpuinfo"}
	fs.StringVar(&a.cmdline, "cmdline", "/proc/cmdline", "the kernel command line to read")
	fs.StringVar(&a.root, "root", "/", "the image's root directory")
	fs.StringVar(&a.kvmDev, "kvm", arch.DefaultDevice, "KVM device")
	poweroff := fs.Bool("poweroff", true, "power the machine off when the role ends (only inside the appliance image)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: understudy appliance [flags]\n\nThe appliance image's uinit. %s\nFlags:\n", applianceHelp)
		fs.PrintDefaults()
	}
	if code, done := parseFlags(fs, args); done {
		return code
	}
	self, err := os.Executable()
	if err != nil {
		return fail(stderr, err)
	}
	a.self = self
	a.out = &lockedWriter{w: stdout}
	code := a.run(ctx)
	fmt.Fprintf(a.out, "%sdone status=%d\n", applianceTag, code)
	if *poweroff {
		if !a.inImage() {
			fmt.Fprintf(a.out, "%snot powering off: %s is not the appliance image (no %s)\n", applianceTag, a.root, imageMarker)
			return code
		}
		fmt.Fprintf(a.out, "%spowering off\n", applianceTag)
		drainConsole(stdout)
		if err := boot.PowerOff(); err != nil {
			fmt.Fprintf(a.out, "%s%v\n", applianceTag, err)
		}
	}
	return code
}

// drainConsole waits until a terminal w has sent everything written to it
// (tcdrain): the serial console's last lines must leave the UART before
// the machine powers off, which on a loaded host running QEMU with TCG
// they did not always.
func drainConsole(w io.Writer) {
	if f, ok := w.(*os.File); ok {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1)
	}
}

// lockedWriter serializes writes: the uinit, its probe and the command it
// runs all write to the console.
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
	fmt.Fprintf(a.out, applianceTag+format+"\n", args...)
}

func (a *appliance) path(rel string) string { return filepath.Join(a.root, filepath.FromSlash(rel)) }

// inImage reports whether root is the appliance image. Outside it the uinit
// neither loads modules, nor creates taps, nor powers off.
func (a *appliance) inImage() bool {
	_, err := os.Stat(a.path(imageMarker))
	return err == nil
}

// run does everything but powering off; it returns the status to report.
func (a *appliance) run(ctx context.Context) int {
	a.printf("starting: understudy %s", versionString())
	if b, err := os.ReadFile(a.path(imageMarker)); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			a.printf("image: %s", l)
		}
	}
	raw, err := os.ReadFile(a.cmdline)
	if err != nil {
		a.printf("error: %v", err)
		return exitError
	}
	params, err := boot.ParseCmdline(string(raw))
	if err != nil {
		a.printf("error: %v", err)
		return exitUsage
	}
	cfg, err := parseApplianceConfig(params)
	if err != nil {
		a.printf("error: %v", err)
		return exitUsage
	}
	a.printf("role %s", cfg.role)
	for _, p := range params.WithPrefix("understudy.") {
		a.printf("option %s=%q", p.Key, p.Value)
	}
	kvmModule := a.loadModules(cfg, params)
	a.reportKVM(kvmModule)
	if err := a.makeTaps(cfg.taps); err != nil {
		a.printf("error: %v", err)
		return exitError
	}
	a.printf("ready role=%s", cfg.role)
	switch cfg.role {
	case "test":
		return a.runTest(ctx, cfg)
	default:
		return a.runCommand(ctx, append([]string{"understudy", cfg.role}, cfg.args...), 0, nil, "")
	}
}

// loadModules loads the image's modules (or those the command line names)
// and returns the vendor KVM module it loaded, if any.
func (a *appliance) loadModules(cfg applianceConfig, params boot.Params) string {
	if cfg.noMods {
		a.printf("modules: none asked for")
		return ""
	}
	if !a.inImage() {
		a.printf("modules: not loaded: %s is not the appliance image", a.root)
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
		if names, err = readList(a.path(imageModuleList)); err != nil {
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
	flags := cpuFlags(a.cpuinfo)
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
	sys, err := arch.Open(a.kvmDev)
	if err != nil {
		a.printf("kvm: unavailable (module %s): %v", module, err)
		return
	}
	defer sys.Close()
	vm, err := sys.CreateVM()
	if err != nil {
		a.printf("kvm: unavailable (module %s): %s opens, API version 12, but KVM_CREATE_VM fails: %v", module, a.kvmDev, err)
		return
	}
	vm.Close()
	a.printf("kvm: usable: %s API version 12, VM created, module %s", a.kvmDev, module)
}

func (a *appliance) makeTaps(taps []tapSpec) error {
	for _, t := range taps {
		if !a.inImage() {
			a.printf("tap %s: not created: %s is not the appliance image", t.name, a.root)
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
		a.printf("tap %s: created, address %v, up", t.name, t.addr)
	}
	return nil
}

// runTest runs the test role: optional test disk, the command (with a
// timeout), and a probe while it runs.
func (a *appliance) runTest(ctx context.Context, cfg applianceConfig) int {
	if len(cfg.args) == 0 {
		return 0
	}
	if d := cfg.testDisk; d != nil {
		if err := writeTestDisk(d); err != nil {
			a.printf("error: %v", err)
			return exitError
		}
		a.printf("testdisk %s: %d bytes, %q at offset 0", d.path, testDiskSize, d.text)
	}
	var probe func(context.Context) error
	if cfg.probe.IsValid() {
		probe = func(ctx context.Context) error { return a.runProbe(ctx, cfg.probe) }
	}
	return a.runCommand(ctx, cfg.args, cfg.timeout, probe, cfg.stdin)
}

func writeTestDisk(d *testDisk) error {
	f, err := os.OpenFile(d.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("testdisk: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(testDiskSize); err != nil {
		return fmt.Errorf("testdisk: %w", err)
	}
	for _, off := range testDiskOffsets {
		if _, err := f.WriteAt([]byte(d.textAt(off)+"\n"), off); err != nil {
			return fmt.Errorf("testdisk: %w", err)
		}
	}
	return f.Close()
}

// runCommand runs argv (argv[0] "understudy" is this binary) with the
// console as its output, stopping it after timeout (0: never). probe, if
// set, runs while the command does; a failed probe fails the run. With
// stdin set, the command's stdin is a pipe that gets stdin and a newline
// once the command prints stdinPrompt; otherwise it is /dev/null.
func (a *appliance) runCommand(ctx context.Context, argv []string, timeout time.Duration, probe func(context.Context) error, stdin string) int {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	prog := argv[0]
	if prog == "understudy" {
		prog = a.self
	}
	cmd := exec.CommandContext(ctx, prog, argv[1:]...)
	cmd.Stdout, cmd.Stderr = a.out, a.out
	cmd.WaitDelay = 5 * time.Second
	if stdin != "" {
		in, err := cmd.StdinPipe() // closed by Wait once the command exits
		if err != nil {
			a.printf("exec: %v", err)
			return exitError
		}
		w := &promptWatcher{w: a.out, prompt: []byte(stdinPrompt)}
		w.fire = func() {
			// Not on the writer's goroutine: the pipe may be full.
			// Report first: once the line is written, the guest prints.
			a.printf("stdin: writing %q after the prompt", stdin)
			go func() {
				if _, err := io.WriteString(in, stdin+"\n"); err != nil {
					a.printf("stdin: %v", err)
				}
			}()
		}
		cmd.Stdout, cmd.Stderr = w, w
	}
	a.printf("exec: %s", strings.Join(quoteArgs(argv), " "))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		a.printf("exec: %v", err)
		return exitError
	}
	probeErr := make(chan error, 1)
	pctx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	if probe != nil {
		go func() { probeErr <- probe(pctx) }()
	} else {
		probeErr <- nil
	}
	err := cmd.Wait()
	stopProbe()
	perr := <-probeErr
	took := time.Since(start).Round(time.Millisecond)
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		a.printf("exec: stopped after the %v timeout", timeout)
		code = exitError
	case errors.As(err, &ee):
		code = ee.ExitCode()
		if code < 0 {
			code = exitError
		}
		a.printf("exec: exit status %d after %v (%v)", code, took, err)
	case err != nil:
		a.printf("exec: %v after %v", err, took)
		code = exitError
	default:
		a.printf("exec: exit status 0 after %v", took)
	}
	if perr != nil && code == 0 {
		code = exitError
	}
	return code
}

// promptWatcher passes writes through to w and calls fire once, at the end
// of the first line that contains prompt (wherever writes split it), after
// passing that line on.
type promptWatcher struct {
	w      io.Writer
	prompt []byte
	fire   func()

	mu    sync.Mutex // guards tail, seen and fired
	tail  []byte     // the last len(prompt)-1 bytes seen
	seen  bool       // the prompt is on the current line
	fired bool
}

func (p *promptWatcher) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fired {
		return p.w.Write(b)
	}
	if !p.seen {
		buf := append(p.tail, b...)
		if i := bytes.Index(buf, p.prompt); i >= 0 {
			p.seen, p.tail = true, nil
			// Where the prompt ends in b (it may have begun in tail).
			end := max(0, i+len(p.prompt)-(len(buf)-len(b)))
			return p.passLine(b, end)
		}
		keep := min(len(buf), len(p.prompt)-1)
		p.tail = append([]byte(nil), buf[len(buf)-keep:]...)
		return p.w.Write(b)
	}
	return p.passLine(b, 0)
}

// passLine writes b, firing after the first newline at or after from.
func (p *promptWatcher) passLine(b []byte, from int) (int, error) {
	nl := bytes.IndexByte(b[from:], '\n')
	if nl < 0 {
		return p.w.Write(b)
	}
	n, err := p.w.Write(b[:from+nl+1])
	if err != nil {
		return n, err
	}
	p.fired = true
	p.fire()
	m, err := p.w.Write(b[from+nl+1:])
	return n + m, err
}

func quoteArgs(argv []string) []string {
	out := slices.Clone(argv)
	for i, s := range out {
		if s == "" || strings.ContainsAny(s, " \t") {
			out[i] = "'" + s + "'"
		}
	}
	return out
}

// runProbe connects to addr until it answers or ctx ends (the command
// exited or timed out), and prints the first line of the answer.
func (a *appliance) runProbe(ctx context.Context, addr netip.AddrPort) error {
	var d net.Dialer
	start := time.Now()
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := d.DialContext(cctx, "tcp", addr.String())
		cancel()
		if err == nil {
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			line, rerr := bufio.NewReader(io.LimitReader(conn, 1024)).ReadString('\n')
			if rerr != nil && line == "" {
				a.printf("probe tcp:%v: connected after %v, no answer: %v", addr, time.Since(start).Round(time.Millisecond), rerr)
				return rerr
			}
			a.printf("probe tcp:%v: answer %q after %v", addr, strings.TrimSuffix(line, "\n"), time.Since(start).Round(time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			a.printf("probe tcp:%v: no connection before the command ended: %v", addr, err)
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}
