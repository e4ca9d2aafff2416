package ft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// PrimaryConfig configures the primary's epoch loop.
type PrimaryConfig struct {
	// Interval is the time between checkpoints (default 25 ms).
	Interval time.Duration
	// DirtyBudget, if positive, also ends an epoch early once the guest has
	// written this many bytes of pages since the last checkpoint, so that a
	// guest that writes fast gets shorter epochs (and stuns no longer than
	// copying the budget takes) instead of larger checkpoints. The interval
	// then counts from that checkpoint. 0: the interval alone.
	DirtyBudget uint64
	// BudgetPoll is how often the dirty pages are counted against
	// DirtyBudget while the guest runs (default 1 ms, at most Interval).
	BudgetPoll time.Duration
	// PreCopyRounds are the live rounds of the first, full image (default 2).
	PreCopyRounds int
	// OnRelease receives output records once the checkpoint covering them
	// is acknowledged (output commit). It runs on the acknowledgement
	// reader's goroutine, in emission order.
	OnRelease func(vmm.Record)
	// Heat, if set, runs at each checkpoint's pause and returns the
	// large-page heat the checkpoint carries to the backup (an encoded
	// mmu.Heat, largepage.Pager.CheckpointHeat; nil: none). dirty are the
	// guest page frames written in the epoch, ascending (nil for a full
	// image); it must be quick: the guest is paused.
	Heat func(dirty []uint64) []byte
	// AckTimeout bounds the wait for the last acknowledgement after the
	// guest stopped (default 5 s).
	AckTimeout time.Duration
	// OnLinkLoss says what the guest does while no intermediary
	// acknowledges it (Protect only; default HoldOutput).
	OnLinkLoss LinkLossPolicy
	// Direct dials the backup itself, for ReplicateDirect: while no
	// intermediary is reachable, the primary replicates straight to the
	// backup (Backup.ServeDirect) and releases output on its
	// acknowledgements.
	Direct Dialer
	// Redial is the pause between attempts to reach an intermediary again
	// (Protect only; default 200 ms).
	Redial time.Duration
	// GiveUp, if positive, ends Protect (and stops the guest) when no
	// intermediary has been reachable for this long. Held output is then
	// never released. 0: keep trying while the guest runs.
	GiveUp time.Duration
	// MaxHeld bounds the output records held while no intermediary
	// acknowledges: past it the guest is paused until one does, so held
	// output cannot grow without bound (default 1<<20).
	MaxHeld int
	// Compression, if set, sends the links' page batches as
	// wire.CompressedBatch at this ft/wanzip level: LevelStore elides zero
	// pages only (a fresh guest's first image is mostly zero pages), the
	// zstd levels also compress. The intermediary and the backup accept
	// either form. 0: raw page batches.
	Compression wanzip.Level
	// DiskSeedDir is where a full image's copies of the guest's disks are
	// made, at its final pause, before they are streamed (disk
	// replication; default os.TempDir()). On the disks' file system a
	// reflink makes the copy in constant time.
	DiskSeedDir string
}

// LinkLossPolicy is what a primary does with its guest while it has lost
// its intermediary. Output is never released without an acknowledgement,
// whatever the policy.
type LinkLossPolicy int

const (
	// HoldOutput keeps the guest running and holds its output (up to
	// MaxHeld records) until an intermediary is reached again and has
	// acknowledged a full image.
	HoldOutput LinkLossPolicy = iota
	// PauseGuest pauses the guest until an intermediary is reached again.
	PauseGuest
	// ReplicateDirect replicates straight to the backup (PrimaryConfig.
	// Direct) while no intermediary is reachable; output is released once
	// the backup acknowledges it, and held while neither is reachable.
	// Every redial tries the intermediary first.
	ReplicateDirect
)

// ParseLinkLossPolicy parses "hold", "pause" or "direct".
func ParseLinkLossPolicy(s string) (LinkLossPolicy, error) {
	switch s {
	case "hold", "":
		return HoldOutput, nil
	case "pause":
		return PauseGuest, nil
	case "direct":
		return ReplicateDirect, nil
	}
	return 0, fmt.Errorf("intermediary-loss policy %q: want hold, pause or direct", s)
}

