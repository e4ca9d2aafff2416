package ft

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// BackupRunConfig configures RunBackup.
type BackupRunConfig struct {
	// Listen is the address the intermediary (and, replicating straight
	// to the backup, the primary) connects to.
	Listen string
	// Links configures the links.
	Links LinkConfig
	// Log receives the role's reports (nil: discarded).
	Log *slog.Logger
	// Restore is what the activated guest takes from this host (console,
	// backing); its OnRecord receives the guest's output records after
	// activation, the primary's held ones first.
	Restore vmm.RestoreConfig
	// Policy and Request are the backup's forwarding policy and page
	// requests (see BackupConfig).
	Policy  string
	Request *RequestPolicy
	// ActivateAfter, if positive, activates the committed epoch without
	// the intermediary once none has been connected for this long (only
	// when the primary is known lost too): the data-loss window is logged.
	// 0: wait for an intermediary for ever.
	ActivateAfter time.Duration
	// SaveActivated, if set, is a file to write a snapshot of the activated
	// guest to before it resumes.
	SaveActivated string
	// StatusEvery is how often the status line is logged until activation
	// (0: never).
	StatusEvery time.Duration
	// Metrics, if set, is the host:port to serve Prometheus metrics at.
	Metrics string
	// Disks are the backup's copies of the guest's disks, in the
	// primary's disk order (see BackupConfig.Disks).
	Disks []string
	// OnActivate, if set, runs once the guest is activated, before it
	// resumes (e.g. to start its large-page controller); the function it
	// returns, if not nil, runs once the guest has stopped.
	OnActivate func(m *vmm.Machine) (stop func(), err error)
	// OnActivateHeat is OnActivate (set one of them, or neither) given
	// also the large-page heat the activated checkpoint carried (an encoded
	// mmu.Heat, checked; nil: the primary gave none), to seed the resumed
	// guest's large-page controller (largepage.Config.Heat).
	OnActivateHeat func(m *vmm.Machine, heat []byte) (stop func(), err error)
}

