package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// PrimaryRunConfig configures RunPrimary.
type PrimaryRunConfig struct {
	// Machine configures the protected guest. RunPrimary builds the
	// machine with the primary as its record sink, so Machine.Payload.OnRecord
	// must be nil: records reach Epochs.OnRelease once the checkpoint
	// covering them is acknowledged.
	Machine vmm.Config
	// Epochs configures the epoch loop (interval, dirty budget, release of
	// output, what happens while no intermediary is reachable). Its Direct
	// is made from DirectBackup.
	Epochs PrimaryConfig
	// Intermediary is the intermediary's address (tcp://host:port or
	// vsock://cid:port).
	Intermediary string
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
	// OnStart, if set, runs once the machine is built, before the guest
	// starts (e.g. to start its large-page controller); the function it
	// returns, if not nil, runs once the guest has stopped, before the
	// machine is closed.
	OnStart func(m *vmm.Machine) (stop func(), err error)
}

// RunPrimary runs a guest protected through the intermediary: it builds the
// machine, reaches the intermediary (the first link must come up: a wrong
// address fails at once), and runs the guest while Primary.Protect
// checkpoints it, holding each output record until the checkpoint covering
// it is acknowledged. It returns the guest's result once the guest has
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
	if cfg.Machine.Payload == nil {
		return vmm.Result{}, errors.New("primary: only payload guests can be protected (Machine.Payload is nil)")
	}
	if cfg.Machine.Payload.OnRecord != nil {
		return vmm.Result{}, errors.New("primary: the machine's output records go to the primary: Machine.Payload.OnRecord must be nil")
	}
	if (cfg.Epochs.OnLinkLoss == ReplicateDirect) != (cfg.DirectBackup != "") {
		return vmm.Result{}, errors.New("primary: the direct policy for a lost intermediary and the backup's address go together")
	}
	if cfg.Epochs.Direct != nil {
		return vmm.Result{}, errors.New("primary: give the backup's address (DirectBackup), not a dialer")
	}
	memSize := cfg.Machine.MemSize
	dial := dialer(cfg.Intermediary, cfg.Links.transport(wire.RolePrimary, memSize, wire.RoleIntermediary))
	if cfg.DirectBackup != "" {
		cfg.Epochs.Direct = dialer(cfg.DirectBackup, cfg.Links.transport(wire.RolePrimary, memSize, wire.RoleBackup))
	}
	p, err := newPrimary(nil, cfg.Epochs)
	if err != nil {
		return vmm.Result{}, err
	}
	mcfg := cfg.Machine
	payload := *mcfg.Payload // the caller's stays as it was
	payload.OnRecord = p.Record
	mcfg.Payload = &payload
	m, err := vmm.New(mcfg)
	if err != nil {
		return vmm.Result{}, err
	}
	defer m.Close()
	if cfg.OnStart != nil {
		stop, err := cfg.OnStart(m)
		if err != nil {
			return vmm.Result{}, err
		}
		if stop != nil {
			defer stop()
		}
	}
	// The first link must come up: a wrong address fails at once.
	first, err := dial(ctx)
	if err != nil {
		return vmm.Result{}, err
	}
	if err := p.attach(m); err != nil {
		closeConn(first)
		return vmm.Result{}, err
	}
	stopMetrics, err := serveMetrics(cfg.Metrics, p.Metrics, log)
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
		return r.res, fmt.Errorf("%w; this guest is stopped and its %d held output records are dropped", perr, p.Held())
	}
	if perr != nil && !errors.Is(perr, context.Canceled) {
		return r.res, fmt.Errorf("protection failed: %w", perr)
	}
	log.Info(fmt.Sprintf("%d checkpoints, all output released up to epoch %d", p.Epochs(), p.Acked()))
	return r.res, r.err
}