func (l LinkLossPolicy) String() string {
	switch l {
	case PauseGuest:
		return "pause"
	case ReplicateDirect:
		return "direct"
	}
	return "hold"
}

// Primary runs the protected machine's epoch loop: it checkpoints the
// machine, streams every checkpoint to the intermediary, and holds each
// output record until the intermediary has acknowledged the checkpoint that
// covers it.
type Primary struct {
	m   *vmm.Machine
	c   *Checkpointer
	ln  MessageConn
	cfg PrimaryConfig

	// open is the epoch of the checkpoint that will cover output emitted
	// now; it changes only while the vCPUs are paused.
	open atomic.Uint64

	// relMu serializes releases (acknowledgements of an old and a new link
	// may overlap).
	relMu sync.Mutex
	// mu guards pending and acked.
	mu      sync.Mutex
	pending []heldRecord
	acked   uint64

	// halted is closed by Halted once the machine's Run has returned.
	halted     chan struct{}
	haltedOnce sync.Once

	// Stats.
	epochs      atomic.Uint64
	byBudget    atomic.Uint64 // epochs the dirty budget ended early
	bytesSent   atomic.Uint64 // page and state bytes of the checkpoints sent
	diskSentB   atomic.Uint64 // data bytes of the disk writes sent (diskprimary.go)
	backupEpoch atomic.Uint64 // the backup's committed epoch, as the intermediary reports it
	linkUp      atomic.Bool
	reconnects  atomic.Uint64
	// Page bytes compressed (Compression) and the bytes they took.
	zipRaw, zipWire atomic.Uint64
	stuns           *durationWindow
	rate            rate
	diskRate        rate // of diskSentB, for the status line

	// ackedEpoch is the last epoch acknowledged, set as its Ack arrives
	// (before its records are released); releasedRecords counts the
	// records handed out. Acked is the last epoch released.
	ackedEpoch      atomic.Uint64
	releasedRecords atomic.Uint64

	// lx is a Linux guest's held output (frames, console; linux.go), nil
	// for a payload guest.
	lx *linuxOutput
}

type heldRecord struct {
	epoch uint64
	rec   vmm.Record
}

// NewPrimary prepares the epoch loop for m (dirty logging starts now) over
// the link ln to the intermediary (for Run; nil for Protect). Route the
// machine's output records to Record; RunPrimary builds a machine that does.
func NewPrimary(m *vmm.Machine, ln MessageConn, cfg PrimaryConfig) (*Primary, error) {
	p, err := newPrimary(ln, cfg)
	if err != nil {
		return nil, err
	}
	if err := p.attach(m); err != nil {
		return nil, err
	}
	return p, nil
}

// newPrimary returns a primary that holds output records (Record) but has
// no machine yet: attach gives it one. So the machine can be built with the
// primary's Record as its OnRecord.
func newPrimary(ln MessageConn, cfg PrimaryConfig) (*Primary, error) {
	if cfg.Interval == 0 {
		cfg.Interval = 25 * time.Millisecond
	}
	if cfg.PreCopyRounds == 0 {
		cfg.PreCopyRounds = 2
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.Redial == 0 {
		cfg.Redial = 200 * time.Millisecond
	}
	if cfg.MaxHeld == 0 {
		cfg.MaxHeld = 1 << 20
	}
	if cfg.Interval < 0 || cfg.PreCopyRounds < 0 || cfg.AckTimeout < 0 || cfg.Redial < 0 || cfg.GiveUp < 0 || cfg.MaxHeld < 0 || cfg.BudgetPoll < 0 {
		return nil, fmt.Errorf("primary: negative interval, pre-copy rounds, timeout or bound")
	}
	if (cfg.OnLinkLoss == ReplicateDirect) != (cfg.Direct != nil) {
		return nil, fmt.Errorf("primary: the direct policy for a lost intermediary and a dialer of the backup go together")
	}
	if cfg.DirtyBudget > 0 && cfg.DirtyBudget < mmu.PageSize {
		return nil, fmt.Errorf("primary: dirty budget of %d bytes is less than one page (%d bytes)", cfg.DirtyBudget, mmu.PageSize)
	}
	if cfg.BudgetPoll == 0 {
		cfg.BudgetPoll = time.Millisecond
	}
	cfg.BudgetPoll = min(cfg.BudgetPoll, cfg.Interval)
	p := &Primary{ln: ln, cfg: cfg, halted: make(chan struct{}), stuns: newDurationWindow(1024)}
	p.open.Store(1)
	return p, nil
}

// attach gives the primary its machine: dirty logging starts now.
func (p *Primary) attach(m *vmm.Machine) error {
	c, err := NewCheckpointer(m)
	if err != nil {
		return err
	}
	p.m, p.c = m, c
	return nil
}

// Record holds an output record until its checkpoint is acknowledged. Use
// it as the machine's OnRecord.
func (p *Primary) Record(r vmm.Record) {
	e := p.open.Load()
	p.mu.Lock()
	p.pending = append(p.pending, heldRecord{epoch: e, rec: r})
	p.mu.Unlock()
}

// Halted tells the primary that the machine's Run has returned (the guest
// exited or failed), so that it can take the last checkpoint.
func (p *Primary) Halted() { p.haltedOnce.Do(func() { close(p.halted) }) }

// Acked returns the last acknowledged epoch.
func (p *Primary) Acked() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.acked
}

