package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// PrimaryRunConfig configures RunPrimary.
type PrimaryRunConfig struct {
	// Machine configures the protected guest, a payload or a Linux
	// kernel. RunPrimary builds the machine with the primary as its record
	// sink, so Machine.Payload.OnRecord must be nil: records reach
	// Epochs.OnRelease once the checkpoint covering them is acknowledged.
	// A Linux guest's frames and console bytes are held the same way
	// (linux.go): Machine.Console receives the console once acknowledged.
	Machine vmm.Config
	// NetOutput bounds each NIC's held frames of a Linux guest (zero
	// fields: virtio's defaults, 16 MiB and 8192 frames). Past a bound the
	// NIC leaves the guest's frames in its transmit ring until a release
	// makes room: the guest's sends wait, nothing is lost.
	NetOutput virtio.EgressBounds
	// Epochs configures the epoch loop (interval, dirty budget, release of
	// output, what happens while no intermediary is reachable). Its Direct
	// is made from DirectBackup.
	Epochs PrimaryConfig
	// Intermediary is the intermediary's address (tcp://host:port or
	// vsock://cid:port).
	Intermediary string
	// ConnectTimeout is how long RunPrimary keeps trying to reach the
	// intermediary for the first link, every Epochs.Redial, while the
	// errors are transient (nothing listens there yet, no route yet, a
	// timeout or a reset: nodes booted together come up in any order); a
	// peer that refuses (a certificate of another CA, a wrong role) fails
	// at once. 0: one attempt, a failure is final.
	ConnectTimeout time.Duration
	// DirectBackup is the backup's address, for Epochs.OnLinkLoss
	// ReplicateDirect (and only then).
	DirectBackup string
	// Links configures the links.
	Links LinkConfig
	// Log receives the role's reports (nil: discarded).
	Log *slog.Logger
	// StatusEvery is how often the status line is logged (0: never).
	StatusEvery time.Duration
	// Metrics, if set, is the host:port to serve Prometheus metrics at.
	Metrics string
	// MoreMetrics, if set, adds metrics of what runs beside the guest (the
	// large-page controller's) to the primary's. It must return the same
	// metric names every time, from the first call on.
	MoreMetrics func() []Metric
	// OnStart, if set, runs once the machine is built, before the guest
	// starts (e.g. to start its large-page controller); the function it
	// returns, if not nil, runs once the guest has stopped, before the
	// machine is closed.
	OnStart func(m *vmm.Machine) (stop func(), err error)
}

