package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/payload"
)

// version is set at link time (-ldflags "-X main.version=...").
var version = ""

// Exit codes besides the guest's own.
const (
	exitError       = 1
	exitUsage       = 2
	exitInterrupted = 130
)

const usageText = `Understudy keeps a guest VM alive through the loss of its host.

Usage:
  understudy <command> [flags]

Commands:
  run           run a guest until it exits (--save: snapshot it; --protect: keep it alive)
  restore       restore a snapshot and run the guest to its end
  intermediary  receive a protected guest's checkpoints, forward them to the backup, fail over
  backup        hold the replicated guest and resume it when the intermediary activates it
  payloads      list the built-in payload guests and their options
  keys          make the cluster CA and node certificates (init, issue)
  node-config   write a node's config disk: its role, flags, keys and files, for the appliance
  appliance     the appliance image's init: run the role the kernel command line names
  version       print the version
  help          show this help

Run "understudy <command> --help" for a command's flags.
`

// run is the whole program, minus process setup, so tests can call it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return exitUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:], stdout, stderr)
	case "restore":
		return cmdRestore(ctx, args[1:], stdout, stderr)
	case "payloads":
		return cmdPayloads(args[1:], stdout, stderr)
	case "intermediary":
		return cmdIntermediary(ctx, args[1:], stdout, stderr)
	case "backup":
		return cmdBackup(ctx, args[1:], stdout, stderr)
	case "keys":
		return cmdKeys(args[1:], stdout, stderr)
	case "node-config":
		return cmdNodeConfig(args[1:], stdout, stderr)
	case "appliance":
		return cmdAppliance(ctx, args[1:], stdout, stderr)
	case "version":
		return cmdVersion(args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return 0
	default:
		fmt.Fprintf(stderr, "understudy: unknown command %q\nrun 'understudy help' for the commands\n", args[0])
		return exitUsage
	}
}

// newFlags returns a flag set for command name whose --help prints the
// whole usage on stderr; parseFlags reports a bad flag in one line.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: understudy %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args; it returns (exit code, true) when the command
// should end now (help or bad flags). --help prints the whole usage; a bad
// flag or argument one error line and a hint (usageError).
func parseFlags(fs *flag.FlagSet, args []string) (int, bool) {
	// The flag package would print the error and then the whole usage.
	out, usage := fs.Output(), fs.Usage
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	fs.SetOutput(out)
	fs.Usage = usage
	if errors.Is(err, flag.ErrHelp) {
		fs.Usage()
		return 0, true
	}
	if err != nil {
		return usageError(fs, err.Error()), true
	}
	if fs.NArg() > 0 {
		return usageError(fs, fmt.Sprintf("unexpected argument %q", fs.Arg(0))), true
	}
	return 0, false
}

// usageError prints msg as the one error line of command fs, then a hint
// to its help, and returns the usage exit code.
func usageError(fs *flag.FlagSet, msg string) int {
	fmt.Fprintf(fs.Output(), "understudy %s: %s\nrun 'understudy %s --help' for its flags\n", fs.Name(), msg, fs.Name())
	return exitUsage
}

func cmdVersion(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("version", "version", stderr)
	if code, done := parseFlags(fs, args); done {
		return code
	}
	fmt.Fprintf(stdout, "understudy %s\n", versionString())
	return 0
}

func versionString() string {
	if version != "" {
		return version
	}
	v := "devel"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " " + s.Value[:12]
			}
			if s.Key == "vcs.modified" && s.Value == "true" {
				v += "+dirty"
			}
		}
		v += " " + bi.GoVersion
	}
	return v
}

func cmdPayloads(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("payloads", "payloads", stderr)
	if code, done := parseFlags(fs, args); done {
		return code
	}
	for _, s := range payload.All() {
		fmt.Fprintf(stdout, "%s: %s\n", s.Name, s.Summary)
		for _, o := range s.Options {
			fmt.Fprintf(stdout, "    %-14s %s (default %d)\n", o.Name, o.Help, o.Default)
		}
	}
	return 0
}

