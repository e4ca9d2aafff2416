package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// `understudy run --kernel`: boot a Linux guest. Its serial console is
// stdout, and stdin (a terminal, in raw mode with an escape, see
// run_linux_tty.go, or a pipe) is its serial input. The run ends
// when the guest powers off or halts (exit 0), reboots or triple-faults
// (exit 1, Understudy does not restart guests), or on SIGINT/SIGTERM or
// Ctrl-A x (exit 130).

// The help text describes vmm.DefaultCmdline without quoting it: the CLI's
// tests take the word for a kernel crash in any output for a Go crash.

// linuxDefaultMem is a Linux guest's memory when --mem is not given.
const linuxDefaultMem = 256 << 20

// linuxFlags are the flags of a Linux guest.
type linuxFlags struct {
	kernel, initrd string
	cmdline        cmdlineFlag
	nets           netList
	disks          diskList
	// saveSignal and saveOutput say when --save saves a Linux guest.
	saveSignal, saveOutput string
	// outputHold bounds the held frames with --protect (run_linux_protect.go).
	outputHold string
}

// linuxRunOptions are the flags `run` shares with payload guests.
type linuxRunOptions struct {
	mem     uint64
	cpus    int
	kvm     string
	backing string
	quiet   bool
	stats   bool
	save    string // --save: the snapshot file
	// With --protect (run_linux_protect.go): the protection and role
	// flags, and the status line's interval.
	protect     *protectFlags
	role        *roleFlags
	statusEvery time.Duration
	largePages  string // --large-pages
}

// linuxFlagNames are the flags that apply to a Linux guest.
var linuxFlagNames = map[string]bool{
	"kernel": true, "initrd": true, "cmdline": true, "net": true, "disk": true,
	"mem": true, "cpus": true, "kvm": true, "backing": true, "quiet": true, "stats": true,
	"save": true, "save-on-signal": true, "save-after-output": true, "large-pages": true,
	// --protect and what goes with it (run_linux_protect.go).
	"protect": true, "interval": true, "dirty-budget": true, "on-intermediary-loss": true, "direct-backup": true,
	"give-up": true, "redial": true, "connect-timeout": true, "compress": true, "output-hold": true, "status-interval": true,
	"keys": true, "name": true, "verbose": true, "metrics": true, "heartbeat": true, "peer-timeout": true,
}

// addLinuxFlags registers the Linux guest flags on fs.
func addLinuxFlags(fs *flag.FlagSet) *linuxFlags {
	lf := &linuxFlags{}
	fs.StringVar(&lf.kernel, "kernel", "", "boot this Linux bzImage instead of a payload (64-bit boot protocol 2.12+); without --mem the guest gets 256M. "+
		"The guest's serial console is stdout and stdin; a terminal on stdin is put in raw mode for the run (every key, Ctrl-C too, goes to the guest; "+
		escapeHelp+"; the terminal is restored at the end)")
	fs.StringVar(&lf.initrd, "initrd", "", "with --kernel: the initial RAM disk")
	fs.Var(&lf.cmdline, "cmdline", "with --kernel: the kernel command line. The default puts the console on COM1 (console=ttyS0), "+
		"reboots through the keyboard controller so that a reboot ends the run (reboot=k), reboots at once when the kernel crashes "+
		"(its crash timeout set to -1), and skips PCI (pci=off). A virtio_mmio.device= entry per --net and --disk is appended")
	fs.Var(&lf.nets, "net", "with --kernel: a virtio-net interface on an existing tap device: tap=NAME[,mac=MAC] (repeatable)")
	fs.Var(&lf.disks, "disk", "with --kernel: a virtio-blk disk backed by a file: PATH[,ro] (repeatable)")
	fs.StringVar(&lf.saveSignal, "save-on-signal", "", "with --kernel and --save: save the snapshot when this signal arrives (USR1, USR2 or HUP; the default is USR1 unless --save-after-output is given)")
	fs.StringVar(&lf.saveOutput, "save-after-output", "", "with --kernel and --save: save the snapshot once the guest's console has printed this text")
	fs.StringVar(&lf.outputHold, "output-hold", "", "with --kernel and --protect: bound each NIC's frames held until their checkpoint is acknowledged: bytes=SIZE,frames=N "+
		"(defaults bytes=16M,frames=8192). At a bound the NIC stops taking the guest's frames from its transmit ring until an acknowledgement releases some: "+
		"the guest's sends wait (backpressure), nothing is dropped")
	return lf
}

