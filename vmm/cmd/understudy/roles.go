package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// The fault-tolerance roles: `run --protect` (primary), `intermediary` and
// `backup`. Links are mutual TLS with the certificates of `understudy keys`.

// flagAdder is what the role flags need of a flag set.
type flagAdder interface {
	String(name, value, usage string) *string
	Bool(name string, value bool, usage string) *bool
	Duration(name string, value time.Duration, usage string) *time.Duration
}

// roleFlags are the flags every role shares.
type roleFlags struct {
	keys, name, metrics    *string
	verbose                *bool
	heartbeat, peerTimeout *time.Duration
}

func addRoleFlags(fs flagAdder, role string) roleFlags {
	return roleFlags{
		keys:        fs.String("keys", "", "directory with the cluster CA and this node's key and certificate (understudy keys)"),
		name:        fs.String("name", role, "this node's name (its certificate files are NAME.crt and NAME.key)"),
		verbose:     fs.Bool("verbose", false, "log link events on stderr"),
		metrics:     fs.String("metrics", "", "serve Prometheus metrics over HTTP at this host:port (e.g. 127.0.0.1:9401)"),
		heartbeat:   fs.Duration("heartbeat", transport.DefaultHeartbeat, "send a heartbeat on a link idle this long"),
		peerTimeout: fs.Duration("peer-timeout", transport.DefaultPeerTimeout, "declare a peer lost after this long without a message from it"),
	}
}

func (r roleFlags) config(role wire.Role, memSize uint64, stderr io.Writer) (*transport.Config, error) {
	if *r.keys == "" {
		return nil, fmt.Errorf("--keys DIR is required (make one with `understudy keys init` and `understudy keys issue`)")
	}
	if *r.heartbeat <= 0 || *r.peerTimeout <= *r.heartbeat {
		return nil, fmt.Errorf("--heartbeat %v and --peer-timeout %v: both positive, and the timeout longer than the heartbeat", *r.heartbeat, *r.peerTimeout)
	}
	creds, err := transport.LoadCredentials(*r.keys, *r.name)
	if err != nil {
		return nil, err
	}
	level := slog.LevelWarn
	if *r.verbose {
		level = slog.LevelInfo
	}
	return &transport.Config{Credentials: creds, Hello: wire.Hello{Role: role, MemSize: memSize},
		Heartbeat: *r.heartbeat, PeerTimeout: *r.peerTimeout,
		Logger: slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))}, nil
}