// Epochs returns how many checkpoints were sent.
func (p *Primary) Epochs() uint64 { return p.epochs.Load() }

// BudgetEpochs returns how many epochs the dirty budget ended early.
func (p *Primary) BudgetEpochs() uint64 { return p.byBudget.Load() }

// release hands out every held record covered by epoch e. A record stays
// held (and so in every checkpoint sealed meanwhile) until OnRelease has
// returned for it: were the primary lost in the middle of a long release,
// the backup releases again what was not handed out, so none is lost.
// Acked moves to e once the records are handed out, so a caller that sees
// Acked() >= e knows they were.
func (p *Primary) release(e uint64) {
	p.relMu.Lock()
	defer p.relMu.Unlock()
	if e > p.ackedEpoch.Load() {
		p.ackedEpoch.Store(e) // under relMu: no other release stores
	}
	p.mu.Lock()
	if e <= p.acked {
		p.mu.Unlock()
		return
	}
	n := 0
	for n < len(p.pending) && p.pending[n].epoch <= e {
		n++
	}
	out := append([]heldRecord(nil), p.pending[:n]...)
	p.mu.Unlock()
	if p.cfg.OnRelease != nil {
		for _, h := range out {
			p.cfg.OnRelease(h.rec)
		}
	}
	p.releasedRecords.Add(uint64(n))
	if p.lx != nil {
		p.lx.release(p.m, e)
	}
	p.mu.Lock()
	// Only release removes from the front (under relMu); Record appends.
	p.pending = append(p.pending[:0], p.pending[n:]...)
	p.acked = e
	p.mu.Unlock()
}

// checkpoint takes one checkpoint with the machine paused and seals it
// before the vCPUs run again.
func (p *Primary) checkpoint(full bool) (*Checkpoint, error) {
	if full {
		return p.c.TakeFullWith(p.cfg.PreCopyRounds, p.sealFull)
	}
	// A failed resume (the machine was stopped meanwhile) still leaves a
	// good checkpoint, which must be sent: its pages are no longer in the
	// dirty log.
	return p.c.TakeWith(func(e uint64) { failpoint(failStun, e) }, p.seal)
}

// seal runs while the vCPUs are paused (or the machine has stopped): output
// emitted from now on belongs to the next epoch, and the checkpoint's state
// envelope carries every record held so far (see envelope.go).
func (p *Primary) seal(cp *Checkpoint) {
	p.open.Store(cp.Epoch + 1)
	p.sealDisks(cp) // disk replication (diskprimary.go)
	p.mu.Lock()
	held := make([]vmm.Record, len(p.pending))
	for i, h := range p.pending {
		held[i] = h.rec
	}
	p.mu.Unlock()
	env := envelope{Machine: failpointState(cp.State, cp.Epoch), Records: held}
	if p.lx != nil {
		p.lx.seal(p.m, cp.Epoch, &env)
	}
	if p.cfg.Heat != nil {
		var dirty []uint64
		if cp.Kind != KindFull {
			dirty = cp.PFNs
		}
		env.Heat = p.cfg.Heat(dirty)
	}
	cp.State = env.seal()
}