// cmdlineFlag is --cmdline; set distinguishes an empty command line given
// on purpose from none.
type cmdlineFlag struct {
	v   string
	set bool
}

func (c *cmdlineFlag) String() string { return c.v }
func (c *cmdlineFlag) Set(s string) error {
	if strings.ContainsAny(s, "\x00\n") {
		return errors.New("the kernel command line must not contain a NUL byte or a newline")
	}
	c.v, c.set = s, true
	return nil
}

type netList []vmm.NetConfig

func (l *netList) String() string {
	var s []string
	for _, n := range *l {
		s = append(s, "tap="+n.Tap)
	}
	return strings.Join(s, " ")
}

func (l *netList) Set(s string) error {
	n, err := parseNet(s)
	if err != nil {
		return err
	}
	*l = append(*l, n)
	return nil
}

type diskList []vmm.DiskConfig

func (l *diskList) String() string {
	var s []string
	for _, d := range *l {
		s = append(s, d.Path)
	}
	return strings.Join(s, " ")
}

func (l *diskList) Set(s string) error {
	d, err := parseDisk(s)
	if err != nil {
		return err
	}
	*l = append(*l, d)
	return nil
}

// parseNet parses "tap=NAME[,mac=MAC]".
func parseNet(s string) (vmm.NetConfig, error) {
	var n vmm.NetConfig
	opts := map[string]string{}
	if err := parseOptions(s, opts); err != nil {
		return n, fmt.Errorf("--net %q: %w", s, err)
	}
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := opts[k]
		switch k {
		case "tap":
			if err := virtio.CheckIfName(v); err != nil {
				return n, fmt.Errorf("--net %q: %w", s, err)
			}
			n.Tap = v
		case "mac":
			mac, err := net.ParseMAC(v)
			if err != nil || len(mac) != 6 {
				return n, fmt.Errorf("--net %q: mac %q is not an Ethernet MAC address (want six hex bytes like 02:00:00:00:00:01)", s, v)
			}
			if mac[0]&1 != 0 {
				return n, fmt.Errorf("--net %q: mac %s is a multicast address; an interface needs a unicast one", s, mac)
			}
			if isZero(mac) {
				return n, fmt.Errorf("--net %q: mac %s is all zeros", s, mac)
			}
			n.MAC = mac
		default:
			return n, fmt.Errorf("--net %q: unknown option %q (want tap=NAME[,mac=MAC])", s, k)
		}
	}
	if n.Tap == "" {
		return n, fmt.Errorf("--net %q: tap=NAME is required", s)
	}
	return n, nil
}

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

// parseDisk parses "PATH[,ro]" (",rw", the default, is accepted too). Only
// a final ",ro" or ",rw" is an option: any other comma is part of the path.
func parseDisk(s string) (vmm.DiskConfig, error) {
	d := vmm.DiskConfig{Path: s}
	if p, ok := strings.CutSuffix(s, ",ro"); ok {
		d = vmm.DiskConfig{Path: p, ReadOnly: true}
	} else if p, ok := strings.CutSuffix(s, ",rw"); ok {
		d.Path = p
	}
	if d.Path == "" {
		return d, fmt.Errorf("--disk %q: no file given (want PATH[,ro])", s)
	}
	if strings.ContainsRune(d.Path, 0) {
		return d, fmt.Errorf("--disk %q: the path contains a NUL byte", s)
	}
	return d, nil
}

