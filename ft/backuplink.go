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

// minForwardQueue is the least page data queued for a lagging backup
// before the queue is dropped for a re-seed (see backupLink.limit).
const minForwardQueue = 64 << 20

// statusEvery is how often an idle intermediary tells the backup its
// acknowledged epoch.
const statusEvery = 100 * time.Millisecond

// backupLink is the intermediary's side of an attached backup. The
// intermediary queues what the policy forwards; one writer goroutine sends
// it, so the primary's acknowledgements never wait for the backup.
//
// The writer's state machine: what is queued is sent in order, each
// checkpoint only if it follows what the backup was sent (sent); anything
// else (a delta that does not follow, a sync on another base, a queue past
// limit, a backup with no epoch) sets reseed, and the next batch starts
// with a full image of the intermediary's image, which moves sent to its
// epoch and restarts the hold-back ledger.
type backupLink struct {
	c    MessageConn
	wake chan struct{} // capacity 1: work is queued
	// limit bounds the page data queued: past it the queue is dropped and
	// the backup re-seeded from the image. It is guest memory (at least
	// minForwardQueue): a queue that holds more than a re-seed sends takes
	// longer to send than the re-seed, so it is never worth keeping. It
	// also bounds the intermediary's memory: the image, this queue and,
	// while a re-seed is sent, its copy of the image, about three times
	// guest memory (a 256 MiB guest's intermediary fits in a 1.5 GiB
	// node; twice guest memory here got one killed by the OOM killer).
	limit int

	// mu guards everything below.
	mu        sync.Mutex
	queue     []outgoing
	queued    int    // bytes of page data in queue
	reseed    bool   // send a full image from the intermediary's image next
	busy      bool   // the writer is sending what it took from the queue
	sent      uint64 // last epoch sent (the base of the next delta)
	acked     uint64 // last epoch the backup acknowledged
	activated bool   // the backup confirmed activation
	err       error  // the link failed
	changed   chan struct{}
	// ctl holds replies to the backup (policy acknowledgements and
	// refusals, Activate) that the writer sends between checkpoints.
	ctl []wire.Message

	// held is the hold-back ledger (its own lock).
	held heldPages

	// policyVersion is the last policy version the backup installed
	// (readLoop only).
	policyVersion uint64
}

// outgoing is one thing queued for the backup: a checkpoint (of any kind),
// or a retrieval message (a manifest of epoch epoch, which a re-seed at or
// after it makes moot, or Served).
type outgoing struct {
	cp    *Checkpoint
	msg   wire.Message
	epoch uint64
	disk  *DiskEpoch // an epoch's disk writes, sent on their own (disk.go)
}

