package ft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// ForwardPolicy decides what the intermediary forwards to the backup. It is
// the one seam for forwarding decisions (hold-back of hot pages and
// backup-driven retrieval plug in here).
type ForwardPolicy interface {
	// Forward is given every checkpoint the intermediary verified, applied
	// and acknowledged, in epoch order, and returns the checkpoints to send
	// the backup now, in order. It must not modify cp. Whatever a policy
	// holds back, Failover still brings the backup to the acknowledged
	// epoch (from the intermediary's image).
	Forward(cp *Checkpoint) []*Checkpoint
}

// ForwardEvery forwards every verified epoch as it was received.
type ForwardEvery struct{}

// Forward returns cp.
func (ForwardEvery) Forward(cp *Checkpoint) []*Checkpoint { return []*Checkpoint{cp} }

// minForwardQueue is the least page data queued for a lagging backup
// before the queue is dropped for a re-seed (see backupLink.limit).
const minForwardQueue = 64 << 20

// SetForwardPolicy replaces the forwarding policy (nil: ForwardEvery).
func (in *Intermediary) SetForwardPolicy(p ForwardPolicy) {
	if p == nil {
		p = ForwardEvery{}
	}
	in.bmu.Lock()
	in.policy = p
	in.bmu.Unlock()
}

// backupLink is the intermediary's side of an attached backup. The
// intermediary queues what the policy forwards; one writer goroutine sends
// it, so the primary's acknowledgements never wait for the backup.
type backupLink struct {
	c    MessageConn
	wake chan struct{} // capacity 1: work is queued
	// limit bounds the page data queued: past it the queue is dropped and
	// the backup re-seeded from the image. It is twice guest memory (at
	// least minForwardQueue), so that refilling the queue takes about as
	// long as a re-seed, and a slow backup is not re-seeded over and over.
	limit int

	// mu guards everything below.
	mu        sync.Mutex
	queue     []*Checkpoint
	queued    int    // bytes of page data in queue
	reseed    bool   // send a full image from the intermediary's image next
	busy      bool   // the writer is sending what it took from the queue
	sent      uint64 // last epoch sent (the base of the next delta)
	acked     uint64 // last epoch the backup acknowledged
	activated bool   // the backup confirmed activation
	err       error  // the link failed
	changed   chan struct{}
}

// forward passes an acknowledged checkpoint through the policy to the
// attached backup, if any. It never blocks on the backup.
func (in *Intermediary) forward(cp *Checkpoint) {
	in.bmu.Lock()
	b, p := in.backup, in.policy
	in.bmu.Unlock()
	if b == nil {
		return
	}
	out := p.Forward(cp)
	if len(out) == 0 {
		return
	}
	n := 0
	for _, cp := range out {
		n += len(cp.Data)
	}
	b.mu.Lock()
	if b.queued+n > b.limit {
		b.queue, b.queued, b.reseed = nil, 0, true
	} else {
		b.queue, b.queued = append(b.queue, out...), b.queued+n
	}
	b.mu.Unlock()
	b.poke()
}

func (b *backupLink) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// note records a change of the link's state and wakes whoever waits on it.
// Call with b.mu held.
func (b *backupLink) note() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// fail records the link's first failure.
func (b *backupLink) fail(err error) {
	b.mu.Lock()
	if b.err == nil {
		b.err = err
		b.note()
	}
	b.mu.Unlock()
}

// ServeBackup attaches the backup link c and forwards to it until ctx ends,
// the link fails, or the backup has activated. The backup is first re-seeded
// with a full image of the intermediary's image (whatever it held before),
// then receives what the policy forwards. Only one backup is attached at a
// time; a returning backup is simply served again.
func (in *Intermediary) ServeBackup(ctx context.Context, c MessageConn) error {
	limit := max(minForwardQueue, 2*len(in.img.mem))
	b := &backupLink{c: c, wake: make(chan struct{}, 1), limit: limit, reseed: true, changed: make(chan struct{})}
	in.bmu.Lock()
	if in.backup != nil {
		in.bmu.Unlock()
		return errors.New("serve backup: a backup is already attached")
	}
	in.backup = b
	close(in.attached)
	in.bmu.Unlock()
	defer func() {
		in.bmu.Lock()
		if in.backup == b {
			in.backup = nil
			in.attached = make(chan struct{})
		}
		in.bmu.Unlock()
	}()
	b.poke()
	read := make(chan error, 1)
	go func() { read <- b.readLoop(in) }()
	// Between checkpoints, tell the backup the epoch acknowledged to the
	// primary, so that it can report the data-loss window should the
	// intermediary be lost together with the primary.
	tell := time.NewTicker(statusEvery)
	defer tell.Stop()
	stop := context.AfterFunc(ctx, func() {
		b.fail(ctx.Err())
		if cl, ok := c.(io.Closer); ok {
			cl.Close() // also ends a send in progress
		}
	})
	defer stop()
	for {
		b.mu.Lock()
		err, changed, done := b.err, b.changed, b.activated
		b.mu.Unlock()
		if done {
			return nil
		}
		if err != nil {
			if cl, ok := c.(io.Closer); ok {
				cl.Close()
			}
			<-read
			return fmt.Errorf("serve backup: %w", err)
		}
		select {
		case <-b.wake:
			if err := in.sendQueued(b); err != nil {
				b.fail(err)
			}
		case <-tell.C:
			if err := c.WriteMessage(&wire.Status{Role: wire.RoleIntermediary, Committed: in.img.Epoch()}); err != nil {
				b.fail(err)
			}
		case <-changed:
		}
	}
}