// Run checkpoints and streams until ctx ends, the link fails, or the
// machine stops. Output held when the link fails is never released: the
// intermediary did not acknowledge it. When the machine stops (its Run
// returned), Run takes a last checkpoint of the stopped machine, so the
// guest's final output is released once that is acknowledged; call Halted
// when the machine's Run has returned.
func (p *Primary) Run(ctx context.Context) error {
	defer p.c.Close()
	if p.ln == nil {
		return errors.New("primary: Run needs the link given to NewPrimary")
	}
	return p.serve(ctx, p.ln)
}

// serve runs the epoch loop on one link, starting with a full image. It
// returns nil once the guest has stopped and its last checkpoint is
// acknowledged, and the link's error otherwise.
//
// The send is pipelined: a sender goroutine streams checkpoint e while the
// loop waits for and takes checkpoint e+1, whose pages go to the
// checkpointer's other staging buffer. Checkpoint e+1 is handed over once e
// is sent (the buffer of e is then free for e+2). Output commit does not
// change: the records of epoch e are released on e's acknowledgement.
func (p *Primary) serve(ctx context.Context, ln MessageConn) error {
	if p.cfg.Compression != 0 {
		enc, err := wanzip.NewEncoder(p.cfg.Compression)
		if err != nil {
			return err
		}
		ln = &compressingConn{MessageConn: ln, enc: enc, raw: &p.zipRaw, wire: &p.zipWire}
	}
	p.linkUp.Store(true)
	defer p.linkUp.Store(false)
	acks := make(chan error, 1)
	go func() { acks <- p.readAcks(ln) }()
	s := p.startSender(ln, acks)
	// Whatever ends the loop, the sender is done with the staging buffers
	// before serve returns (the next link's checkpoints reuse them).
	defer s.stop(ln)
	queued := uint64(0) // the last epoch handed to the sender
	tick := time.NewTicker(p.cfg.Interval)
	defer tick.Stop()
	for {
		cp, err := p.checkpoint(queued == 0)
		if serr := p.sealFailed(); serr != nil {
			return serr
		}
		if cp != nil {
			if serr := s.hand(ctx, cp); serr != nil {
				p.diskSent(cp, serr) // never sent (diskprimary.go)
				return serr
			}
			queued = cp.Epoch
		}
		if errors.Is(err, vmm.ErrStopped) {
			// The guest stopped: wait for the machine's Run to return,
			// then checkpoint what it did last.
			select {
			case <-p.halted:
			case <-ctx.Done():
				return ctx.Err()
			}
			take := p.c.TakePaused
			if queued == 0 {
				take = p.c.TakeFullPaused // stopped before the first image
			}
			last, err := take()
			if err != nil {
				return err
			}
			p.seal(last)
			if err := p.sealFailed(); err != nil {
				return err
			}
			if err := s.hand(ctx, last); err != nil {
				p.diskSent(last, err) // never sent (diskprimary.go)
				return err
			}
			if err := s.drain(ctx); err != nil {
				return err
			}
			return p.finish(ctx, ln, acks, last.Epoch)
		}
		if err != nil {
			return err
		}
		if err := p.wait(ctx, acks, s.failed, tick); err != nil {
			return err
		}
	}
}

// sender streams checkpoints handed to it, one at a time, in order.
type sender struct {
	jobs   chan *Checkpoint // unbuffered: a hand-over waits for the previous send
	failed chan error       // the first send error (then the sender stops)
	done   chan struct{}    // closed when the sender has stopped
	closed bool             // jobs is closed
}