// enqueue queues out for the writer, or, past the queue's limit, drops the
// queue for a re-seed.
func (b *backupLink) enqueue(out ...outgoing) {
	n := 0
	for _, o := range out {
		if o.cp != nil {
			n += len(o.cp.Data)
		} else if o.disk != nil {
			n += int(o.disk.Bytes())
		} else {
			n += msgBytes(o.msg)
		}
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

// requestReseed makes the writer's next batch start with a re-seed; what is
// queued stays queued.
func (b *backupLink) requestReseed() {
	b.mu.Lock()
	b.reseed = true
	b.mu.Unlock()
	b.poke()
}

// msgBytes is the body size of a retrieval message queued for the backup
// (wire/doc.go gives the layouts).
func msgBytes(m wire.Message) int {
	switch m := m.(type) {
	case *wire.Manifest:
		return 12 + 10*len(m.Pages)
	case *wire.Served:
		return 20
	}
	return 0
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

// reply queues m for the backup, to go between checkpoints.
func (b *backupLink) reply(m wire.Message) {
	b.mu.Lock()
	b.ctl = append(b.ctl, m)
	b.mu.Unlock()
	b.poke()
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

// ServeBackup attaches the backup link c and forwards to it until ctx ends,
// the link fails, or the backup has activated. The backup is first re-seeded
// with a full image of the intermediary's image (whatever it held before),
// then receives what the policy forwards. Only one backup is attached at a
// time; a returning backup is simply served again.
func (in *Intermediary) ServeBackup(ctx context.Context, c MessageConn) error {
	closer, _ := c.(io.Closer)
	c, err := in.wrapBackupConn(c)
	if err != nil {
		return fmt.Errorf("serve backup: %w", err)
	}
	limit := max(minForwardQueue, int(in.img.Size()))
	b := &backupLink{c: c, wake: make(chan struct{}, 1), limit: limit, reseed: true, changed: make(chan struct{})}
	b.held.bytes = &in.heldBytes
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
	// intermediary be lost together with the primary; and sync it if the
	// policy's bound on its lag in time has passed since the last
	// checkpoint (syncIfDue).
	tell := time.NewTicker(statusEvery)
	defer tell.Stop()
	stop := context.AfterFunc(ctx, func() {
		b.fail(ctx.Err())
		if closer != nil {
			closer.Close() // also ends a send in progress
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
			if closer != nil {
				closer.Close()
			}
			// The backup's own Error (say, a refusal) tells more than the
			// write that failed because of it.
			var we *wire.Error
			if rerr := <-read; errors.As(rerr, &we) {
				err = rerr
			}
			return fmt.Errorf("serve backup: %w", err)
		}
		select {
		case <-b.wake:
			if err := in.sendQueued(b); err != nil {
				b.fail(err)
			}
		case <-tell.C:
			in.syncIfDue(b)
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
		ctl := b.ctl
		b.ctl = nil
		b.mu.Unlock()
		for _, m := range ctl {
			if err := b.c.WriteMessage(m); err != nil {
				return err
			}
		}
		b.mu.Lock()
		// The re-seed flag is cleared when its snapshot is taken (see
		// sendBatch): a request for one until then is the same re-seed.
		reseed, q := b.reseed, b.queue
		b.queue, b.queued = nil, 0
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
// follow sent, and the messages of q, and records what the backup was sent.
func (in *Intermediary) sendBatch(b *backupLink, reseed bool, q []outgoing, sent uint64) error {
	defer func() {
		b.mu.Lock()
		b.sent, b.busy = sent, false
		b.note()
		b.mu.Unlock()
	}()
	if reseed {
		cp, err := in.reseedSnapshot(b)
		if err != nil {
			return err
		}
		if cp != nil {
			err := SendCheckpoint(b.c, cp, 0)
			cp.Seed.Remove() // the disks' copies (disk replication)
			if err != nil {
				return err
			}
			in.reseeds.Add(1)
			in.forwarded.Add(uint64(len(cp.Data) + len(cp.State)))
			sent = cp.Epoch
			in.log.Info("re-seeded the backup with a full image", "epoch", cp.Epoch)
		}
	}
	for _, o := range q {
		if o.disk != nil {
			// Disk replication (disk.go): every epoch's writes after
			// what the backup has, in order, ahead of the checkpoint
			// that commits them.
			if sent == 0 || o.disk.Epoch <= sent {
				continue // in the re-seed's disks
			}
			if err := sendDiskEpoch(b.c, o.disk); err != nil {
				return err
			}
			in.forwarded.Add(o.disk.Bytes())
			continue
		}
		if o.msg != nil {
			if o.epoch != 0 && (sent == 0 || o.epoch <= sent) {
				continue // the manifest of an epoch the backup has, or will get whole
			}
			if err := b.c.WriteMessage(o.msg); err != nil {
				return err
			}
			in.forwarded.Add(uint64(msgBytes(o.msg)))
			continue
		}
		// A queued checkpoint is the queue's alone (the received one
		// forward queued whole, or one built for the backup): once sent
		// or skipped, its page memory goes back to the intermediary for
		// the next checkpoint it receives. (A re-seed's image, rare and
		// as large as guest memory, is not kept.)
		cp := o.cp
		if cp.Epoch <= sent {
			// Already in the re-seed image. (An earlier epoch from a
			// restarted primary is caught by the next delta, which does
			// not follow: that re-seeds.)
			in.spare.put(cp.Data)
			continue
		}
		switch cp.Kind {
		case KindStagePages:
			if sent == 0 {
				in.spare.put(cp.Data)
				continue // no base yet: the re-seed will carry them
			}
			if err := SendCheckpoint(b.c, cp, 0); err != nil {
				return err
			}
			in.forwarded.Add(uint64(len(cp.Data)))
			in.stagedOut.Add(uint64(len(cp.Data)))
			in.spare.put(cp.Data)
			continue
		case KindSync:
			if cp.Base != sent {
				// A sync on another base than the backup's: re-seed.
				b.requestReseed()
				return nil
			}
		case KindDelta:
			if sent == 0 || cp.Epoch != sent+1 {
				// Not a delta on what the backup has: re-seed instead
				// (what was queued meanwhile stays queued).
				b.requestReseed()
				return nil
			}
		case KindFull:
			if cp.Seed == nil && in.disks.has.Load() {
				// A full image without the disks: a re-seed brings
				// both (forwardDisks asked for it).
				b.requestReseed()
				return nil
			}
		}
		in.log.Debug("forward", "epoch", cp.Epoch, "kind", cp.Kind, "pages", len(cp.PFNs))
		if err := SendCheckpoint(b.c, cp, sent); err != nil {
			return err
		}
		in.forwarded.Add(uint64(len(cp.Data) + len(cp.State)))
		sent = cp.Epoch
		in.spare.put(cp.Data)
	}
	return nil
}

// reseedSnapshot takes the re-seed's full image of the intermediary's image
// and restarts the hold-back ledger from it, under the ledger's lock: the
// checkpoints accounted for after it are relative to it. It returns nil if
// the image holds no epoch yet.
func (in *Intermediary) reseedSnapshot(b *backupLink) (*Checkpoint, error) {
	disks := in.disks.has.Load()
	if disks {
		// Disk replication: the disks' copy at the image's epoch, so
		// no checkpoint may apply meanwhile (lock order: in.mu, then
		// the ledger's).
		in.mu.Lock()
		defer in.mu.Unlock()
	}
	h := &b.held
	h.mu.Lock()
	defer h.mu.Unlock()
	b.mu.Lock()
	b.reseed = false
	b.mu.Unlock()
	cp, err := in.img.Snapshot(in.regions)
	switch {
	case cp != nil && err == nil && disks:
		cp.Seed, err = in.snapshotDisks(cp.Epoch)
	case cp != nil && err == nil && in.disks.has.Load():
		// The disks came with a full image since the look above: that
		// image asked for another re-seed; this one must not go
		// without them.
		err = errors.New("re-seed: the guest's disks arrived while the image was copied")
	}
	if cp != nil {
		h.reset(cp.Epoch)
	}
	return cp, err
}

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
		if _, refused := m.(*wire.Error); !refused {
			in.heardOnce.Do(func() { close(in.heard) }) // the backup stands by
		}
		switch m := m.(type) {
		case *wire.Ack:
			b.mu.Lock()
			b.acked = m.Epoch
			b.note()
			b.mu.Unlock()
			b.held.syncs.ackedUpTo(m.Epoch)
			in.noteBackupAck(m.Epoch)
		case *wire.Ready:
			b.mu.Lock()
			b.activated = true
			b.note()
			b.mu.Unlock()
			return nil
		case *wire.Status:
		case *wire.Policy:
			b.reply(in.installPolicy(b, m))
		case *wire.PageRequest:
			in.servePages(b, m)
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