// serveMetrics serves collect's metrics at r's --metrics address, if set.
// The returned function stops the server.
func (r roleFlags) serveMetrics(collect func() []ft.Metric, stderr io.Writer) (func(), error) {
	if *r.metrics == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", *r.metrics)
	if err != nil {
		return nil, fmt.Errorf("--metrics %s: %w", *r.metrics, err)
	}
	srv := &http.Server{Handler: ft.MetricsHandler(collect), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	fmt.Fprintf(stderr, "understudy: metrics at http://%s/metrics\n", ln.Addr())
	return func() { srv.Close() }, nil
}

// dialer returns a Dialer for addr with cfg, each attempt bounded.
func dialer(addr string, cfg *transport.Config) ft.Dialer {
	return func(ctx context.Context) (ft.MessageConn, error) {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return transport.Dial(dctx, addr, cfg)
	}
}

// protectFlags are `run`'s flags for protecting the guest.
type protectFlags struct {
	addr     *string
	interval *time.Duration
	budget   *string
	onLoss   *string
	direct   *string
	giveUp   *time.Duration
	redial   *time.Duration
}

func addProtectFlags(fs flagAdder) protectFlags {
	return protectFlags{
		addr:     fs.String("protect", "", "protect the guest: checkpoint it to the intermediary at this address (tcp://host:port or vsock://cid:port); output records are released once acknowledged"),
		interval: fs.Duration("interval", 25*time.Millisecond, "with --protect: time between checkpoints"),
		budget: fs.String("dirty-budget", "", "with --protect: also end an epoch as soon as the guest has written this much memory since the last checkpoint "+
			"(e.g. 16M; at least 4K), bounding the stun of a guest that writes fast; the interval then starts again (default: the interval alone)"),
		onLoss: fs.String("on-intermediary-loss", "hold", "with --protect, while no intermediary acknowledges: hold (the guest runs, its output is held), "+
			"pause (the guest is paused), or direct (replicate straight to the backup at --direct-backup, which acknowledges instead; output is held while neither is reachable); "+
			"nothing is released until a reached intermediary, or the backup, acknowledges a full image"),
		direct: fs.String("direct-backup", "", "with --on-intermediary-loss direct: the backup's address (tcp://host:port or vsock://cid:port)"),
		giveUp: fs.Duration("give-up", 0, "with --protect: stop the guest after this long without any intermediary (0: never)"),
		redial: fs.Duration("redial", 200*time.Millisecond, "with --protect: pause between attempts to reach the intermediary again"),
	}
}

func (p protectFlags) check() error {
	if *p.interval <= 0 {
		return fmt.Errorf("--interval %v: must be positive", *p.interval)
	}
	if _, err := p.dirtyBudget(); err != nil {
		return err
	}
	if *p.giveUp < 0 || *p.redial <= 0 {
		return fmt.Errorf("--give-up %v, --redial %v: --give-up must not be negative and --redial must be positive", *p.giveUp, *p.redial)
	}
	policy, err := ft.ParseLinkLossPolicy(*p.onLoss)
	if err != nil {
		return err
	}
	if (policy == ft.ReplicateDirect) != (*p.direct != "") {
		return fmt.Errorf("--on-intermediary-loss direct and --direct-backup ADDR go together")
	}
	return nil
}

// dirtyBudget returns --dirty-budget in bytes (0: none).
func (p protectFlags) dirtyBudget() (uint64, error) {
	if *p.budget == "" {
		return 0, nil
	}
	b, err := option.ParseSize(*p.budget)
	if err != nil {
		return 0, fmt.Errorf("--dirty-budget %s: %w", *p.budget, err)
	}
	if b < mmu.PageSize {
		return 0, fmt.Errorf("--dirty-budget %s: less than one page (4K)", *p.budget)
	}
	return b, nil
}

// runProtected runs machine m as a primary protected through the
// intermediary at pf's address. Records reach release only after the
// intermediary acknowledged the checkpoint covering them.
func runProtected(ctx context.Context, m *vmm.Machine, route *func(vmm.Record), pf protectFlags, rf roleFlags, tcfg *transport.Config,
	statusEvery time.Duration, release func(vmm.Record), stderr io.Writer) (vmm.Result, error) {
	tcfg.PeerRoles = []wire.Role{wire.RoleIntermediary}
	policy, _ := ft.ParseLinkLossPolicy(*pf.onLoss) // checked
	dial := dialer(*pf.addr, tcfg)
	var direct ft.Dialer
	if *pf.direct != "" {
		dcfg := *tcfg
		dcfg.PeerRoles = []wire.Role{wire.RoleBackup}
		direct = dialer(*pf.direct, &dcfg)
	}
	// The first link must come up: a wrong address fails at once.
	first, err := dial(ctx)
	if err != nil {
		return vmm.Result{}, err
	}
	budget, _ := pf.dirtyBudget() // checked
	p, err := ft.NewPrimary(m, nil, ft.PrimaryConfig{Interval: *pf.interval, DirtyBudget: budget, OnRelease: release, Direct: direct,
		OnLinkLoss: policy, GiveUp: *pf.giveUp, Redial: *pf.redial})
	if err != nil {
		first.(io.Closer).Close()
		return vmm.Result{}, err
	}
	*route = p.Record
	stopMetrics, err := rf.serveMetrics(p.Metrics, stderr)
	if err != nil {
		first.(io.Closer).Close()
		return vmm.Result{}, err
	}
	defer stopMetrics()
	type runResult struct {
		res vmm.Result
		err error
	}
	ran := make(chan runResult, 1)
	go func() {
		res, err := m.Run(ctx)
		p.Halted()
		ran <- runResult{res, err}
	}()
	var prev uint64
	stopStatus := everyInterval(statusEvery, func() {
		fmt.Fprintf(stderr, "understudy: primary: %s\n", p.StatusLine(&prev, statusEvery))
	})
	say := func(s string) { fmt.Fprintf(stderr, "understudy: primary: %s\n", s) }
	perr := p.Protect(ctx, firstThen(first, dial), say)
	stopStatus()
	if perr != nil {
		m.Stop(0)
	}
	r := <-ran
	if errors.Is(perr, ft.ErrSuperseded) {
		return r.res, fmt.Errorf("%w; this guest is stopped and its %d held output records are dropped", perr, p.Held())
	}
	if perr != nil && !errors.Is(perr, context.Canceled) {
		return r.res, fmt.Errorf("protection failed: %w", perr)
	}
	fmt.Fprintf(stderr, "understudy: primary: %d checkpoints, all output released up to epoch %d\n", p.Epochs(), p.Acked())
	return r.res, r.err
}

// firstThen returns a Dialer that hands out first, then dials.
func firstThen(first ft.MessageConn, dial ft.Dialer) ft.Dialer {
	return func(ctx context.Context) (ft.MessageConn, error) {
		if c := first; c != nil {
			first = nil
			return c, nil
		}
		return dial(ctx)
	}
}

// everyInterval calls fn every d until the returned function is called
// (never if d is not positive).
func everyInterval(d time.Duration, fn func()) func() {
	if d <= 0 {
		return func() {}
	}
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fn()
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); <-finished }) }
}