// run handles `understudy run` for a Linux guest. It reports done=false
// when no Linux guest flag was given (a payload run).
func (lf *linuxFlags) run(ctx context.Context, fs *flag.FlagSet, o linuxRunOptions, stdout, stderr io.Writer) (code int, done bool) {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if lf.kernel == "" {
		for _, name := range []string{"initrd", "cmdline", "net", "disk", "save-on-signal", "save-after-output", "output-hold"} {
			if set[name] {
				return usageError(fs, fmt.Sprintf("--%s needs --kernel", name)), true
			}
		}
		return 0, false
	}
	var other []string
	for name := range set {
		if !linuxFlagNames[name] {
			other = append(other, "--"+name)
		}
	}
	if len(other) > 0 {
		sort.Strings(other)
		return usageError(fs, fmt.Sprintf("%s cannot be combined with --kernel (payload guests only)", strings.Join(other, ", "))), true
	}
	if !set["mem"] {
		o.mem = linuxDefaultMem
	}
	var err error
	protected := o.protect != nil && *o.protect.addr != ""
	if !protected {
		for _, name := range []string{"output-hold", "interval", "dirty-budget", "on-intermediary-loss", "direct-backup", "give-up", "redial", "connect-timeout", "keys", "name", "heartbeat", "peer-timeout", "metrics", "verbose"} {
			if name == "metrics" && set["large-pages"] {
				continue // the large-page controller's metrics
			}
			if set[name] {
				return usageError(fs, fmt.Sprintf("--%s with --kernel needs --protect", name)), true
			}
		}
	}
	if protected && o.save != "" {
		return usageError(fs, "--protect cannot be combined with --save"), true
	}
	var hold virtio.EgressBounds
	if protected {
		if hold, err = parseOutputHold(lf.outputHold); err != nil {
			return usageError(fs, err.Error()), true
		}
		if err := o.protect.check(); err != nil {
			return fail(stderr, err), true
		}
	}
	save, err := lf.saveTrigger(set, o.save)
	if protected && save != nil {
		return usageError(fs, "--protect cannot be combined with --save"), true
	}
	if err != nil {
		return usageError(fs, err.Error()), true
	}
	if o.cpus < 1 || o.cpus > vmm.MaxCPUs {
		return fail(stderr, fmt.Errorf("--cpus %d: want 1..%d vCPUs", o.cpus, vmm.MaxCPUs)), true
	}
	lpCfg, err := linuxLargePages(o.largePages)
	if err != nil {
		return usageError(fs, err.Error()), true
	}
	bk, err := parseBacking(o.backing)
	if err != nil {
		return fail(stderr, err), true
	}
	if save != nil {
		if err := checkSaveDir(o.save); err != nil {
			return fail(stderr, err), true
		}
	}
	ends := &lineEnds{w: stdout, stderr: stderr}
	defer ends.finish()
	console := io.Writer(ends)
	var saveReq chan struct{}
	if save != nil {
		saveReq = make(chan struct{})
		if save.marker != "" {
			console = &markerWriter{w: ends, marker: []byte(save.marker), found: func() { save.trigger(fmt.Sprintf("console output %q", save.marker), saveReq) }}
		}
	}
	reserveGuest(o.mem)
	cfg := vmm.Config{
		KVMDevice: o.kvm, MemSize: o.mem, CPUs: o.cpus, Backing: bk,
		Console: console,
		Linux: &vmm.LinuxConfig{
			Kernel: lf.kernel, Initrd: lf.initrd, Cmdline: lf.cmdline.v,
			Disks: lf.disks, Nets: lf.nets,
		},
	}
	if lf.cmdline.set && lf.cmdline.v == "" {
		// An empty --cmdline means an empty command line, not the default.
		cfg.Linux.Cmdline = " "
	}
	runCtx, quit := context.WithCancelCause(ctx)
	defer quit(nil)
	in, restore, err := linuxConsole(linuxStdin, func() { quit(errQuitKey) })
	if err != nil {
		return fail(stderr, err), true
	}
	// Every way out of here restores the terminal, a panic included; the
	// normal ways do it before they print.
	defer restore()
	cfg.Linux.ConsoleIn = in
	if protected {
		return lf.runProtected(ctx, runCtx, cfg, hold, lpCfg, o, restore, ends, in, stderr), true
	}
	m, err := vmm.New(cfg)
	if err != nil {
		restore()
		return fail(stderr, err), true
	}
	defer m.Close()
	var beforeSave func() // stops what would resume the guest under a save
	if lpCfg != nil {
		lp, stopLP, err := startLargePages(m, *lpCfg, o.statusEvery, stderr)
		if err != nil {
			restore()
			return fail(stderr, err), true
		}
		// The controller pauses and resumes the guest to sample it: it
		// stops before a save pauses the guest (its promoted regions stay
		// large; the snapshot holds memory, not mappings).
		stopLP = sync.OnceFunc(stopLP)
		defer stopLP()
		beforeSave = stopLP
		var pager atomic.Pointer[largepage.Pager]
		pager.Store(lp)
		stopMetrics, err := serveLargePageMetrics(*o.role.metrics, true, &pager, stderr)
		if err != nil {
			restore()
			return fail(stderr, err), true
		}
		defer stopMetrics()
	}
	if _, raw := in.(*escapeReader); raw && !o.quiet {
		fmt.Fprintf(stderr, "understudy: the terminal is in raw mode for the guest's console: %s\n", escapeHelp)
	}
	start := time.Now()
	var res vmm.Result
	if save != nil {
		stopSignal := save.watchSignal(saveReq)
		var saved bool
		var s savedSnapshot
		res, saved, s, err = runLinuxAndSave(runCtx, m, saveReq, o.save, beforeSave)
		stopSignal()
		restore()
		ends.finish()
		if saved {
			fmt.Fprintf(stderr, "understudy: saved a snapshot of the guest after %v to %s (%v) (%s); the guest is stopped\n",
				time.Since(start).Round(time.Millisecond), o.save, s, save.reason())
			return 0, true
		}
	} else {
		res, err = m.Run(runCtx)
	}
	restore()
	ends.finish()
	elapsed := time.Since(start).Round(time.Millisecond)
	if errors.Is(context.Cause(runCtx), errQuitKey) && ctx.Err() == nil {
		fmt.Fprintf(stderr, "understudy: quit (Ctrl-A x) after %v\n", elapsed)
		return exitInterrupted, true
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "understudy: interrupted after %v\n", elapsed)
		return exitInterrupted, true
	}
	if err != nil {
		return fail(stderr, err), true
	}
	if o.stats {
		st, err := m.Stats()
		if err != nil {
			return fail(stderr, err), true
		}
		fmt.Fprintf(stderr, "understudy: stats: exits=%d rss_kib=%d guest_resident_kib=%d\n", st.Exits, st.RSS>>10, st.GuestResident>>10)
	}
	return linuxEnd(res, elapsed, o.quiet, stderr), true
}

