package ft

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// ForwardPolicy decides what the intermediary forwards to the backup. It is
// the one seam for forwarding decisions: ForwardEvery, hold-back of hot
// pages (HoldBack), and backup-installed policies plug in here. Whatever a
// policy holds back, Failover still brings the backup to the acknowledged
// epoch, and the backup still commits only whole epochs.
type ForwardPolicy interface {
	// Split is given every checkpoint the intermediary verified, applied
	// and acknowledged, in epoch order, with freq(i), the change frequency
	// of its i-th page (see Image). It returns send, to forward the
	// checkpoint whole as a delta, or else the indexes of the pages to
	// stage at the backup now (ascending); the other pages are held back
	// until a sync. It must not modify cp.
	Split(cp *Checkpoint, freq func(i int) float64) (send bool, stage []int)
	// SyncNow is asked after a checkpoint that was not sent whole, once its
	// pages are accounted for in v: true brings the backup to that epoch
	// now (every held page, and the state).
	SyncNow(v BackupView) bool
}

// BackupView is what a policy sees of the backup's position.
type BackupView struct {
	Epoch     uint64        // the checkpoint just applied
	Synced    uint64        // the epoch of the last sync (or re-seed) sent
	HeldBytes uint64        // page bytes changed since then and not staged: what a sync would carry
	LagEpochs uint64        // Epoch - Synced
	Lag       time.Duration // since epoch Synced was applied here
}

// ForwardEvery forwards every verified epoch as it was received.
type ForwardEvery struct{}

// Split sends cp whole.
func (ForwardEvery) Split(*Checkpoint, func(int) float64) (bool, []int) { return true, nil }

// SyncNow is never asked (everything is sent).
func (ForwardEvery) SyncNow(BackupView) bool { return false }

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
	queue     []outgoing
	queued    int    // bytes of page data in queue
	reseed    bool   // send a full image from the intermediary's image next
	busy      bool   // the writer is sending what it took from the queue
	sent      uint64 // last epoch sent (the base of the next delta)
	acked     uint64 // last epoch the backup acknowledged
	activated bool   // the backup confirmed activation
	err       error  // the link failed
	changed   chan struct{}

	// Hold-back bookkeeping, guarded by the intermediary's mu (forward and
	// the re-seed snapshot run under it): lacks marks the image pages
	// (by offset) changed since the last sync and not staged since.
	lacks    []bool
	lacking  uint64
	synced   uint64 // epoch of the last sync or re-seed queued
	holdMode bool   // the policy has not sent everything since the last re-seed
	// limiter enforces a policy's bandwidth cap on what goes ahead of a sync.
	limiter tokenBucket

	// ctl holds replies to the backup (policy acknowledgements and
	// refusals) that the writer sends between checkpoints; guarded by mu.
	ctl []wire.Message
	// policyVersion is the last policy version the backup installed
	// (readLoop only).
	policyVersion uint64
}

// outgoing is one thing queued for the backup: a checkpoint (sent whole,
// staged pages, or a sync), or a retrieval message (a manifest of epoch
// epoch, which a re-seed at or after it makes moot, or Served).
type outgoing struct {
	cp    *Checkpoint
	msg   wire.Message
	epoch uint64
}

// tokenBucket caps a page rate: bytes that may go now, refilled at rate
// bytes per second up to a tenth of a second's worth (at least two pages).
type tokenBucket struct {
	tokens float64
	at     time.Time
}

// take returns how many of n pages may go now at rate bytes/s (0: no cap),
// and spends them.
func (tb *tokenBucket) take(rate uint64, n int) int {
	if rate == 0 {
		return n
	}
	now := time.Now()
	burst := max(float64(rate)/10, 2*mmu.PageSize)
	if tb.at.IsZero() {
		tb.tokens = burst
	} else {
		tb.tokens = min(burst, tb.tokens+now.Sub(tb.at).Seconds()*float64(rate))
	}
	tb.at = now
	k := min(n, int(tb.tokens/mmu.PageSize))
	tb.tokens -= float64(k * mmu.PageSize)
	return k
}