// RunPrimary runs a guest protected through the intermediary: it builds the
// machine, reaches the intermediary (the first link must come up before the
// guest starts: within ConnectTimeout, and at once for a peer that refuses),
// and runs the guest while Primary.Protect
// checkpoints it, holding each output record (a Linux guest's frames and
// console bytes: linux.go) until the checkpoint covering it is
// acknowledged. It returns the guest's result once the guest has
// exited and its last checkpoint is acknowledged. A primary the
// intermediary fenced (ErrSuperseded: the backup runs the guest now) stops
// its guest and never releases its held output. While no intermediary is
// reachable, Epochs.OnLinkLoss applies; without Epochs.GiveUp a primary
// that reaches none holds its output for ever.
func RunPrimary(ctx context.Context, cfg PrimaryRunConfig) (vmm.Result, error) {
	log := orDiscard(cfg.Log)
	if err := cfg.Links.check(); err != nil {
		return vmm.Result{}, err
	}
	linux := cfg.Machine.Linux != nil && cfg.Machine.Payload == nil
	if cfg.Machine.Payload == nil && !linux {
		return vmm.Result{}, errors.New("primary: no guest to protect (neither Machine.Payload nor Machine.Linux)")
	}
	if !linux && cfg.Machine.Payload.OnRecord != nil {
		return vmm.Result{}, errors.New("primary: the machine's output records go to the primary: Machine.Payload.OnRecord must be nil")
	}
	if !linux && cfg.NetOutput != (virtio.EgressBounds{}) {
		return vmm.Result{}, errors.New("primary: held-output bounds are for a Linux guest's network interfaces")
	}
	if (cfg.Epochs.OnLinkLoss == ReplicateDirect) != (cfg.DirectBackup != "") {
		return vmm.Result{}, errors.New("primary: the direct policy for a lost intermediary and the backup's address go together")
	}
	if cfg.Epochs.Direct != nil {
		return vmm.Result{}, errors.New("primary: give the backup's address (DirectBackup), not a dialer")
	}
	if cfg.ConnectTimeout < 0 {
		return vmm.Result{}, fmt.Errorf("primary: negative connect timeout %v", cfg.ConnectTimeout)
	}
	memSize := cfg.Machine.MemSize
	tcfg := cfg.Links.transport(wire.RolePrimary, memSize, wire.RoleIntermediary)
	dial := dialer(cfg.Intermediary, tcfg)
	firstDial, unmute := dial, func() {}
	if cfg.ConnectTimeout > 0 {
		var quiet *transport.Config
		quiet, unmute = mutedUntilUp(tcfg)
		firstDial = dialer(cfg.Intermediary, quiet)
	}
	if cfg.DirectBackup != "" {
		cfg.Epochs.Direct = dialer(cfg.DirectBackup, cfg.Links.transport(wire.RolePrimary, memSize, wire.RoleBackup))
	}
	if linux && cfg.Epochs.DiskSeedDir == "" && len(cfg.Machine.Linux.Disks) > 0 {
		// A full image's disk copies next to the first disk: a reflink on
		// its file system, not a copy into a RAM-backed temp directory.
		cfg.Epochs.DiskSeedDir = filepath.Dir(cfg.Machine.Linux.Disks[0].Path)
	}
	p, err := newPrimary(nil, cfg.Epochs)
	if err != nil {
		return vmm.Result{}, err
	}
	mcfg := cfg.Machine
	if linux {
		// The console is output: held until acknowledged (linux.go).
		p.lx = &linuxOutput{console: newConsoleGate(mcfg.Console, &p.open)}
		mcfg.Console = p.lx.console
	} else {
		payload := *mcfg.Payload // the caller's stays as it was
		payload.OnRecord = p.Record
		mcfg.Payload = &payload
	}
	m, err := vmm.New(mcfg)
	if err != nil {
		return vmm.Result{}, err
	}
	defer m.Close()
	if linux {
		if err := m.HoldNetOutput(cfg.NetOutput); err != nil {
			return vmm.Result{}, fmt.Errorf("primary: %w", err)
		}
	}
	if cfg.OnStart != nil {
		stop, err := cfg.OnStart(m)
		if err != nil {
			return vmm.Result{}, err
		}
		if stop != nil {
			defer stop()
		}
	}
	// The first link must come up before the guest starts: within
	// ConnectTimeout while nothing answers, at once if the peer refuses.
	first, err := dialFirst(ctx, firstDial, "the intermediary", cfg.Intermediary, cfg.ConnectTimeout, p.cfg.Redial, log)
	unmute()
	if err != nil {
		return vmm.Result{}, err
	}
	if err := p.attach(m); err != nil {
		closeConn(first)
		return vmm.Result{}, err
	}
	collect := p.Metrics
	if cfg.MoreMetrics != nil {
		collect = func() []Metric { return append(p.Metrics(), cfg.MoreMetrics()...) }
	}
	stopMetrics, err := ServeMetrics(cfg.Metrics, collect, log)
	if err != nil {
		closeConn(first)
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
	stopStatus := logStatus(cfg.StatusEvery, log, func() string { return p.StatusLine(&prev, cfg.StatusEvery) })
	perr := p.Protect(ctx, firstThen(first, dial), log)
	stopStatus()
	if perr != nil {
		m.Stop(0)
	}
	r := <-ran
	if errors.Is(perr, ErrSuperseded) {
		if linux {
			s := m.NetOutputStats()
			return r.res, fmt.Errorf("%w; this guest is stopped and its %d held frames and %d held console bytes are dropped", perr, s.HeldFrames, p.consoleHeld())
		}
		return r.res, fmt.Errorf("%w; this guest is stopped and its %d held output records are dropped", perr, p.Held())
	}
	if perr != nil && !errors.Is(perr, context.Canceled) {
		return r.res, fmt.Errorf("protection failed: %w", perr)
	}
	log.Info(fmt.Sprintf("%d checkpoints (%.1f MiB of pages and state, %.1f KiB of disk writes), all output released up to epoch %d",
		p.Epochs(), float64(p.bytesSent.Load())/(1<<20), float64(p.diskSentB.Load())/1024, p.Acked()))
	return r.res, r.err
}
