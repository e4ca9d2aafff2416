package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// IntermediaryRunConfig configures RunIntermediary.
type IntermediaryRunConfig struct {
	// Listen is the address the primary connects to (tcp://host:port or
	// vsock://cid:port).
	Listen string
	// Backup is the backup's address.
	Backup string
	// Links configures the links to the primary and the backup.
	Links LinkConfig
	// Log receives the role's reports (nil: discarded).
	Log *slog.Logger
	// OnBackupLoss says what happens while no backup is attached.
	OnBackupLoss BackupLossPolicy
	// WANCompression compresses page batches to the backup (0: off).
	WANCompression wanzip.Level
	// HoldBack, if set, is the forwarding policy (default: forward every
	// epoch at once).
	HoldBack *HoldBack
	// BackupRetry is the pause between attempts to reach a lost backup
	// (default 500 ms).
	BackupRetry time.Duration
	// FailoverTimeout bounds the retries of a failover that finds no
	// backup attached (default 30 s). It does not bound the failover
	// itself: an attached backup is given the time it takes to catch up
	// and activate (its link's peer timeout tells a dead one).
	FailoverTimeout time.Duration
	// StatusEvery is how often the status line is logged (0: never).
	StatusEvery time.Duration
	// Metrics, if set, is the host:port to serve Prometheus metrics at.
	Metrics string
	// DiskDir is where the intermediary keeps its copy of the guest's
	// disks (see Intermediary.SetDiskDir; "": a temporary directory,
	// removed at exit). It needs room for every disk, twice while a
	// backup is re-seeded on a file system without reflinks.
	DiskDir string
}