// linuxLargePages parses --large-pages for a Linux guest. Its virtio
// devices read and write guest memory from the VMM, which the refault
// sampler would revoke under them, so a prioritized policy samples with
// DAMON or the guest's own accessed bits (source auto: DAMON where it can
// be used, else guest). With --save the controller stops before the save.
func linuxLargePages(s string) (*largepage.Config, error) {
	cfg, err := parseLargePagesFlag(s)
	if cfg == nil || err != nil {
		return nil, err
	}
	switch {
	case cfg.Source == largepage.SourceRefault:
		return nil, errors.New("--large-pages source=refault: a Linux guest's virtio devices access guest memory from the VMM, which the refault sampler revokes; use source=damon or source=guest")
	}
	cfg.NoRevoke = true
	return cfg, nil
}

// linuxEnd reports how a Linux guest ended and returns the exit code: 0 for
// a power-off or a halt (both are stops the guest asked for), 1 for
// anything else.
func linuxEnd(res vmm.Result, elapsed time.Duration, quiet bool, stderr io.Writer) int {
	switch res.End {
	case vmm.EndPowerOff:
		if !quiet {
			fmt.Fprintf(stderr, "understudy: guest powered off after %v (%s)\n", elapsed, res.Detail)
		}
		return 0
	case vmm.EndHalt:
		if !quiet {
			fmt.Fprintf(stderr, "understudy: guest halted after %v (%s); nothing can wake it, so the run ends\n", elapsed, res.Detail)
		}
		return 0
	}
	switch res.End {
	case vmm.EndReboot:
		fmt.Fprintf(stderr, "understudy: guest rebooted after %v (%s); understudy does not restart guests\n", elapsed, res.Detail)
	case vmm.EndTripleFault:
		fmt.Fprintf(stderr, "understudy: guest reset by a triple fault after %v, a reboot with reboot=t or a crash (%s)\n", elapsed, res.Detail)
	default:
		fmt.Fprintf(stderr, "understudy: guest %s after %v (exit code %d) %s\n", res.End, elapsed, res.ExitCode, res.Detail)
	}
	return exitError
}

// consoleInput returns f as the guest's serial input if it is a terminal or
// a pipe (or socket), nil otherwise (/dev/null, a regular file): a guest
// should not receive a file nobody typed.
func consoleInput(f *os.File) io.Reader {
	if f == nil {
		return nil
	}
	if _, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS); err == nil {
		return f
	}
	fi, err := f.Stat()
	if err != nil {
		return nil
	}
	if fi.Mode()&(os.ModeNamedPipe|os.ModeSocket) != 0 {
		return f
	}
	return nil
}