// sendQueued sends the backup a re-seed if one is due, then the queued
// checkpoints that follow what it was sent.
func (in *Intermediary) sendQueued(b *backupLink) error {
	for {
		b.mu.Lock()
		reseed, q := b.reseed, b.queue
		b.reseed, b.queue, b.queued = false, nil, 0
		sent := b.sent
		b.busy = reseed || len(q) > 0
		b.mu.Unlock()
		if !reseed && len(q) == 0 {
			return nil
		}
		if err := in.sendBatch(b, reseed, q, sent); err != nil {
			return err
		}
	}
}

// sendBatch sends a re-seed (if reseed) and then the checkpoints of q that
// follow sent, and records what the backup was sent.
func (in *Intermediary) sendBatch(b *backupLink, reseed bool, q []*Checkpoint, sent uint64) error {
	defer func() {
		b.mu.Lock()
		b.sent, b.busy = sent, false
		b.note()
		b.mu.Unlock()
	}()
	if reseed {
		cp, err := in.img.Snapshot(in.regions)
		if err != nil {
			return err
		}
		if cp != nil {
			if err := SendCheckpoint(b.c, cp, 0); err != nil {
				return err
			}
			in.reseeds.Add(1)
			in.forwarded.Add(uint64(len(cp.Data) + len(cp.State)))
			sent = cp.Epoch
			in.log.Info("re-seeded the backup with a full image", "epoch", cp.Epoch)
		}
	}
	for _, cp := range q {
		if cp.Epoch <= sent {
			// Already in the re-seed image. (An earlier epoch from a
			// restarted primary is caught by the next delta, which does
			// not follow: that re-seeds.)
			continue
		}
		if !cp.Full && (sent == 0 || cp.Epoch != sent+1) {
			// Not a delta on what the backup has: re-seed instead.
			b.mu.Lock()
			b.reseed = true // what was queued meanwhile stays queued
			b.mu.Unlock()
			break
		}
		in.log.Debug("forward", "epoch", cp.Epoch, "full", cp.Full, "pages", len(cp.PFNs))
		if err := SendCheckpoint(b.c, cp, sent); err != nil {
			return err
		}
		in.forwarded.Add(uint64(len(cp.Data) + len(cp.State)))
		sent = cp.Epoch
	}
	return nil
}

// statusEvery is how often an idle intermediary tells the backup its
// acknowledged epoch.
const statusEvery = 100 * time.Millisecond

// readLoop reads the backup's acknowledgements and reports.
func (b *backupLink) readLoop(in *Intermediary) error {
	for {
		m, err := b.c.ReadMessage()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("the backup closed the link")
			}
			b.fail(err)
			return err
		}
		switch m := m.(type) {
		case *wire.Ack:
			b.mu.Lock()
			b.acked = m.Epoch
			b.note()
			b.mu.Unlock()
			in.noteBackupAck(m.Epoch)
		case *wire.Ready:
			b.mu.Lock()
			b.activated = true
			b.note()
			b.mu.Unlock()
			return nil
		case *wire.Status, *wire.Heartbeat:
		case *wire.Error:
			b.fail(m)
			return m
		default:
			err := fmt.Errorf("unexpected %v from the backup", m.Type())
			b.fail(err)
			return err
		}
	}
}

// wait blocks until cond (called with b.mu held) holds, the link fails, or
// ctx ends.
func (b *backupLink) wait(ctx context.Context, cond func() bool) error {
	for {
		b.mu.Lock()
		ok, err, changed := cond(), b.err, b.changed
		b.mu.Unlock()
		if ok {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// sync makes sure the backup holds epoch: whatever the policy held back is
// sent as a re-seed from the image, and the backup's acknowledgement awaited.
func (b *backupLink) sync(ctx context.Context, epoch uint64) error {
	b.poke()
	idle := func() bool { return !b.busy && !b.reseed && len(b.queue) == 0 }
	if err := b.wait(ctx, func() bool { return b.acked >= epoch || idle() }); err != nil {
		return err
	}
	b.mu.Lock()
	if b.acked < epoch && b.sent < epoch && idle() {
		b.reseed = true // held back: bring the backup up from the image
	}
	b.mu.Unlock()
	b.poke()
	return b.wait(ctx, func() bool { return b.acked >= epoch })
}

// activate tells the backup to activate at epoch and waits for it to
// confirm.
func (b *backupLink) activate(ctx context.Context, epoch uint64) error {
	if err := b.c.WriteMessage(&wire.Activate{Epoch: epoch}); err != nil {
		return fmt.Errorf("activate: %w", err)
	}
	return b.wait(ctx, func() bool { return b.activated })
}