// RunIntermediary runs the intermediary: it waits for one primary, serves
// it (verifying, applying and acknowledging its checkpoints and forwarding
// them to the backup, which it keeps attached), and fails over when the
// primary is lost. It returns nil when the primary's guest exited (the
// backup is told protection ended) or once the backup has activated the
// guest: an intermediary serves one protected guest and exits after its
// failover. Every other peer that connects meanwhile is refused with a
// reason and logged: a second primary while one is served (CodeRefused),
// any primary once the primary is fenced (CodeFenced).
//
// A primary whose message was refused (a checkpoint that failed
// verification) may reconnect within the peer timeout and starts again with
// a full image; only a primary that does not is lost. A primary is fenced
// (CodeFenced, so it stops its guest) when the intermediary fails over, and
// when the backup refuses the intermediary because an earlier failover
// activated it (RunIntermediary returns ErrBackupActive then).
func RunIntermediary(ctx context.Context, cfg IntermediaryRunConfig) error {
	log := orDiscard(cfg.Log)
	if err := cfg.Links.check(); err != nil {
		return err
	}
	if cfg.Backup == "" {
		return errors.New("intermediary: no backup address")
	}
	if cfg.BackupRetry == 0 {
		cfg.BackupRetry = 500 * time.Millisecond
	}
	if cfg.FailoverTimeout == 0 {
		cfg.FailoverTimeout = 30 * time.Second
	}
	if cfg.BackupRetry < 0 || cfg.FailoverTimeout < 0 {
		return fmt.Errorf("intermediary: negative backup retry %v or failover timeout %v", cfg.BackupRetry, cfg.FailoverTimeout)
	}
	tcfg := cfg.Links.transport(wire.RoleIntermediary, 0, wire.RolePrimary)
	ln, err := transport.Listen(cfg.Listen, tcfg)
	if err != nil {
		return err
	}
	defer ln.Close()
	log.Info(fmt.Sprintf("listening on %s", ln.Addr()))

	// Once a primary is accepted, every other peer is refused: another
	// primary while it is served, any primary once it is fenced. The
	// primary served, connecting again before the intermediary waits for
	// it (just after a refusal), is held for it.
	var served atomic.Pointer[transport.Peer]
	var in atomic.Pointer[Intermediary]
	g := newGate(ctx, ln, log, func(p transport.Peer) (wire.Code, string) {
		if i := in.Load(); i != nil && i.Fenced() {
			return wire.CodeFenced, "this intermediary has failed over"
		}
		if s := served.Load(); s != nil {
			return wire.CodeRefused, protectsAlready(*s)
		}
		return wire.CodeRefused, "this intermediary takes no peer now"
	}, func(p transport.Peer) bool {
		s := served.Load()
		i := in.Load()
		return s != nil && samePrimary(p, *s) && (i == nil || !i.Fenced())
	})
	defer g.Close()
	pc, err := g.next(ctx)
	if err != nil {
		return err
	}
	first := pc.Peer()
	served.Store(&first)
	memSize := first.Hello.MemSize
	log.Info(fmt.Sprintf("primary %q connected (guest memory %s)", first.Name, option.FormatSize(memSize)))
	inter, err := NewIntermediary(memSize, cfg.Links.Log)
	if err != nil {
		pc.Close()
		return err
	}
	in.Store(inter)
	inter.SetDiskDir(cfg.DiskDir)
	defer inter.RemoveDisks() // its copy of the guest's disks (diskstore.go)
	inter.SetBackupLossPolicy(cfg.OnBackupLoss)
	if err := inter.SetWANCompression(cfg.WANCompression); err != nil {
		pc.Close()
		return err
	}
	if cfg.HoldBack != nil {
		if err := cfg.HoldBack.CheckMemory(memSize); err != nil {
			pc.Close()
			return fmt.Errorf("hold-back: %w", err)
		}
		inter.SetForwardPolicy(*cfg.HoldBack)
		log.Info(fmt.Sprintf("hold-back %s", cfg.HoldBack))
	}
	stopMetrics, err := ServeMetrics(cfg.Metrics, inter.Metrics, log)
	if err != nil {
		pc.Close()
		return err
	}
	defer stopMetrics()
	bcfg := cfg.Links.transport(wire.RoleIntermediary, memSize, wire.RoleBackup)
	bctx, stopBackup := context.WithCancel(ctx)
	defer stopBackup()
	kept := make(chan error, 1)
	go func() { kept <- inter.KeepBackup(bctx, dialer(cfg.Backup, bcfg), cfg.BackupRetry) }()
	// A restarted intermediary cannot tell whether an earlier failover
	// superseded this primary until the backup has answered: acknowledge
	// nothing before. A backup that runs the guest already refuses it.
	log.Info(fmt.Sprintf("waiting for the backup at %s before acknowledging the primary", cfg.Backup))
	if err := inter.WaitForBackup(ctx); err != nil {
		if errors.Is(err, ErrBackupActive) {
			pc.CloseWithError(wire.CodeFenced, "fenced: the backup runs the guest already")
			log.Warn(fmt.Sprintf("%v: the primary is fenced and must stop its guest", err))
		}
		pc.Close()
		return err
	}
	stopStatus := logStatus(cfg.StatusEvery, log, inter.StatusLine)
	// Serving ends with ctx: the primary's link is closed then, and an
	// intermediary that was stopped does not fail over.
	serve := func(pc transport.Conn) error {
		defer context.AfterFunc(ctx, func() { inter.Stop(); pc.Close() })()
		return inter.ServePrimary(pc)
	}
	perr := serve(pc)
	for errors.Is(perr, ErrRefused) && ctx.Err() == nil {
		// The primary sent something bad: refused, nothing changed, but it
		// is alive and reconnects with a full image. Only a primary that
		// does not come back within the peer timeout is lost.
		log.Warn(fmt.Sprintf("%v; waiting %v for the primary to reconnect", perr, cfg.Links.PeerTimeout))
		pc.Close()
		if pc, perr = acceptSamePrimary(ctx, g, first, cfg.Links.PeerTimeout, log); perr == nil {
			log.Info(fmt.Sprintf("primary %q reconnected", pc.Peer().Name))
			perr = serve(pc)
		}
	}
	stopStatus()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if perr == nil {
		log.Info(fmt.Sprintf("primary finished at epoch %d", inter.Image().Epoch()))
		inter.EndProtection(10 * time.Second)
		return nil
	}
	log.Warn(fmt.Sprintf("primary lost at epoch %d (%v): failing over", inter.Image().Epoch(), perr))
	// Failover needs an attached backup: retry while KeepBackup reaches one.
	// A backup far behind (a slow link) may take long to catch up; it is
	// not given up on while its link lives.
	deadline := time.Now().Add(cfg.FailoverTimeout)
	for {
		epoch, err := inter.Failover(ctx)
		if err == nil {
			log.Info(fmt.Sprintf("backup activated at epoch %d", epoch))
			stopBackup()
			<-kept
			return nil
		}
		if errors.Is(err, ErrNothingToActivate) {
			return err
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("failover: %w", err)
		}
		log.Warn(fmt.Sprintf("failover not done yet (%v); retrying", err))
		select {
		case <-ctx.Done():
		case <-time.After(cfg.BackupRetry):
		}
	}
}

// acceptSamePrimary waits up to timeout for the primary prev to connect
// again (the same name and guest memory size). Another primary is refused.
func acceptSamePrimary(ctx context.Context, g *gate, prev transport.Peer, timeout time.Duration, log *slog.Logger) (transport.Conn, error) {
	actx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		c, err := g.next(actx)
		if err != nil {
			return nil, fmt.Errorf("%w: it did not reconnect within %v after a refusal", ErrPrimaryLost, timeout)
		}
		if samePrimary(c.Peer(), prev) {
			return c, nil
		}
		reason := protectsAlready(prev)
		log.Warn(fmt.Sprintf("refused %v %q: %s", c.Peer().Role, c.Peer().Name, reason))
		c.CloseWithError(wire.CodeRefused, reason)
	}
}

// samePrimary reports whether p is the primary prev connecting again: the
// same name and guest memory size.
func samePrimary(p, prev transport.Peer) bool {
	return p.Name == prev.Name && p.Hello.MemSize == prev.Hello.MemSize
}

// protectsAlready is the reason another primary is refused, whether the
// one protected is connected or awaited.
func protectsAlready(prev transport.Peer) string {
	return fmt.Sprintf("this intermediary protects primary %q (guest memory %s) already", prev.Name, option.FormatSize(prev.Hello.MemSize))
}