func cmdIntermediary(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("intermediary", "intermediary --listen ADDR --backup ADDR --keys DIR [--name NAME] [--hold-back SPEC] [--wan-compress LEVEL] [--on-backup-loss continue|stall] [--metrics HOST:PORT]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7401", "address the primary connects to (tcp://host:port or vsock://cid:port)")
	backupAddr := fs.String("backup", "", "address of the backup")
	onLoss := fs.String("on-backup-loss", "continue", "while no backup is attached: continue (acknowledge the primary; a returning backup is re-seeded with a full image) "+
		"or stall (acknowledge nothing, so the primary holds its output, until a backup is attached)")
	retry := fs.Duration("backup-retry", 500*time.Millisecond, "pause between attempts to reach a lost backup")
	wanCompress := fs.String("wan-compress", "off", "compress page batches to the backup (zstd with zero-page elision): off, fastest, default, better or best")
	holdBack := fs.String("hold-back", "off", "hold back hot pages from the backup: off, on, or threshold=F,max-held=SIZE,max-lag-epochs=N,max-lag=DUR "+
		"(defaults 2, 64M, 200, 5s): pages changed at least F times (a count halving every 16 epochs) are held until a sync, others are staged at once; "+
		"a sync (the backup commits a whole epoch) comes when any bound is passed, and before a failover. Also bandwidth=RATE (100Mbit, 12MiB/s) caps "+
		"what is staged ahead of a sync, and range=START-END (repeatable, e.g. range=0-64M) stages only pages in those guest-physical ranges")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the status line on stderr (0: never)")
	rf := addRoleFlags(fs, "intermediary")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *backupAddr == "" {
		fmt.Fprintln(stderr, "understudy intermediary: --backup ADDR is required")
		return exitUsage
	}
	policy, err := ft.ParseBackupLossPolicy(*onLoss)
	if err != nil {
		return fail(stderr, err)
	}
	hb, err := ft.ParseHoldBack(*holdBack)
	if err != nil {
		return fail(stderr, fmt.Errorf("--hold-back: %w", err))
	}
	var zlevel wanzip.Level
	if *wanCompress != "off" {
		if zlevel, err = wanzip.ParseLevel(*wanCompress); err != nil {
			return fail(stderr, fmt.Errorf("--wan-compress: %w", err))
		}
	}
	if *retry <= 0 {
		return fail(stderr, fmt.Errorf("--backup-retry %v: must be positive", *retry))
	}
	tcfg, err := rf.config(wire.RoleIntermediary, 0, stderr)
	if err != nil {
		return fail(stderr, err)
	}
	tcfg.PeerRoles = []wire.Role{wire.RolePrimary}
	ln, err := transport.Listen(*listen, tcfg)
	if err != nil {
		return fail(stderr, err)
	}
	defer ln.Close()
	fmt.Fprintf(stderr, "understudy: intermediary listening on %s\n", ln.Addr())
	pc, err := ln.Accept(ctx)
	if err != nil {
		return fail(stderr, err)
	}
	memSize := pc.Peer().Hello.MemSize
	fmt.Fprintf(stderr, "understudy: intermediary: primary %q connected (guest memory %s)\n", pc.Peer().Name, vmm.FormatSize(memSize))
	in, err := ft.NewIntermediary(memSize, tcfg.Logger)
	if err != nil {
		return fail(stderr, err)
	}
	in.SetBackupLossPolicy(policy)
	if err := in.SetWANCompression(zlevel); err != nil {
		return fail(stderr, err)
	}
	if hb != nil {
		if err := hb.CheckMemory(memSize); err != nil {
			return fail(stderr, fmt.Errorf("--hold-back: %w", err))
		}
		in.SetForwardPolicy(*hb)
		fmt.Fprintf(stderr, "understudy: intermediary: hold-back %s\n", hb)
	}
	stopMetrics, err := rf.serveMetrics(in.Metrics, stderr)
	if err != nil {
		return fail(stderr, err)
	}
	defer stopMetrics()
	bcfg := *tcfg
	bcfg.PeerRoles = []wire.Role{wire.RoleBackup}
	bcfg.Hello.MemSize = memSize
	bctx, stopBackup := context.WithCancel(ctx)
	defer stopBackup()
	kept := make(chan error, 1)
	go func() { kept <- in.KeepBackup(bctx, dialer(*backupAddr, &bcfg), *retry) }()
	// A restarted intermediary cannot tell whether an earlier failover
	// superseded this primary until the backup has answered: acknowledge
	// nothing before. A backup that runs the guest already refuses it.
	fmt.Fprintf(stderr, "understudy: intermediary: waiting for the backup at %s before acknowledging the primary\n", *backupAddr)
	if err := in.WaitForBackup(ctx); err != nil {
		if errors.Is(err, ft.ErrBackupActive) {
			pc.CloseWithError(wire.CodeFenced, "fenced: the backup runs the guest already")
			fmt.Fprintf(stderr, "understudy: intermediary: %v: the primary is fenced and must stop its guest\n", err)
		}
		return fail(stderr, err)
	}
	stopStatus := everyInterval(*statusEvery, func() {
		fmt.Fprintf(stderr, "understudy: intermediary: %s\n", in.StatusLine())
	})
	perr := in.ServePrimary(pc)
	for errors.Is(perr, ft.ErrRefused) {
		// The primary sent something bad: refused, nothing changed, but it
		// is alive and reconnects with a full image. Only a primary that
		// does not come back within the peer timeout is lost.
		fmt.Fprintf(stderr, "understudy: intermediary: %v; waiting %v for the primary to reconnect\n", perr, *rf.peerTimeout)
		pc.Close()
		if pc, perr = acceptSamePrimary(ctx, ln, pc.Peer(), *rf.peerTimeout); perr == nil {
			fmt.Fprintf(stderr, "understudy: intermediary: primary %q reconnected\n", pc.Peer().Name)
			perr = in.ServePrimary(pc)
		}
	}
	stopStatus()
	if perr == nil {
		fmt.Fprintf(stderr, "understudy: intermediary: primary finished at epoch %d\n", in.Image().Epoch())
		in.EndProtection(10 * time.Second)
		return 0
	}
	fmt.Fprintf(stderr, "understudy: intermediary: primary lost at epoch %d (%v): failing over\n", in.Image().Epoch(), perr)
	// Failover needs an attached backup: retry while KeepBackup reaches one.
	deadline := time.Now().Add(30 * time.Second)
	for {
		fctx, cancel := context.WithDeadline(ctx, deadline)
		epoch, err := in.Failover(fctx)
		cancel()
		if err == nil {
			fmt.Fprintf(stderr, "understudy: intermediary: backup activated at epoch %d\n", epoch)
			stopBackup()
			<-kept
			return 0
		}
		if errors.Is(err, ft.ErrNothingToActivate) {
			return fail(stderr, err)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fail(stderr, fmt.Errorf("failover: %w", err))
		}
		fmt.Fprintf(stderr, "understudy: intermediary: failover not done yet (%v); retrying\n", err)
		time.Sleep(*retry)
	}
}