// RunBackup runs the backup: it holds the committed image of the guest the
// intermediary replicates to it, activates the guest when the intermediary
// asks (or, with ActivateAfter, alone), then runs the guest to its end and
// returns its result. It returns ErrProtectionEnded when the guest exited on
// the primary (nothing to resume). A lost intermediary is waited for; a link
// from the primary itself (its intermediary lost, it replicates here
// directly) that ends activates the committed epoch, since the backup
// acknowledged every epoch the primary released. While one peer is served,
// another is refused with a reason and logged, and so is one that protects
// a guest of another memory size; once the guest runs here, every peer is
// refused with CodeFenced (an intermediary fences its primary then).
func RunBackup(ctx context.Context, cfg BackupRunConfig) (vmm.Result, error) {
	log := orDiscard(cfg.Log)
	if err := cfg.Links.check(); err != nil {
		return vmm.Result{}, err
	}
	if cfg.ActivateAfter < 0 {
		return vmm.Result{}, fmt.Errorf("backup: negative activate-after %v", cfg.ActivateAfter)
	}
	if cfg.OnActivate != nil && cfg.OnActivateHeat != nil {
		return vmm.Result{}, errors.New("backup: set OnActivate or OnActivateHeat, not both")
	}
	// A primary connects only to replicate straight to the backup while
	// its intermediary is lost.
	tcfg := cfg.Links.transport(wire.RoleBackup, 0, wire.RoleIntermediary, wire.RolePrimary)
	ln, err := transport.Listen(cfg.Listen, tcfg)
	if err != nil {
		return vmm.Result{}, err
	}
	defer ln.Close()
	log.Info(fmt.Sprintf("listening on %s", ln.Addr()))

	var (
		served    atomic.Pointer[transport.Peer]
		activated atomic.Uint64 // the epoch the guest was activated at
	)
	g := newGate(ctx, ln, log, func(p transport.Peer) (wire.Code, string) {
		if e := activated.Load(); e != 0 {
			return wire.CodeFenced, fmt.Sprintf("this backup runs the guest (activated at epoch %d)", e)
		}
		if s := served.Load(); s != nil {
			return wire.CodeRefused, fmt.Sprintf("this backup is served by %v %q already", s.Role, s.Name)
		}
		return wire.CodeRefused, "this backup takes no peer now"
	}, nil)
	defer g.Close()

	rcfg := cfg.Restore
	first := true
	rcfg.OnRecord = func(r vmm.Record) {
		if first {
			log.Info(fmt.Sprintf("first output record released: %d (the primary's held output first)", r.Value))
			first = false
		}
		if cfg.Restore.OnRecord != nil {
			cfg.Restore.OnRecord(r)
		}
	}
	var (
		b           *Backup
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
		if b != nil && cfg.ActivateAfter > 0 {
			actx, cancel = context.WithTimeout(ctx, cfg.ActivateAfter)
		}
		c, err := g.next(actx)
		cancel()
		if err != nil && b != nil && cfg.ActivateAfter > 0 && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			var w LossWindow
			if m, w, err = b.ActivateAlone(); err != nil {
				return vmm.Result{}, err
			}
			log.Warn(fmt.Sprintf("no intermediary for %v: DATA MAY BE LOST: %s", cfg.ActivateAfter, w))
			break
		}
		if err != nil {
			return vmm.Result{}, err
		}
		peer := c.Peer()
		memSize := peer.Hello.MemSize
		if b == nil {
			if b, err = NewBackup(memSize, BackupConfig{Restore: rcfg, Log: cfg.Links.Log, Policy: cfg.Policy, Request: cfg.Request, Disks: cfg.Disks}); err != nil {
				c.Close()
				return vmm.Result{}, err
			}
			if stopMetrics, err = ServeMetrics(cfg.Metrics, b.Metrics, log); err != nil {
				c.Close()
				return vmm.Result{}, err
			}
			stopStatus = logStatus(cfg.StatusEvery, log, b.StatusLine)
		} else if memSize != b.Image().Size() {
			log.Warn(fmt.Sprintf("refused %v %q: it protects a guest of %s, this backup holds one of %s",
				peer.Role, peer.Name, option.FormatSize(memSize), option.FormatSize(b.Image().Size())))
			c.CloseWithError(wire.CodeRefused, "guest memory size differs from the backup's")
			continue
		}
		served.Store(&peer)
		// Serving ends with ctx: the link is closed then.
		unwatch := context.AfterFunc(ctx, func() { c.Close() })
		direct := peer.Role == wire.RolePrimary
		if direct {
			log.Warn(fmt.Sprintf("primary %q connected directly: it replicates here while its intermediary is lost (committed epoch %d)",
				peer.Name, b.Committed()))
			m, err = b.ServeDirect(c)
		} else {
			log.Info(fmt.Sprintf("intermediary %q connected (committed epoch %d)", peer.Name, b.Committed()))
			m, err = b.Serve(c)
		}
		unwatch()
		if m != nil {
			go lingerClose(c, activationLinger) // the Ready must reach the intermediary
		} else {
			c.Close()
		}
		served.Store(nil)
		if m == nil && ctx.Err() != nil {
			return vmm.Result{}, ctx.Err()
		}
		if direct && m == nil && err == nil {
			// The primary is lost, and every epoch it was acknowledged is
			// committed here: nothing is lost.
			if b.Committed() == 0 {
				log.Warn("the primary's direct link ended before any epoch was committed; waiting")
				continue
			}
			log.Warn(fmt.Sprintf("primary lost on its direct link at committed epoch %d: activating", b.Committed()))
			if m, err = b.Activate(b.Committed()); err != nil {
				return vmm.Result{}, err
			}
			break
		}
		if errors.Is(err, ErrProtectionEnded) {
			log.Info(fmt.Sprintf("%v (last epoch %d): nothing to resume", err, b.Committed()))
			return vmm.Result{}, err
		}
		if m == nil {
			why := "the link ended"
			if err != nil {
				why = err.Error()
			}
			log.Warn(fmt.Sprintf("intermediary lost (%s) at committed epoch %d; waiting for an intermediary", why, b.Committed()))
		}
	}
	defer m.Close()
	stopStatus()
	// From now on this backup runs the guest: a peer that reaches it (a
	// restarted intermediary, perhaps reached by the old primary) is
	// refused with CodeFenced, and fences its primary.
	activated.Store(b.Committed())
	if cfg.SaveActivated != "" {
		if err := saveActivated(cfg.SaveActivated, b, m); err != nil {
			return vmm.Result{}, err
		}
	}
	log.Info(fmt.Sprintf("activated at epoch %d; resuming the guest", b.Committed()))
	onActivate := cfg.OnActivate
	if cfg.OnActivateHeat != nil {
		onActivate = func(m *vmm.Machine) (func(), error) { return cfg.OnActivateHeat(m, b.ActivatedHeat()) }
	}
	if onActivate != nil {
		stop, err := onActivate(m)
		if err != nil {
			return vmm.Result{}, err
		}
		if stop != nil {
			defer stop()
		}
	}
	return m.Run(ctx)
}

// saveActivated writes the activated state and memory of m, before it runs,
// as a snapshot file.
func saveActivated(path string, b *Backup, m *vmm.Machine) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("save the activated guest: %w", err)
	}
	if err := vmm.WriteSnapshot(f, b.ActivatedState(), m.Memory()); err != nil {
		f.Close()
		return fmt.Errorf("save the activated guest to %s: %w", path, err)
	}
	return f.Close()
}

// activationLinger bounds how long an activated backup keeps its link to
// the intermediary open after its Ready (see lingerClose).
const activationLinger = 5 * time.Second

// lingerClose closes c once the peer has closed its side, reading and
// dropping what it still sends, or after d. Closed at once with messages
// of the peer unread (a status the intermediary wrote after its Activate),
// the link is reset, and the peer, whose write then fails, closes its end
// before it reads the Ready written last: it would report a failed
// failover while this backup runs the guest.
func lingerClose(c transport.Conn, d time.Duration) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(d))
	for {
		if _, err := c.ReadMessage(); err != nil {
			return
		}
	}
}