// forward passes an acknowledged checkpoint through the policy to the
// attached backup, if any. It never blocks on the backup.
// Call with in.mu held, the image at cp's epoch.
func (in *Intermediary) forward(cp *Checkpoint) {
	in.bmu.Lock()
	b, p := in.backup, in.policy
	in.bmu.Unlock()
	if b == nil {
		return
	}
	offs := make([]uint64, len(cp.PFNs))
	for i, pfn := range cp.PFNs {
		off, _ := in.PageOffset(pfn) // Apply checked every page
		offs[i] = off / mmu.PageSize
	}
	freq := func(i int) float64 { f, _ := in.img.Frequency(offs[i]); return f }
	send, stage := p.Split(cp, freq)
	sh, _ := p.(shaper)
	if sh != nil && !send {
		stage = stage[:b.limiter.take(sh.stageRate(), len(stage))]
	}
	var out []outgoing
	if send && !b.holdMode {
		out = append(out, outgoing{cp: cp})
		if b.synced != 0 || cp.Full {
			// The backup's base once this arrives: a policy installed
			// later syncs on it.
			b.synced = cp.Epoch
		}
	} else {
		b.holdMode = true
		if b.lacks == nil {
			b.lacks = make([]bool, in.img.Pages())
		}
		staged := make(map[int]bool, len(stage))
		for _, i := range stage {
			if i >= 0 && i < len(cp.PFNs) {
				staged[i] = true
			}
		}
		for i, off := range offs {
			switch {
			case staged[i] && b.lacks[off]:
				b.lacks[off] = false
				b.lacking--
			case !staged[i] && !b.lacks[off]:
				b.lacks[off] = true
				b.lacking++
			}
		}
		if len(staged) > 0 {
			out = append(out, outgoing{cp: stagedPages(cp, stage)})
		}
		v := BackupView{Epoch: cp.Epoch, Synced: b.synced, HeldBytes: b.lacking * mmu.PageSize,
			LagEpochs: cp.Epoch - min(cp.Epoch, b.synced), Lag: time.Since(in.appliedAt(b.synced))}
		// A backup with no epoch yet is seeded at once, whatever the policy.
		if send || b.synced == 0 || p.SyncNow(v) {
			if sync := in.syncCheckpoint(b); sync != nil {
				out = append(out, outgoing{cp: sync})
			}
		} else if sh != nil && sh.manifests() {
			// Tell the backup what changed, unless a sync brings it now.
			for _, m := range manifests(cp, freq, sh.ranges()) {
				in.manifests.Add(1)
				out = append(out, outgoing{msg: m, epoch: cp.Epoch})
			}
		}
	}
	in.heldBytes.Store(b.lacking * mmu.PageSize)
	if len(out) == 0 {
		return
	}
	b.enqueue(out...)
}