// acceptSamePrimary waits up to timeout for the primary prev to connect
// again (the same name and guest memory size). Another primary is refused.
func acceptSamePrimary(ctx context.Context, ln transport.Listener, prev transport.Peer, timeout time.Duration) (transport.Conn, error) {
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		c, err := ln.Accept(actx)
		if err != nil {
			return nil, fmt.Errorf("%w: it did not reconnect within %v after a refusal", ft.ErrPrimaryLost, timeout)
		}
		if p := c.Peer(); p.Name == prev.Name && p.Hello.MemSize == prev.Hello.MemSize {
			return c, nil
		}
		_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: "this intermediary protects another primary"})
		c.Close()
	}
}

// refuseIntermediaries answers every intermediary (or primary) that
// connects to an activated backup with a CodeFenced error, until the returned function is
// called.
func refuseIntermediaries(ctx context.Context, ln transport.Listener, epoch uint64, stderr io.Writer) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept(ctx)
			if err != nil {
				return
			}
			fmt.Fprintf(stderr, "understudy: backup: refused %v %q: this backup runs the guest (activated at epoch %d)\n", c.Peer().Role, c.Peer().Name, epoch)
			c.CloseWithError(wire.CodeFenced, fmt.Sprintf("the backup activated the guest at epoch %d and runs it", epoch))
		}
	}()
	return func() { cancel(); <-done }
}