// startSender starts the goroutine that sends checkpoints on ln. A send
// that fails reports the intermediary's own Error (read by readAcks from
// acks, which it puts back) if one came, else the write's error.
func (p *Primary) startSender(ln MessageConn, acks chan error) *sender {
	s := &sender{jobs: make(chan *Checkpoint), failed: make(chan error, 1), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		base := uint64(0)
		for cp := range s.jobs {
			err := SendCheckpoint(failpointConn(ln, cp.Epoch), cp, base)
			p.diskSent(cp, err) // disk replication (diskprimary.go)
			if err != nil {
				// The intermediary's own Error (fenced, a refusal), read
				// just before it closed the link, tells more than the
				// failed write.
				select {
				case rerr := <-acks:
					acks <- rerr // the loop sees the link's end too
					var we *wire.Error
					if errors.As(rerr, &we) {
						err = we
					}
				case <-time.After(time.Second):
				}
				s.failed <- &LinkError{err}
				return
			}
			failpoint(failSent, cp.Epoch)
			base = cp.Epoch
			p.epochs.Add(1)
			p.bytesSent.Add(uint64(len(cp.Data) + len(cp.State)))
			p.stuns.add(cp.Stun)
		}
	}()
	return s
}

// hand passes cp to the sender once it has sent the previous checkpoint.
func (s *sender) hand(ctx context.Context, cp *Checkpoint) error {
	select {
	case s.jobs <- cp:
		return nil
	case err := <-s.failed:
		s.failed <- err
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// drain waits until everything handed over is sent.
func (s *sender) drain(ctx context.Context) error {
	if !s.closed {
		close(s.jobs)
		s.closed = true
	}
	select {
	case <-s.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-s.failed:
		s.failed <- err
		return err
	default:
		return nil
	}
}

// stop ends the sender; one still writing on a link that no longer
// matters (the loop ended) is cut short by closing the link.
func (s *sender) stop(ln MessageConn) {
	if !s.closed {
		close(s.jobs)
		s.closed = true
	}
	select {
	case <-s.done:
		return
	default:
	}
	if c, ok := ln.(io.Closer); ok {
		c.Close()
	}
	<-s.done
}

// wait waits for the next checkpoint: the interval's tick, the guest's
// stop, or with a dirty budget, the moment the guest has written that much
// since the last one (the interval then starts again).
func (p *Primary) wait(ctx context.Context, acks, sendFailed chan error, tick *time.Ticker) error {
	var poll <-chan time.Time
	if p.cfg.DirtyBudget > 0 {
		t := time.NewTicker(p.cfg.BudgetPoll)
		defer t.Stop()
		poll = t.C
	}
	budget := int((p.cfg.DirtyBudget + mmu.PageSize - 1) / mmu.PageSize)
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-acks:
			return &LinkError{err}
		case err := <-sendFailed:
			sendFailed <- err
			return err
		case <-tick.C:
			return nil
		case <-p.halted:
			// The guest stopped: its last checkpoint need not wait.
			return nil
		case <-poll:
			n, err := p.c.DirtyPages()
			if err != nil {
				return err
			}
			if n >= budget {
				p.byBudget.Add(1)
				tick.Reset(p.cfg.Interval)
				return nil
			}
		}
	}
}

// finish waits for the last checkpoint's acknowledgement after the guest
// stopped, so its final output is released.
func (p *Primary) finish(ctx context.Context, ln MessageConn, acks chan error, sent uint64) error {
	deadline := time.After(p.cfg.AckTimeout)
	for p.Acked() < sent {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-acks:
			return &LinkError{err}
		case <-deadline:
			return fmt.Errorf("primary: no acknowledgement of epoch %d within %v", sent, p.cfg.AckTimeout)
		case <-time.After(time.Millisecond):
		}
	}
	// Tell the intermediary this is an orderly end, not a lost primary.
	if err := ln.WriteMessage(&wire.Bye{Reason: "guest exited"}); err != nil {
		return &LinkError{fmt.Errorf("goodbye: %w", err)}
	}
	return nil
}

// readAcks releases output as acknowledgements arrive.
func (p *Primary) readAcks(ln MessageConn) error {
	for {
		m, err := ln.ReadMessage()
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *wire.Ack:
			p.release(m.Epoch)
		case *wire.Error:
			return m
		case *wire.Status:
			if m.Role == wire.RoleBackup {
				p.backupEpoch.Store(m.Committed)
			}
		default:
			return fmt.Errorf("unexpected %v from the intermediary", m.Type())
		}
	}
}

