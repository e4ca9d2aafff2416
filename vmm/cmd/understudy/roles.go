package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wanzip"
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

// links returns the links' configuration, and the role's two loggers: log
// for its reports (always shown) and the links' (warnings, or everything
// with --verbose). Both write lines "understudy: ROLE: ..." on stderr.
func (r roleFlags) links(role string, stderr io.Writer) (ft.LinkConfig, *slog.Logger, error) {
	if *r.keys == "" {
		return ft.LinkConfig{}, nil, fmt.Errorf("--keys DIR is required (make one with `understudy keys init` and `understudy keys issue`)")
	}
	if *r.heartbeat <= 0 || *r.peerTimeout <= *r.heartbeat {
		return ft.LinkConfig{}, nil, fmt.Errorf("--heartbeat %v and --peer-timeout %v: both positive, and the timeout longer than the heartbeat", *r.heartbeat, *r.peerTimeout)
	}
	creds, err := transport.LoadCredentials(*r.keys, *r.name)
	if err != nil {
		return ft.LinkConfig{}, nil, err
	}
	level := slog.LevelWarn
	if *r.verbose {
		level = slog.LevelInfo
	}
	log, linkLog := roleLoggers(stderr, role, level)
	return ft.LinkConfig{Credentials: creds, Heartbeat: *r.heartbeat, PeerTimeout: *r.peerTimeout, Log: linkLog}, log, nil
}

// roleLoggers returns a role's report logger (level Info) and its links'
// logger (linkLevel), both writing lines to w through one lineHandler.
func roleLoggers(w io.Writer, role string, linkLevel slog.Level) (log, linkLog *slog.Logger) {
	h := &lineHandler{mu: new(sync.Mutex), w: w, prefix: "understudy: " + role + ": ", level: slog.LevelInfo}
	l := *h
	l.level = linkLevel
	return slog.New(h), slog.New(&l)
}

// lineHandler is the roles' slog.Handler: one human-readable line per
// record, "understudy: ROLE: message key=value ...", without time or level.
type lineHandler struct {
	mu     *sync.Mutex // serializes writes to w
	w      io.Writer
	prefix string
	level  slog.Leveler
	attrs  string // the handler's own attributes, formatted
	group  string // the key prefix of the open group ("" or "g.")
}

func (h *lineHandler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

func (h *lineHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(h.prefix)
	b.WriteString(r.Message)
	b.WriteString(h.attrs)
	r.Attrs(func(a slog.Attr) bool {
		appendAttr(&b, h.group, a)
		return true
	})
	b.WriteByte('\n')
	h.mu.Lock()
	defer h.mu.Unlock()
	_, err := io.WriteString(h.w, b.String())
	return err
}

func (h *lineHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	var b strings.Builder
	for _, a := range as {
		appendAttr(&b, h.group, a)
	}
	c.attrs += b.String()
	return &c
}

func (h *lineHandler) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	c := *h
	c.group += name + "."
	return &c
}

// appendAttr writes " key=value" (quoted where the value has spaces,
// quotes or '=' or is empty), flattening groups into dotted keys.
func appendAttr(b *strings.Builder, group string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return
	}
	if a.Value.Kind() == slog.KindGroup {
		g := group
		if a.Key != "" {
			g += a.Key + "."
		}
		for _, ga := range a.Value.Group() {
			appendAttr(b, g, ga)
		}
		return
	}
	v := a.Value.String()
	if v == "" || strings.ContainsAny(v, " \t\n\"=") {
		v = strconv.Quote(v)
	}
	b.WriteString(" " + group + a.Key + "=" + v)
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
	connect  *time.Duration
	compress *string
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
		connect: fs.Duration("connect-timeout", 60*time.Second, "with --protect: keep trying to reach the intermediary for the first link this long, every --redial, "+
			"reporting the wait on stderr every 5s (nodes booted together come up in any order); the guest starts once the link is up. "+
			"Only a peer that does not answer yet is waited for: a refusal (a certificate of another CA, a wrong role) fails at once. 0: fail at once"),
		compress: fs.String("compress", "off", "with --protect: send the checkpoints' pages compressed: store (zero pages elided, nothing else compressed: "+
			"a fresh guest's first image shrinks to its non-zero pages, at the cost of a copy), fastest, default, better or best (zstd levels, with zero-page elision); off: raw"),
	}
}