// activationPolicy is the backup's --on-intermediary-loss.
type activationPolicy struct {
	after time.Duration // 0: wait for an intermediary forever
}

func parseActivationPolicy(s string) (activationPolicy, error) {
	if s == "wait" {
		return activationPolicy{}, nil
	}
	if v, ok := strings.CutPrefix(s, "activate-after="); ok {
		d, err := time.ParseDuration(v)
		if err == nil && d > 0 {
			return activationPolicy{after: d}, nil
		}
	}
	return activationPolicy{}, fmt.Errorf("--on-intermediary-loss %q: want wait or activate-after=DURATION (e.g. activate-after=30s)", s)
}

func cmdBackup(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("backup", "backup --listen ADDR --keys DIR [--name NAME] [--records FILE] [--policy SPEC] [--request SPEC] [--on-intermediary-loss wait|activate-after=DUR] [--metrics HOST:PORT]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7402", "address the intermediary connects to")
	records := fs.String("records", "", "after activation, write the guest's output records to this file (\"-\": stdout)")
	onLoss := fs.String("on-intermediary-loss", "wait", "when the intermediary is lost: wait for one (the primary may still be running), "+
		"or activate-after=DUR: if none comes back within DUR, resume the guest from the committed epoch and report the data-loss window "+
		"(only when the primary is known lost too)")
	policySpec := fs.String("policy", "", "install this forwarding policy at every intermediary that serves this backup (backup-driven retrieval), e.g. "+
		"pull-every=2s,max-lag-epochs=400 (pull everything at most every 2 s unless the lag passes 400 epochs), or the keys of intermediary --hold-back; "+
		"\"manifest\" has the intermediary send a manifest of every epoch instead of data, and this backup requests the pages it selects (see --request); "+
		"a refused policy is reported and the intermediary keeps its own")
	requestSpec := fs.String("request", "", "with a manifest policy, which pages to request ahead of a sync: on, or settle=N,max-freq=F,bandwidth=RATE "+
		"(defaults 4, 1.5, no cap): pages unchanged for N epochs whose change frequency is below F")
	largePages := fs.String("large-pages", "", "after activation, manage large pages for the resumed guest as run --large-pages does (a fresh warm-up: region heat does not travel in checkpoints)")
	saveActivated := fs.String("save-activated", "", "on activation, write a snapshot of the activated guest to this file before resuming it (understudy restore reads it)")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the status line on stderr (0: never)")
	rf := addRoleFlags(fs, "backup")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	policy, err := parseActivationPolicy(*onLoss)
	if err != nil {
		return fail(stderr, err)
	}
	var manifest bool
	if *policySpec != "" {
		p, err := ft.ParseBackupPolicy(*policySpec)
		if err != nil {
			return fail(stderr, fmt.Errorf("--policy: %w", err))
		}
		manifest = p.Manifest
	}
	lpCfg, err := parseLargePagesFlag(*largePages)
	if err != nil {
		return fail(stderr, err)
	}
	var request *ft.RequestPolicy
	if *requestSpec != "" {
		if !manifest {
			return fail(stderr, fmt.Errorf("--request %q: only with a manifest policy (--policy manifest,...)", *requestSpec))
		}
		if request, err = ft.ParseRequestPolicy(*requestSpec); err != nil {
			return fail(stderr, fmt.Errorf("--request: %w", err))
		}
	}
	tcfg, err := rf.config(wire.RoleBackup, 0, stderr)
	if err != nil {
		return fail(stderr, err)
	}
	// A primary connects only to replicate straight to the backup while
	// its intermediary is lost (run --on-intermediary-loss direct).
	tcfg.PeerRoles = []wire.Role{wire.RoleIntermediary, wire.RolePrimary}
	recW, closeRecords, err := openRecords(*records, stdout)
	if err != nil {
		return fail(stderr, err)
	}
	defer closeRecords()
	ln, err := transport.Listen(*listen, tcfg)
	if err != nil {
		return fail(stderr, err)
	}
	defer ln.Close()
	fmt.Fprintf(stderr, "understudy: backup listening on %s\n", ln.Addr())
	first := true
	rcfg := vmm.RestoreConfig{Console: stdout, OnRecord: func(r vmm.Record) {
		if first {
			fmt.Fprintf(stderr, "understudy: backup: first output record released: %d (the primary's held output first)\n", r.Value)
			first = false
		}
		if recW != nil {
			recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
			recW.Flush()
		}
	}}
	var (
		b           *ft.Backup
		m           *vmm.Machine
		stopMetrics = func() {}
		stopStatus  = func() {}
	)
	defer func() {
		stopStatus()
		stopMetrics()
		if b != nil {
			b.Close()
		}
	}()
	for m == nil {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if b != nil && policy.after > 0 {
			actx, cancel = context.WithTimeout(ctx, policy.after)
		}
		c, err := ln.Accept(actx)
		cancel()
		if err != nil && b != nil && policy.after > 0 && ctx.Err() == nil {
			var w ft.LossWindow
			m, w, err = b.ActivateAlone()
			if err != nil {
				return fail(stderr, err)
			}
			fmt.Fprintf(stderr, "understudy: backup: no intermediary for %v: DATA MAY BE LOST: %s\n", policy.after, w)
			break
		}
		if err != nil {
			return fail(stderr, err)
		}
		memSize := c.Peer().Hello.MemSize
		if b == nil {
			if b, err = ft.NewBackup(memSize, ft.BackupConfig{Restore: rcfg, Log: tcfg.Logger, Policy: *policySpec, Request: request}); err != nil {
				c.Close()
				return fail(stderr, err)
			}
			if stopMetrics, err = rf.serveMetrics(b.Metrics, stderr); err != nil {
				c.Close()
				return fail(stderr, err)
			}
			stopStatus = everyInterval(*statusEvery, func() {
				fmt.Fprintf(stderr, "understudy: backup: %s\n", b.StatusLine())
			})
		} else if memSize != b.Image().Size() {
			fmt.Fprintf(stderr, "understudy: backup: refused intermediary %q: it protects a guest of %s, this backup holds one of %s\n",
				c.Peer().Name, vmm.FormatSize(memSize), vmm.FormatSize(b.Image().Size()))
			c.CloseWithError(wire.CodeRefused, "guest memory size differs from the backup's")
			continue
		}
		direct := c.Peer().Role == wire.RolePrimary
		if direct {
			fmt.Fprintf(stderr, "understudy: backup: primary %q connected directly: it replicates here while its intermediary is lost (committed epoch %d)\n",
				c.Peer().Name, b.Committed())
			m, err = b.ServeDirect(c)
		} else {
			fmt.Fprintf(stderr, "understudy: backup: intermediary %q connected (committed epoch %d)\n", c.Peer().Name, b.Committed())
			m, err = b.Serve(c)
		}
		c.Close()
		if direct && m == nil && err == nil {
			// The primary is lost, and every epoch it was acknowledged is
			// committed here: nothing is lost.
			if b.Committed() == 0 {
				fmt.Fprintf(stderr, "understudy: backup: the primary's direct link ended before any epoch was committed; waiting\n")
				continue
			}
			fmt.Fprintf(stderr, "understudy: backup: primary lost on its direct link at committed epoch %d: activating\n", b.Committed())
			if m, err = b.Activate(b.Committed()); err != nil {
				return fail(stderr, err)
			}
			break
		}
		if errors.Is(err, ft.ErrProtectionEnded) {
			fmt.Fprintf(stderr, "understudy: backup: %v (last epoch %d): nothing to resume\n", err, b.Committed())
			return 0
		}
		if m == nil {
			why := "the link ended"
			if err != nil {
				why = err.Error()
			}
			fmt.Fprintf(stderr, "understudy: backup: intermediary lost (%s) at committed epoch %d; waiting for an intermediary\n", why, b.Committed())
		}
	}
	defer m.Close()
	stopStatus()
	if *saveActivated != "" {
		if err := saveActivatedSnapshot(*saveActivated, b, m); err != nil {
			return fail(stderr, err)
		}
	}
	fmt.Fprintf(stderr, "understudy: backup: activated at epoch %d; resuming the guest\n", b.Committed())
	// From now on this backup runs the guest: an intermediary that reaches
	// it (a restarted one, perhaps reached by the old primary) is refused,
	// and fences its primary.
	stopRefusing := refuseIntermediaries(ctx, ln, b.Committed(), stderr)
	defer stopRefusing()
	if lpCfg != nil {
		lp, err := largepage.Start(m, *lpCfg)
		if err != nil {
			return fail(stderr, err)
		}
		stopLP := printStatus(stderr, lp, *statusEvery)
		defer func() {
			stopLP()
			fmt.Fprintf(stderr, "understudy: backup: %s\n", lp.Stop())
		}()
	}
	start := time.Now()
	res, err := m.Run(ctx)
	if code, done := runFailed(res, err, time.Since(start), stderr); done {
		return code
	}
	fmt.Fprintf(stderr, "understudy: backup: guest exited with code %d\n", res.ExitCode)
	return guestExitCode(res)
}

// saveActivatedSnapshot writes the activated state and memory of m, before
// it runs, as a snapshot file.
func saveActivatedSnapshot(path string, b *ft.Backup, m *vmm.Machine) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("--save-activated: %w", err)
	}
	if err := vmm.WriteSnapshot(f, b.ActivatedState(), m.Memory()); err != nil {
		f.Close()
		return fmt.Errorf("--save-activated %s: %w", path, err)
	}
	return f.Close()
}