// optList collects repeated --opt key=value[,key=value] flags.
type optList map[string]string

func (o optList) String() string {
	var s []string
	for k, v := range o {
		s = append(s, k+"="+v)
	}
	sort.Strings(s)
	return strings.Join(s, ",")
}

func (o optList) Set(v string) error { return parseOptions(v, o) }

// parseOptions adds comma-separated key=value pairs from s to into.
func parseOptions(s string, into map[string]string) error {
	pairs, err := option.List{SkipEmpty: true}.Parse(s)
	if err != nil {
		return err
	}
	for _, p := range pairs {
		if _, dup := into[p.Key]; dup {
			return fmt.Errorf("option %s given twice", p.Key)
		}
		into[p.Key] = p.Value
	}
	return nil
}

// parsePayloadArg splits "NAME[,key=value...]" into a name and options.
func parsePayloadArg(s string, into map[string]string) (string, error) {
	name, rest, _ := strings.Cut(s, ",")
	name = strings.TrimSpace(name)
	if name == "" {
		return "", fmt.Errorf("--payload: empty payload name")
	}
	if err := parseOptions(rest, into); err != nil {
		return "", fmt.Errorf("--payload: %w", err)
	}
	return name, nil
}

type sizeFlag struct{ v uint64 }

func (s *sizeFlag) String() string { return option.FormatSize(s.v) }
func (s *sizeFlag) Set(v string) error {
	n, err := option.ParseSize(v)
	if err != nil {
		return err
	}
	s.v = n
	return nil
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", "run --payload NAME[,opt=value...] [--mem SIZE] [--cpus N] [--opt key=value...] [--save FILE --save-after N]\n   or: understudy run --kernel PATH [--initrd PATH] [--cmdline S] [--mem SIZE] [--cpus N] [--net tap=NAME,mac=M] [--disk PATH[,ro]] [--large-pages ...] [--save FILE [--save-on-signal USR1] [--save-after-output TEXT]]\n   or: understudy run --kernel PATH ... --protect ADDR --keys DIR [--output-hold bytes=SIZE,frames=N] [the --protect flags]", stderr)
	payloadArg := fs.String("payload", "", "payload guest: a built-in name (see `understudy payloads`) or a path to a flat binary")
	mem := &sizeFlag{v: 128 << 20}
	fs.Var(mem, "mem", "guest memory, e.g. 256M or 1G (a multiple of 2 MiB)")
	cpus := fs.Int("cpus", 1, fmt.Sprintf("number of vCPUs (1..%d)", vmm.MaxCPUs))
	opts := optList{}
	fs.Var(opts, "opt", "payload option key=value (repeatable; comma-separated lists allowed)")
	records := fs.String("records", "", "write output records to this file, one decimal value per line (\"-\": stdout)")
	backing := fs.String("backing", "anon", "guest memory backing: anon or memfd")
	kvmDev := fs.String("kvm", "/dev/kvm", "KVM device")
	quiet := fs.Bool("quiet", false, "do not print the summary line on stderr")
	largePages := fs.String("large-pages", "", "large-page management: budget=N[,policy=prioritized|random|all|none,period=200ms,window=10ms,warmup=N,samples=8,per_window=32,alpha=0.5,hysteresis=1.5,seed=N,source=auto|damon|refault|guest,exit-detect=none|min-va|consecutive|both,exit-audit=VA]"+
		"; source auto samples with the kernel's DAMON where it has virtual-address operations and is free, else by revoking pages and counting refaults (guest: only the guest's own page-table accessed bits); exit-detect reads the guest page tables through shadow copies and stops counting exiting processes; "+
		"exit-audit (a measuring aid) runs all four exit-detect modes side by side and scores their decisions by the tag page (largepage.LiveTag) the guest's long-lived processes keep at VA. "+
		"A Linux guest (--kernel) is never sampled by revoking pages: auto is DAMON, else guest")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the large-page or protection status line on stderr (0: only at the end)")
	stats := fs.Bool("stats", false, "print machine statistics (exits, RSS, guest memory resident) on stderr at the end")
	save := fs.String("save", "", "save a snapshot (machine state and all guest memory) to this file, then stop: a payload guest once it has emitted --save-after output records, "+
		"a Linux guest (--kernel) on --save-on-signal (SIGUSR1 unless --save-after-output is given) or --save-after-output")
	saveAfter := fs.Uint64("save-after", 0, "with --save: the number of output records after which to save")
	pf := addProtectFlags(fs)
	protect := pf.addr
	rf := addRoleFlags(fs, "primary")
	lf := addLinuxFlags(fs)
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if code, done := lf.run(ctx, fs, linuxRunOptions{mem: mem.v, cpus: *cpus, kvm: *kvmDev, backing: *backing, quiet: *quiet, stats: *stats, save: *save,
		protect: &pf, role: &rf, statusEvery: *statusEvery, largePages: *largePages}, stdout, stderr); done {
		return code
	}
	if *protect != "" && *save != "" {
		return usageError(fs, "--protect cannot be combined with --save")
	}
	if err := pf.check(); err != nil {
		return fail(stderr, err)
	}
	if *payloadArg == "" {
		return usageError(fs, fmt.Sprintf("--payload is required (built-in payloads: %s)", strings.Join(payload.Names(), ", ")))
	}
	if (*save == "") != (*saveAfter == 0) {
		return usageError(fs, "--save FILE and --save-after N (N > 0) go together")
	}
	if *save != "" && *largePages != "" {
		return usageError(fs, "--save cannot be combined with --large-pages (sampling revokes access to guest memory)")
	}
	name, err := parsePayloadArg(*payloadArg, opts)
	if err != nil {
		return fail(stderr, err)
	}
	if *cpus < 1 {
		return fail(stderr, fmt.Errorf("--cpus %d: want 1..%d vCPUs", *cpus, vmm.MaxCPUs))
	}
	lpCfg, err := parseLargePagesFlag(*largePages)
	if err != nil {
		return fail(stderr, err)
	}
	if *statusEvery < 0 {
		return fail(stderr, fmt.Errorf("--status-interval %v: must not be negative", *statusEvery))
	}
	bk, err := parseBacking(*backing)
	if err != nil {
		return fail(stderr, err)
	}
	if *save != "" {
		// Find a bad destination before the guest runs, not when saving.
		if fi, err := os.Stat(filepath.Dir(*save)); err != nil || !fi.IsDir() {
			return fail(stderr, fmt.Errorf("--save %s: no directory %s to save into", *save, filepath.Dir(*save)))
		}
	}
	recW, closeRecords, err := openRecords(*records, stdout)
	if err != nil {
		return fail(stderr, err)
	}
	defer closeRecords()

	reserveGuest(mem.v)
	cfg := vmm.Config{
		KVMDevice: *kvmDev, MemSize: mem.v, CPUs: *cpus, Backing: bk, Console: stdout,
		Payload: &vmm.PayloadConfig{Name: name, Options: opts},
	}
	// beside starts what runs beside the guest (the large-page controller)
	// and returns the function that stops it once the guest has stopped;
	// that function also reads the machine's statistics for --stats.
	var (
		st    vmm.Stats
		stErr error
		// pager is the large-page controller, once started: with
		// --protect each checkpoint carries its heat to the backup.
		pager  atomic.Pointer[largepage.Pager]
		beside = func(m *vmm.Machine) (func(), error) {
			stopLP := func() {}
			if lpCfg != nil {
				lp, stop, err := startLargePages(m, *lpCfg, *statusEvery, stderr)
				if err != nil {
					return nil, err
				}
				pager.Store(lp)
				stopLP = stop
			}
			return func() {
				if *stats {
					st, stErr = m.Stats()
				}
				stopLP()
			}, nil
		}
	)
	start := time.Now()
	var res vmm.Result
	if *protect != "" {
		links, log, lerr := rf.links("primary", stderr)
		if lerr != nil {
			return fail(stderr, lerr)
		}
		heat := func(dirty []uint64) []byte {
			if lp := pager.Load(); lp != nil {
				return lp.CheckpointHeat(dirty)
			}
			return nil
		}
		var more func() []ft.Metric
		if lpCfg != nil {
			more = func() []ft.Metric { return largePageMetrics(pager.Load()) }
		}
		res, err = runPrimary(ctx, cfg, pf, links, log, *rf.metrics, more, *statusEvery, beside, heat, recW)
	} else {
		stopMetrics, merr := serveLargePageMetrics(*rf.metrics, lpCfg != nil, &pager, stderr)
		if merr != nil {
			return fail(stderr, merr)
		}
		defer stopMetrics()
		var saved bool
		res, saved, err = runMachine(ctx, cfg, beside, recW, *save, *saveAfter, stderr)
		if err == nil && *save != "" {
			if !saved {
				return fail(stderr, fmt.Errorf("guest exited with code %d after %d output records, before --save-after %d: no snapshot saved", res.ExitCode, res.Records, *saveAfter))
			}
			return 0
		}
	}
	elapsed := time.Since(start)
	if code, done := runFailed(res, err, elapsed, stderr); done {
		return code
	}
	if *stats {
		if stErr != nil {
			return fail(stderr, stErr)
		}
		fmt.Fprintf(stderr, "understudy: stats: exits=%d rss_kib=%d guest_resident_kib=%d\n", st.Exits, st.RSS>>10, st.GuestResident>>10)
	}
	if !*quiet {
		fmt.Fprintf(stderr, "understudy: guest exited with code %d after %v (%d output records)\n", res.ExitCode, elapsed.Round(time.Millisecond), res.Records)
	}
	return guestExitCode(res)
}

