package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
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
  run       run a guest until it exits
  payloads  list the built-in payload guests and their options
  keys      make the cluster CA and node certificates (init, issue)
  version   print the version
  help      show this help

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
	case "payloads":
		return cmdPayloads(args[1:], stdout, stderr)
	case "keys":
		return cmdKeys(args[1:], stdout, stderr)
	case "version":
		return cmdVersion(args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return 0
	default:
		fmt.Fprintf(stderr, "understudy: unknown command %q\n\n%s", args[0], usageText)
		return exitUsage
	}
}

// newFlags returns a flag set that prints usage to stderr and reports errors
// instead of exiting.
func newFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: understudy %s\n\nFlags:\n", synopsis)
		fs.PrintDefaults()
	}
	return fs
}

// parseFlags parses args; it returns (exit code, true) when the command
// should end now (help or bad flags).
func parseFlags(fs *flag.FlagSet, args []string) (int, bool) {
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0, true
	}
	if err != nil {
		return exitUsage, true
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "understudy %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return exitUsage, true
	}
	return 0, false
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
	for _, kv := range strings.Split(s, ",") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" || strings.TrimSpace(v) == "" {
			return fmt.Errorf("%q: want key=value", kv)
		}
		if _, dup := into[k]; dup {
			return fmt.Errorf("option %s given twice", k)
		}
		into[k] = strings.TrimSpace(v)
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

func (s *sizeFlag) String() string { return vmm.FormatSize(s.v) }
func (s *sizeFlag) Set(v string) error {
	n, err := vmm.ParseSize(v)
	if err != nil {
		return err
	}
	s.v = n
	return nil
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("run", "run --payload NAME[,opt=value...] [--mem SIZE] [--cpus N] [--opt key=value...]", stderr)
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
	largePages := fs.String("large-pages", "", "large-page management: budget=N[,policy=prioritized|random|all|none,period=200ms,window=10ms,warmup=N,samples=8,per_window=32,alpha=0.5,hysteresis=1.5,seed=N]")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the large-page status line on stderr (0: only at the end)")
	stats := fs.Bool("stats", false, "print machine statistics (exits, RSS, guest memory resident) on stderr at the end")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "understudy: %v\n", err)
		return exitError
	}
	if *payloadArg == "" {
		fmt.Fprintf(stderr, "understudy run: --payload is required (built-in payloads: %s)\n", strings.Join(payload.Names(), ", "))
		return exitUsage
	}
	name, err := parsePayloadArg(*payloadArg, opts)
	if err != nil {
		return fail(err)
	}
	if *cpus < 1 {
		return fail(fmt.Errorf("--cpus %d: want 1..%d vCPUs", *cpus, vmm.MaxCPUs))
	}
	var lpCfg *vmm.LargePageConfig
	if *largePages != "" {
		c, err := vmm.ParseLargePages(*largePages)
		if err != nil {
			return fail(err)
		}
		lpCfg = &c
	}
	if *statusEvery < 0 {
		return fail(fmt.Errorf("--status-interval %v: must not be negative", *statusEvery))
	}
	var bk mmu.Backing
	switch *backing {
	case "anon", "anonymous":
		bk = mmu.Anonymous
	case "memfd":
		bk = mmu.Memfd
	default:
		return fail(fmt.Errorf("--backing %q: want anon or memfd", *backing))
	}

	var recW *bufio.Writer
	if *records != "" {
		w := stdout
		if *records != "-" {
			f, err := os.Create(*records)
			if err != nil {
				return fail(err)
			}
			defer f.Close()
			w = f
		}
		recW = bufio.NewWriter(w)
		defer recW.Flush()
	}
	cfg := vmm.Config{
		KVMDevice: *kvmDev, MemSize: mem.v, CPUs: *cpus, Backing: bk,
		Payload: name, PayloadOptions: opts, Console: stdout,
	}
	if recW != nil {
		cfg.OnRecord = func(r vmm.Record) { recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n") }
	}
	m, err := vmm.New(cfg)
	if err != nil {
		return fail(err)
	}
	defer m.Close()
	var lp *vmm.LargePager
	if lpCfg != nil {
		if lp, err = m.StartLargePages(*lpCfg); err != nil {
			return fail(err)
		}
		stopStatus := printStatus(stderr, lp, *statusEvery)
		defer func() {
			stopStatus()
			fmt.Fprintf(stderr, "understudy: %s\n", lp.Stop())
		}()
	}
	start := time.Now()
	res, err := m.Run(ctx)
	elapsed := time.Since(start)
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "understudy: interrupted after %v (%d output records)\n", elapsed.Round(time.Millisecond), res.Records)
		return exitInterrupted
	}
	if err != nil {
		return fail(err)
	}
	if *stats {
		st, err := m.Stats()
		if err != nil {
			return fail(err)
		}
		fmt.Fprintf(stderr, "understudy: stats: exits=%d rss_kib=%d guest_resident_kib=%d\n", st.Exits, st.RSS>>10, st.GuestResident>>10)
	}
	if !*quiet {
		fmt.Fprintf(stderr, "understudy: guest exited with code %d after %v (%d output records)\n", res.ExitCode, elapsed.Round(time.Millisecond), res.Records)
	}
	if res.ExitCode < 0 || res.ExitCode > 255 {
		return exitError
	}
	return res.ExitCode
}

// printStatus prints lp's status line every interval until the returned
// function is called.
func printStatus(w io.Writer, lp *vmm.LargePager, every time.Duration) func() {
	if every <= 0 {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fmt.Fprintf(w, "understudy: %s\n", lp.Status())
			}
		}
	}()
	return func() { close(done); <-finished }
}