// compression returns --compress's level (0: off).
func (p protectFlags) compression() (wanzip.Level, error) {
	return parseCompress("--compress", *p.compress)
}

// parseCompress parses a compression flag's value: off or a wanzip level.
func parseCompress(flag, s string) (wanzip.Level, error) {
	if s == "off" {
		return 0, nil
	}
	l, err := wanzip.ParseLevel(s)
	if err != nil {
		return 0, fmt.Errorf("%s: %w (or off)", flag, err)
	}
	return l, nil
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
	if *p.connect < 0 {
		return fmt.Errorf("--connect-timeout %v: must not be negative", *p.connect)
	}
	policy, err := ft.ParseLinkLossPolicy(*p.onLoss)
	if err != nil {
		return err
	}
	if (policy == ft.ReplicateDirect) != (*p.direct != "") {
		return fmt.Errorf("--on-intermediary-loss direct and --direct-backup ADDR go together")
	}
	_, err = p.compression()
	return err
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

func cmdIntermediary(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("intermediary", "intermediary --listen ADDR --backup ADDR --keys DIR [--name NAME] [--hold-back SPEC] [--wan-compress LEVEL] [--on-backup-loss continue|stall] [--disk-dir DIR] [--metrics HOST:PORT]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7401", "address the primary connects to (tcp://host:port or vsock://cid:port)")
	backupAddr := fs.String("backup", "", "address of the backup")
	onLoss := fs.String("on-backup-loss", "continue", "while no backup is attached: continue (acknowledge the primary; a returning backup is re-seeded with a full image) "+
		"or stall (acknowledge nothing, so the primary holds its output, until a backup is attached)")
	retry := fs.Duration("backup-retry", 500*time.Millisecond, "pause between attempts to reach a lost backup")
	wanCompress := fs.String("wan-compress", "off", "compress page batches to the backup: fastest, default, better or best (zstd with zero-page elision), store (zero-page elision only); off: raw")
	holdBack := fs.String("hold-back", "off", "hold back hot pages from the backup: off, on, or threshold=F,max-held=SIZE,max-lag-epochs=N,max-lag=DUR "+
		"(defaults 2, 64M, 200, 5s): pages changed at least F times (a count halving every 16 epochs) are held until a sync, others are staged at once; "+
		"a sync (the backup commits a whole epoch) comes when any bound is passed, and before a failover. Also bandwidth=RATE (100Mbit, 12MiB/s) caps "+
		"what is staged ahead of a sync, and range=START-END (repeatable, e.g. range=0-64M) stages only pages in those guest-physical ranges")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the status line on stderr (0: never)")
	diskDir := fs.String("disk-dir", "", "where to keep this intermediary's copy of the guest's disks (room for every disk, twice while a backup is re-seeded "+
		"without reflinks; default: a temporary directory, removed at exit)")
	rf := addRoleFlags(fs, "intermediary")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *backupAddr == "" {
		return usageError(fs, "--backup ADDR is required")
	}
	policy, err := ft.ParseBackupLossPolicy(*onLoss)
	if err != nil {
		return fail(stderr, err)
	}
	hb, err := ft.ParseHoldBack(*holdBack)
	if err != nil {
		return fail(stderr, fmt.Errorf("--hold-back: %w", err))
	}
	zlevel, err := parseCompress("--wan-compress", *wanCompress)
	if err != nil {
		return fail(stderr, err)
	}
	if *retry <= 0 {
		return fail(stderr, fmt.Errorf("--backup-retry %v: must be positive", *retry))
	}
	links, log, err := rf.links("intermediary", stderr)
	if err != nil {
		return fail(stderr, err)
	}
	err = ft.RunIntermediary(ctx, ft.IntermediaryRunConfig{Listen: *listen, Backup: *backupAddr, Links: links, Log: log,
		OnBackupLoss: policy, WANCompression: zlevel, HoldBack: hb, BackupRetry: *retry, StatusEvery: *statusEvery, Metrics: *rf.metrics, DiskDir: *diskDir})
	if err != nil {
		return fail(stderr, err)
	}
	return 0
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
	fs := newFlags("backup", "backup --listen ADDR --keys DIR [--name NAME] [--records FILE] [--net tap=NAME...] [--disk PATH...] [--policy SPEC] [--request SPEC] [--on-intermediary-loss wait|activate-after=DUR] [--metrics HOST:PORT]", stderr)
	listen := fs.String("listen", "tcp://127.0.0.1:7402", "address the intermediary connects to")
	var disks replicaPaths
	fs.Var(&disks, "disk", "this backup's copy of the guest's next disk (once per disk, in the primary's --disk order): seeded with the whole disk, "+
		"advanced by committed epochs (with PATH.journal and PATH.epoch beside it), and the guest's disk after activation")
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
	largePages := fs.String("large-pages", "", "after activation, manage large pages for the resumed guest as run --large-pages does, "+
		"starting from the region heat the activated checkpoint carried when the primary ran with --large-pages (no warm-up: the primary's large regions and hottest regions are promoted in the first window); "+
		"without carried heat, after a fresh warm-up")
	saveActivated := fs.String("save-activated", "", "on activation, write a snapshot of the activated guest to this file before resuming it (understudy restore reads it)")
	statusEvery := fs.Duration("status-interval", time.Second, "how often to print the status line on stderr (0: never)")
	var nets netList
	fs.Var(&nets, "net", "for a protected Linux guest: the tap on this host that takes over the guest's virtio-net interface, tap=NAME (repeatable, in the order of the primary's --net). "+
		"The MAC is the guest's (from the replicated state; a different mac= is refused at activation). On activation the frames the primary still held go out on it first, "+
		"then the MAC is announced (RARP) so the segment finds the guest here")
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
	links, log, err := rf.links("backup", stderr)
	if err != nil {
		return fail(stderr, err)
	}
	recW, closeRecords, err := openRecords(*records, stdout)
	if err != nil {
		return fail(stderr, err)
	}
	defer closeRecords()
	bcfg := ft.BackupRunConfig{Listen: *listen, Links: links, Log: log, Policy: *policySpec, Request: request,
		ActivateAfter: policy.after, SaveActivated: *saveActivated, StatusEvery: *statusEvery, Metrics: *rf.metrics, Disks: disks,
		Restore: vmm.RestoreConfig{Console: stdout, Nets: nets, OnRecord: func(r vmm.Record) {
			if recW != nil {
				recW.WriteString(strconv.FormatUint(r.Value, 10) + "\n")
				recW.Flush()
			}
		}}}
	var start time.Time // when the activated guest resumed
	bcfg.OnActivateHeat = func(m *vmm.Machine, heat []byte) (func(), error) {
		start = time.Now()
		if lpCfg == nil {
			return nil, nil
		}
		cfg := *lpCfg
		if heat != nil {
			h, err := mmu.DecodeHeat(heat) // checked when the checkpoint arrived
			if err != nil {
				return nil, fmt.Errorf("large pages: the carried heat: %w", err)
			}
			cfg.Heat = &h
			log.Info(fmt.Sprintf("large pages: starting from the primary's heat (%d regions, %d large)", len(h.Counts), len(h.Large)))
		}
		lp, err := largepage.Start(m, cfg)
		if err != nil {
			// The guest matters more than its large pages: it runs
			// without them (e.g. source=refault for a Linux guest).
			log.Warn(fmt.Sprintf("the activated guest runs without large pages (%v)", err))
			return nil, nil
		}
		stopLP := printStatus(stderr, lp, *statusEvery)
		return func() {
			stopLP()
			log.Info(lp.Stop().String())
		}, nil
	}
	res, err := ft.RunBackup(ctx, bcfg)
	switch {
	case errors.Is(err, ft.ErrProtectionEnded):
		return 0
	case err != nil && start.IsZero():
		return fail(stderr, err) // before the guest ran here
	}
	if code, done := runFailed(res, err, time.Since(start), stderr); done {
		return code
	}
	log.Info(fmt.Sprintf("guest exited with code %d", res.ExitCode))
	return guestExitCode(res)
}

// replicaPaths is the backup's --disk, given once per disk.
type replicaPaths []string

func (p *replicaPaths) String() string { return strings.Join(*p, " ") }

func (p *replicaPaths) Set(s string) error {
	if s == "" {
		return fmt.Errorf("--disk: an empty path")
	}
	*p = append(*p, s)
	return nil
}