// runPrimary runs the guest of cfg protected through the intermediary at
// --protect: released records (those a client may see) are written through
// to recW at once, so that the file is true even if this process is killed.
// heat gives each checkpoint the large-page controller's heat (nil: none).
func runPrimary(ctx context.Context, cfg vmm.Config, pf protectFlags, links ft.LinkConfig, log *slog.Logger, metrics string, moreMetrics func() []ft.Metric,
	statusEvery time.Duration, beside func(*vmm.Machine) (func(), error), heat func([]uint64) []byte, recW *bufio.Writer) (vmm.Result, error) {
	policy, _ := ft.ParseLinkLossPolicy(*pf.onLoss) // checked
	budget, _ := pf.dirtyBudget()                   // checked
	compress, _ := pf.compression()                 // checked
	return ft.RunPrimary(ctx, ft.PrimaryRunConfig{
		Machine: cfg,
		Epochs: ft.PrimaryConfig{Interval: *pf.interval, DirtyBudget: budget, OnLinkLoss: policy, GiveUp: *pf.giveUp, Redial: *pf.redial, Heat: heat, Compression: compress,
			OnRelease: func(r vmm.Record) {
				if recW != nil {
					recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
					recW.Flush()
				}
			}},
		Intermediary: *pf.addr, ConnectTimeout: *pf.connect, DirectBackup: *pf.direct, Links: links, Log: log,
		StatusEvery: statusEvery, Metrics: metrics, MoreMetrics: moreMetrics, OnStart: beside,
	})
}