// Dialer returns a new link to an intermediary.
type Dialer func(ctx context.Context) (MessageConn, error)

// ErrSuperseded is what Protect returns when the intermediary refused the
// primary because it failed over: the backup runs the guest now, so this
// primary must stop it and never release its held output.
var ErrSuperseded = errors.New("fenced by the intermediary: the backup has taken over")

// LinkError is a failure of the link to the intermediary, as opposed to a
// failure of the guest or of checkpointing.
type LinkError struct{ Err error }

func (e *LinkError) Error() string { return "intermediary link: " + e.Err.Error() }
func (e *LinkError) Unwrap() error { return e.Err }

// Protect runs the epoch loop over links from dial until the guest stops
// and its last checkpoint is acknowledged (nil), ctx ends, or protection
// fails. When the link is lost it applies the configured LinkLossPolicy
// and dials again every Redial; each new link starts with a full image, and
// output held meanwhile is released once that image is acknowledged. An
// intermediary that says it has failed over ends Protect with
// ErrSuperseded: call Machine.Stop then. Protect closes each link it dialed.
func (p *Primary) Protect(ctx context.Context, dial Dialer, log *slog.Logger) error {
	defer p.c.Close()
	if log == nil {
		log = discardLog
	}
	var lostAt time.Time
	paused := false
	defer func() {
		if paused {
			p.m.Resume()
		}
	}()
	for {
		ln, err := dial(ctx)
		direct := false
		if err != nil && p.cfg.Direct != nil && ctx.Err() == nil {
			var derr error
			if ln, derr = p.cfg.Direct(ctx); derr == nil {
				direct = true
				log.Warn(fmt.Sprintf("intermediary unreachable (%v); replicating straight to the backup", err))
				err = nil
			} else {
				err = errors.Join(err, fmt.Errorf("backup: %w", derr))
			}
		}
		if err == nil {
			if paused {
				p.m.Resume()
				paused = false
			}
			if !lostAt.IsZero() {
				p.reconnects.Add(1)
				what := "intermediary"
				if direct {
					what = "backup (direct)"
				}
				log.Info(fmt.Sprintf("%s reached again after %v; sending a full image", what, time.Since(lostAt).Round(time.Millisecond)))
			}
			lostAt = time.Time{}
			err = p.serve(ctx, ln)
			if c, ok := ln.(io.Closer); ok {
				c.Close()
			}
			if err == nil {
				return nil
			}
			var we *wire.Error
			if errors.As(err, &we) && we.Code == wire.CodeFenced {
				return fmt.Errorf("%w (%s)", ErrSuperseded, we.Reason)
			}
			var le *LinkError
			if !errors.As(err, &le) {
				return err
			}
			what := "intermediary"
			if direct {
				what = "direct link to the backup"
			}
			log.Warn(fmt.Sprintf("%s lost (%v); policy %v: output stays held (%s, last acknowledged epoch %d)",
				what, err, p.cfg.OnLinkLoss, p.heldOutput(), p.Acked()))
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if lostAt.IsZero() {
			lostAt = time.Now()
		}
		if p.cfg.GiveUp > 0 && time.Since(lostAt) > p.cfg.GiveUp {
			return fmt.Errorf("no intermediary for %v (last error: %v); the held output (%s) was never released", p.cfg.GiveUp, err, p.heldOutput())
		}
		if !paused && (p.cfg.OnLinkLoss == PauseGuest || p.Held() > p.cfg.MaxHeld || p.consoleHeld() > maxConsolePause) {
			if _, perr := p.m.Pause(); perr == nil {
				paused = true
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(p.cfg.Redial):
		}
	}
}

// Held returns the number of output records held for acknowledgement.
func (p *Primary) Held() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.pending)
}

