package ft

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// PrimaryConfig configures the primary's epoch loop.
type PrimaryConfig struct {
	// Interval is the time between checkpoints (default 25 ms).
	Interval time.Duration
	// PreCopyRounds are the live rounds of the first, full image (default 2).
	PreCopyRounds int
	// OnRelease receives output records once the checkpoint covering them
	// is acknowledged (output commit). It runs on the acknowledgement
	// reader's goroutine, in emission order.
	OnRelease func(vmm.Record)
	// AckTimeout bounds the wait for an acknowledgement (default 5 s).
	AckTimeout time.Duration
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

	// mu guards pending and acked.
	mu      sync.Mutex
	pending []heldRecord
	acked   uint64

	// halted is closed by Halted once the machine's Run has returned.
	halted     chan struct{}
	haltedOnce sync.Once

	// Stats.
	epochs atomic.Uint64
	stunNS atomic.Int64 // last stun
}

type heldRecord struct {
	epoch uint64
	rec   vmm.Record
}

// NewPrimary prepares the epoch loop for m (dirty logging starts now) over
// the link ln to the intermediary. Route the machine's output records to
// Record.
func NewPrimary(m *vmm.Machine, ln MessageConn, cfg PrimaryConfig) (*Primary, error) {
	if cfg.Interval == 0 {
		cfg.Interval = 25 * time.Millisecond
	}
	if cfg.PreCopyRounds == 0 {
		cfg.PreCopyRounds = 2
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = 5 * time.Second
	}
	if cfg.Interval < 0 || cfg.PreCopyRounds < 0 || cfg.AckTimeout < 0 {
		return nil, fmt.Errorf("primary: negative interval, pre-copy rounds or ack timeout")
	}
	c, err := NewCheckpointer(m)
	if err != nil {
		return nil, err
	}
	p := &Primary{m: m, c: c, ln: ln, cfg: cfg, halted: make(chan struct{})}
	p.open.Store(1)
	return p, nil
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

// release hands out every held record covered by epoch e. Only the
// acknowledgement reader calls it; Acked moves to e once the records are
// handed out, so a caller that sees Acked() >= e knows they were.
func (p *Primary) release(e uint64) {
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
	p.pending = append(p.pending[:0], p.pending[n:]...)
	p.mu.Unlock()
	if p.cfg.OnRelease != nil {
		for _, h := range out {
			p.cfg.OnRelease(h.rec)
		}
	}
	p.mu.Lock()
	p.acked = e
	p.mu.Unlock()
}

// checkpoint takes one checkpoint with the machine paused and seals it
// before the vCPUs run again.
func (p *Primary) checkpoint(full bool) (*Checkpoint, error) {
	if full {
		return p.c.TakeFullWith(p.cfg.PreCopyRounds, p.seal)
	}
	if _, err := p.m.Pause(); err != nil {
		return nil, err
	}
	cp, err := p.c.TakePaused()
	if err != nil {
		p.m.Resume()
		return nil, err
	}
	p.seal(cp)
	// A failed resume (the machine was stopped meanwhile) still leaves a
	// good checkpoint, which must be sent: its pages are no longer in the
	// dirty log.
	_, err = p.m.Resume()
	return cp, err
}

// seal runs while the vCPUs are paused (or the machine has stopped): output
// emitted from now on belongs to the next epoch, and the checkpoint's state
// envelope carries every record held so far (see envelope.go).
func (p *Primary) seal(cp *Checkpoint) {
	p.open.Store(cp.Epoch + 1)
	p.mu.Lock()
	held := make([]vmm.Record, len(p.pending))
	for i, h := range p.pending {
		held[i] = h.rec
	}
	p.mu.Unlock()
	cp.State = sealState(cp.State, held)
}

// Run checkpoints and streams until ctx ends, the link fails, or the
// machine stops. Output held when the link fails is never released: the
// intermediary did not acknowledge it. When the machine stops (its Run
// returned), Run takes a last checkpoint of the stopped machine, so the
// guest's final output is released once that is acknowledged; call Halted
// when the machine's Run has returned.
func (p *Primary) Run(ctx context.Context) error {
	defer p.c.Close()
	acks := make(chan error, 1)
	go func() { acks <- p.readAcks() }()
	sent := uint64(0)
	send := func(cp *Checkpoint) error {
		if err := SendCheckpoint(p.ln, cp, sent); err != nil {
			return err
		}
		sent = cp.Epoch
		p.epochs.Add(1)
		p.stunNS.Store(int64(cp.Stun))
		return nil
	}
	tick := time.NewTicker(p.cfg.Interval)
	defer tick.Stop()
	for {
		cp, err := p.checkpoint(sent == 0)
		if cp != nil {
			if serr := send(cp); serr != nil {
				return serr
			}
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
			if sent == 0 {
				take = p.c.TakeFullPaused // stopped before the first image
			}
			last, err := take()
			if err != nil {
				return err
			}
			p.seal(last)
			if err := send(last); err != nil {
				return err
			}
			return p.finish(ctx, acks, sent)
		}
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-acks:
			return fmt.Errorf("primary: intermediary link: %w", err)
		case <-tick.C:
		}
	}
}

// finish waits for the last checkpoint's acknowledgement after the guest
// stopped, so its final output is released.
func (p *Primary) finish(ctx context.Context, acks chan error, sent uint64) error {
	deadline := time.After(p.cfg.AckTimeout)
	for p.Acked() < sent {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-acks:
			return fmt.Errorf("primary: intermediary link: %w", err)
		case <-deadline:
			return fmt.Errorf("primary: no acknowledgement of epoch %d within %v", sent, p.cfg.AckTimeout)
		case <-time.After(time.Millisecond):
		}
	}
	// Tell the intermediary this is an orderly end, not a lost primary.
	if err := p.ln.WriteMessage(&wire.Bye{Reason: "guest exited"}); err != nil {
		return fmt.Errorf("primary: goodbye: %w", err)
	}
	return nil
}

// readAcks releases output as acknowledgements arrive.
func (p *Primary) readAcks() error {
	for {
		m, err := p.ln.ReadMessage()
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *wire.Ack:
			p.release(m.Epoch)
		case *wire.Error:
			return m
		case *wire.Heartbeat:
		default:
			return fmt.Errorf("unexpected %v from the intermediary", m.Type())
		}
	}
}