// runMachine runs the guest of cfg unprotected; with save, it saves a
// snapshot once the guest has emitted saveAfter output records, and stops
// it (saved reports whether it did).
func runMachine(ctx context.Context, cfg vmm.Config, beside func(*vmm.Machine) (func(), error), recW *bufio.Writer,
	save string, saveAfter uint64, stderr io.Writer) (res vmm.Result, saved bool, err error) {
	var m *vmm.Machine
	var saveReq chan struct{}
	var emitted atomic.Uint64
	if save != "" {
		saveReq = make(chan struct{})
	}
	if recW != nil || saveReq != nil {
		cfg.Payload.OnRecord = func(r vmm.Record) {
			if recW != nil {
				recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
			}
			// Stop the guest right after record N: RequestPause does not
			// block this vCPU thread, and no vCPU enters the guest again.
			if saveReq != nil && emitted.Add(1) == saveAfter {
				m.RequestPause()
				close(saveReq)
			}
		}
	}
	if m, err = vmm.New(cfg); err != nil {
		return vmm.Result{}, false, err
	}
	defer m.Close()
	stop, err := beside(m)
	if err != nil {
		return vmm.Result{}, false, err
	}
	defer stop()
	if saveReq == nil {
		res, err = m.Run(ctx)
		return res, false, err
	}
	return runAndSave(ctx, m, saveReq, save, stderr)
}