// Metrics returns the primary's metrics.
func (p *Primary) Metrics() []Metric {
	q := p.stuns.quantiles(0.5, 0.99)
	up := 0.0
	if p.linkUp.Load() {
		up = 1
	}
	sent := float64(p.bytesSent.Load())
	// Released before acknowledged: both only grow, and an epoch is
	// acknowledged before it is released, so released <= acked here too.
	released, records := p.Acked(), p.releasedRecords.Load()
	acked := p.ackedEpoch.Load()
	return append([]Metric{
		{Name: "understudy_primary_epochs_total", Help: "Checkpoints sent to the intermediary.", Kind: "counter", Value: float64(p.Epochs())},
		{Name: "understudy_primary_acked_epoch", Help: "Last epoch acknowledged (by the intermediary, or the backup on a direct link): its output may be released from then on.", Kind: "gauge", Value: float64(acked)},
		{Name: "understudy_primary_released_epoch", Help: "Last epoch whose held output was all released; never above understudy_primary_acked_epoch.", Kind: "gauge", Value: float64(released)},
		{Name: "understudy_primary_released_records_total", Help: "Output records released after their checkpoint was acknowledged.", Kind: "counter", Value: float64(records)},
		{Name: "understudy_primary_backup_epoch", Help: "The backup's committed epoch, as the intermediary last reported it.", Kind: "gauge", Value: float64(p.backupEpoch.Load())},
		{Name: "understudy_primary_sent_bytes_total", Help: "Page and state bytes of the checkpoints sent.", Kind: "counter", Value: sent},
		{Name: "understudy_primary_disk_sent_bytes_total", Help: "Data bytes of the disk writes sent with the checkpoints (disk replication; seeds not counted).", Kind: "counter", Value: float64(p.diskSentB.Load())},
		{Name: "understudy_primary_stun_seconds", Help: "Stun time (pause to resume) over the last 1024 checkpoints.", Kind: "gauge", Labels: []Label{{"quantile", "0.5"}}, Value: q[0]},
		{Name: "understudy_primary_stun_seconds", Help: "Stun time (pause to resume) over the last 1024 checkpoints.", Kind: "gauge", Labels: []Label{{"quantile", "0.99"}}, Value: q[1]},
		{Name: "understudy_primary_held_records", Help: "Output records held until their checkpoint is acknowledged.", Kind: "gauge", Value: float64(p.Held())},
		{Name: "understudy_primary_link_up", Help: "1 while a link to an intermediary is up.", Kind: "gauge", Value: up},
		{Name: "understudy_primary_budget_epochs_total", Help: "Epochs ended early by the dirty budget.", Kind: "counter", Value: float64(p.BudgetEpochs())},
		{Name: "understudy_primary_reconnects_total", Help: "Links to an intermediary made again after a loss.", Kind: "counter", Value: float64(p.reconnects.Load())},
		{Name: "understudy_primary_compressed_in_bytes_total", Help: "Page bytes sent compressed (--compress).", Kind: "counter", Value: float64(p.zipRaw.Load())},
		{Name: "understudy_primary_compressed_out_bytes_total", Help: "Bytes those pages took on the link.", Kind: "counter", Value: float64(p.zipWire.Load())},
	}, p.linuxMetrics()...)
}

// StatusLine returns the live status: epochs/s, stun p50/p99, MiB/s, the
// acknowledged and the backup's epoch. Call it at a steady interval (rates
// are since the previous call).
func (p *Primary) StatusLine(prevEpochs *uint64, every time.Duration) string {
	q := p.stuns.quantiles(0.5, 0.99)
	e := p.Epochs()
	eps := float64(e-*prevEpochs) / every.Seconds()
	*prevEpochs = e
	mibs := p.rate.per(float64(p.bytesSent.Load())) / (1 << 20)
	link := "up"
	if !p.linkUp.Load() {
		link = "DOWN"
	}
	line := fmt.Sprintf("epochs/s=%.1f stun_ms p50=%.2f p99=%.2f MiB/s=%.1f acked=%d backup=%d held=%d link=%s",
		eps, q[0]*1e3, q[1]*1e3, mibs, p.Acked(), p.backupEpoch.Load(), p.Held(), link)
	if p.cfg.DirtyBudget > 0 {
		line += fmt.Sprintf(" by_budget=%d", p.BudgetEpochs())
	}
	if raw := p.zipRaw.Load(); raw > 0 {
		line += fmt.Sprintf(" compress=%v ratio=%.3f", p.cfg.Compression, float64(p.zipWire.Load())/float64(raw))
	}
	return line + p.linuxStatus()
}