// enqueue queues out for the writer, or, past the queue's limit, drops the
// queue for a re-seed.
func (b *backupLink) enqueue(out ...outgoing) {
	n := 0
	for _, o := range out {
		if o.cp != nil {
			n += len(o.cp.Data)
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

// manifests describes the pages of cp in ranges (all if none) for the
// backup, in manifests of at most wire.MaxManifestPages pages.
func manifests(cp *Checkpoint, freq func(i int) float64, ranges []Range) []*wire.Manifest {
	var out []*wire.Manifest
	var m *wire.Manifest
	for i, pfn := range cp.PFNs {
		if !inRanges(ranges, pfn) {
			continue
		}
		if m == nil || len(m.Pages) == wire.MaxManifestPages {
			m = &wire.Manifest{Epoch: cp.Epoch}
			out = append(out, m)
		}
		m.Pages = append(m.Pages, wire.ManifestPage{PFN: pfn, Freq: wire.FreqFixed(freq(i))})
	}
	return out
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
	closer, _ := c.(io.Closer)
	c, err := in.wrapBackupConn(c)
	if err != nil {
		return fmt.Errorf("serve backup: %w", err)
	}
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
		// Under mu: hold-back bookkeeping restarts from this image, and
		// everything queued after it is relative to it.
		in.mu.Lock()
		b.mu.Lock()
		b.reseed = false
		b.mu.Unlock()
		cp, err := in.img.Snapshot(in.regions)
		if cp != nil {
			b.lacks, b.lacking, b.synced, b.holdMode = nil, 0, cp.Epoch, false
			in.heldBytes.Store(0)
		}
		in.mu.Unlock()
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
	for _, o := range q {
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
		cp := o.cp
		if cp.Epoch <= sent {
			// Already in the re-seed image. (An earlier epoch from a
			// restarted primary is caught by the next delta, which does
			// not follow: that re-seeds.)
			continue
		}
		if cp.Stage {
			if sent == 0 {
				continue // no base yet: the re-seed will carry them
			}
			if err := SendCheckpoint(b.c, cp, sent); err != nil {
				return err
			}
			in.forwarded.Add(uint64(len(cp.Data)))
			in.stagedOut.Add(uint64(len(cp.Data)))
			continue
		}
		if cp.Staged && cp.Base != sent {
			// A sync on another base than the backup's: re-seed.
			b.mu.Lock()
			b.reseed = true
			b.mu.Unlock()
			break
		}
		if !cp.Full && !cp.Staged && (sent == 0 || cp.Epoch != sent+1) {
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
		if _, refused := m.(*wire.Error); !refused {
			in.heardOnce.Do(func() { close(in.heard) }) // the backup stands by
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

// sync makes sure the backup holds epoch: whatever hold-back kept goes in a
// sync, anything else a policy held back is sent as a re-seed from the
// image, and the backup's acknowledgement is awaited.
func (b *backupLink) sync(ctx context.Context, in *Intermediary, epoch uint64) error {
	in.flushHeld(b)
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
// The Activate goes through the writer, so that it never lands inside a
// checkpoint stream.
func (b *backupLink) activate(ctx context.Context, epoch uint64) error {
	b.reply(&wire.Activate{Epoch: epoch})
	return b.wait(ctx, func() bool { return b.activated })
}

// stagedPages copies the pages of cp at the indexes stage into a Stage
// checkpoint.
func stagedPages(cp *Checkpoint, stage []int) *Checkpoint {
	out := &Checkpoint{Epoch: cp.Epoch, Stage: true, PFNs: make([]uint64, 0, len(stage)), Data: make([]byte, 0, len(stage)*mmu.PageSize)}
	for _, i := range stage {
		if i >= 0 && i < len(cp.PFNs) {
			out.PFNs = append(out.PFNs, cp.PFNs[i])
			out.Data = append(out.Data, cp.Page(i)...)
		}
	}
	return out
}

// syncCheckpoint builds the hold-back sync to the image's epoch: every
// page held back since the last sync, copied from the image, and the state;
// the backup commits it together with the pages staged since. Call with
// in.mu held.
// A backup with no epoch yet cannot take a delta: it gets a re-seed
// instead, and syncCheckpoint returns nil.
func (in *Intermediary) syncCheckpoint(b *backupLink) *Checkpoint {
	if b.synced == 0 {
		b.lacks, b.lacking = nil, 0
		b.mu.Lock()
		b.reseed = true
		b.mu.Unlock()
		b.poke()
		return nil
	}
	var cp *Checkpoint
	in.img.Read(func(mem, state []byte, epoch uint64) {
		cp = &Checkpoint{Epoch: epoch, Staged: true, Base: b.synced, State: append([]byte(nil), state...)}
		cp.PFNs = make([]uint64, 0, b.lacking)
		cp.Data = make([]byte, 0, b.lacking*mmu.PageSize)
		for _, r := range in.regions {
			first := r.Offset / mmu.PageSize
			for k := uint64(0); k < r.Size/mmu.PageSize; k++ {
				if off := first + k; b.lacks != nil && b.lacks[off] {
					cp.PFNs = append(cp.PFNs, r.GPA/mmu.PageSize+k)
					cp.Data = append(cp.Data, mem[off*mmu.PageSize:(off+1)*mmu.PageSize]...)
					b.lacks[off] = false
				}
			}
		}
	})
	in.log.Debug("hold-back sync", "epoch", cp.Epoch, "base", b.synced, "pages", len(cp.PFNs))
	b.lacking = 0
	b.synced = cp.Epoch
	in.syncs.Add(1)
	return cp
}

// flushHeld queues a sync to the image's epoch if hold-back left the
// backup short of it (Failover and the orderly end call it).
func (in *Intermediary) flushHeld(b *backupLink) {
	in.mu.Lock()
	defer in.mu.Unlock()
	// synced == 0: a re-seed is on its way (forward asked for it), and its
	// snapshot, taken after this, covers the image's epoch.
	if !b.holdMode || b.synced == 0 || b.synced >= in.img.Epoch() {
		return
	}
	cp := in.syncCheckpoint(b)
	in.heldBytes.Store(0)
	if cp != nil {
		b.enqueue(outgoing{cp: cp})
	} else {
		b.poke()
	}
}

// reply queues m for the backup, to go between checkpoints.
func (b *backupLink) reply(m wire.Message) {
	b.mu.Lock()
	b.ctl = append(b.ctl, m)
	b.mu.Unlock()
	b.poke()
}

// installPolicy validates a policy the backup asks for and, if it is good,
// makes it the forwarding policy. A refusal says why and changes nothing.
func (in *Intermediary) installPolicy(b *backupLink, m *wire.Policy) wire.Message {
	refuse := func(err error) wire.Message {
		in.log.Warn("refused the backup's policy", "version", m.Version, "spec", m.Spec, "err", err)
		return &wire.Error{Code: wire.CodeRefused, Reason: truncate(fmt.Sprintf("policy %d refused: %v", m.Version, err), wire.MaxReasonLen)}
	}
	if m.Version <= b.policyVersion {
		return refuse(fmt.Errorf("version %d is not newer than the installed %d", m.Version, b.policyVersion))
	}
	h, err := ParseBackupPolicy(m.Spec)
	if err == nil {
		err = h.checkRegions(in.regions)
	}
	if err != nil {
		return refuse(err)
	}
	b.policyVersion = m.Version
	in.SetForwardPolicy(*h)
	in.log.Info("installed the backup's policy", "version", m.Version, "policy", h.String())
	return &wire.PolicyAck{Version: m.Version}
}

// servePages answers a backup's page request: the requested pages that
// changed since its last sync and were not staged since are staged now, from
// the image at its current epoch, within the policy's bandwidth cap; Served
// follows them. A request naming a page outside guest memory is refused
// whole (CodeBadRequest) and changes nothing. Pages served are no longer
// held: a sync brings them only if they change again.
func (in *Intermediary) servePages(b *backupLink, m *wire.PageRequest) {
	for _, pfn := range m.PFNs {
		if _, err := in.PageOffset(pfn); err != nil {
			in.requestsRefused.Add(1)
			in.log.Warn("refused a page request from the backup", "id", m.ID, "pfn", pfn, "err", err)
			b.reply(&wire.Error{Code: wire.CodeBadRequest, Reason: truncate(fmt.Sprintf(
				"page request %d refused: page %#x (address %#x) is outside guest memory (%d pages)",
				m.ID, pfn, pfn*mmu.PageSize, in.img.Pages()), wire.MaxReasonLen)})
			return
		}
	}
	in.bmu.Lock()
	p := in.policy
	in.bmu.Unlock()
	var rate uint64
	if sh, ok := p.(shaper); ok {
		rate = sh.stageRate()
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	var want []uint64
	if b.lacks != nil && b.synced != 0 {
		for _, pfn := range m.PFNs {
			if off, _ := in.PageOffset(pfn); b.lacks[off/mmu.PageSize] {
				want = append(want, pfn)
			}
		}
		want = want[:b.limiter.take(rate, len(want))]
	}
	epoch := max(in.img.Epoch(), 1)
	var out []outgoing
	if len(want) > 0 {
		cp := &Checkpoint{Stage: true, PFNs: want, Data: make([]byte, 0, len(want)*mmu.PageSize)}
		in.img.Read(func(mem, _ []byte, e uint64) {
			cp.Epoch = e
			for _, pfn := range want {
				off, _ := in.PageOffset(pfn)
				cp.Data = append(cp.Data, mem[off:off+mmu.PageSize]...)
				b.lacks[off/mmu.PageSize] = false
			}
		})
		b.lacking -= uint64(len(want))
		in.heldBytes.Store(b.lacking * mmu.PageSize)
		in.pagesServed.Add(uint64(len(want)))
		epoch = cp.Epoch
		out = append(out, outgoing{cp: cp})
	}
	out = append(out, outgoing{msg: &wire.Served{ID: m.ID, Epoch: epoch, Pages: uint32(len(want))}})
	in.pagesRequested.Add(uint64(len(m.PFNs)))
	b.enqueue(out...)
}