// fail prints err as the one error line and returns the error exit code.
func fail(stderr io.Writer, err error) int {
	fmt.Fprintf(stderr, "understudy: %v\n", err)
	return exitError
}

// runFailed reports a Run that did not end with the guest's exit: it
// returns the exit code and true if Run was interrupted or failed.
func runFailed(res vmm.Result, err error, elapsed time.Duration, stderr io.Writer) (int, bool) {
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "understudy: interrupted after %v (%d output records)\n", elapsed.Round(time.Millisecond), res.Records)
		return exitInterrupted, true
	}
	if err != nil {
		return fail(stderr, err), true
	}
	return 0, false
}

// guestExitCode maps the guest's exit code to the process's.
func guestExitCode(res vmm.Result) int {
	if res.ExitCode < 0 || res.ExitCode > 255 {
		return exitError
	}
	return res.ExitCode
}

func parseBacking(s string) (mmu.Backing, error) {
	switch s {
	case "anon", "anonymous":
		return mmu.Anonymous, nil
	case "memfd":
		return mmu.Memfd, nil
	}
	return 0, fmt.Errorf("--backing %q: want anon or memfd", s)
}

// openRecords opens the --records destination (nothing for "", stdout for
// "-"). The returned function flushes and closes it.
func openRecords(path string, stdout io.Writer) (*bufio.Writer, func(), error) {
	if path == "" {
		return nil, func() {}, nil
	}
	if path == "-" {
		w := bufio.NewWriter(stdout)
		return w, func() { w.Flush() }, nil
	}
	f, err := os.Create(path)
	if err != nil {
		return nil, nil, err
	}
	w := bufio.NewWriter(f)
	return w, func() { w.Flush(); f.Close() }, nil
}

// printStatus prints lp's status line every interval until the returned
// function is called.
// parseLargePagesFlag parses a --large-pages value ("": nil, off).
func parseLargePagesFlag(s string) (*largepage.Config, error) {
	if s == "" {
		return nil, nil
	}
	c, err := largepage.Parse(s)
	if err != nil {
		return nil, err
	}
	return &c, nil
}

// startLargePages starts the large-page controller on m, says which
// sampler it uses, and prints its status line every statusEvery. The
// function it returns stops it and prints its last status line (and the
// exit-detect audit's lines, with exit-audit).
func startLargePages(m *vmm.Machine, cfg largepage.Config, statusEvery time.Duration, stderr io.Writer) (*largepage.Pager, func(), error) {
	lp, err := largepage.Start(m, cfg)
	if err != nil {
		return nil, nil, err
	}
	if st := lp.Status(); st.Source != "" {
		fmt.Fprintf(stderr, "understudy: large pages: sampling with %s", st.Source)
		if st.NoDAMON != "" {
			fmt.Fprintf(stderr, " (%s)", st.NoDAMON)
		}
		fmt.Fprintln(stderr)
	}
	stopStatus := printStatus(stderr, lp, statusEvery)
	return lp, func() {
		stopStatus()
		st := lp.Stop()
		fmt.Fprintf(stderr, "understudy: %s\n", st)
		for _, r := range st.Audit {
			fmt.Fprintf(stderr, "understudy: exit-detect audit: %s\n", r)
		}
	}, nil
}

func printStatus(w io.Writer, lp *largepage.Pager, every time.Duration) func() {
	if every <= 0 {
		return func() {}
	}
	return ft.Every(every, func() { fmt.Fprintf(w, "understudy: %s\n", lp.Status()) })
}
