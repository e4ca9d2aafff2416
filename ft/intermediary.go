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
)

// Intermediary receives checkpoints from the primary, verifies each one
// completely, applies it to its image and only then acknowledges it. It
// forwards what it acknowledged to the backup, as its ForwardPolicy decides,
// without ever delaying an acknowledgement; on Failover it fences the primary
// and activates the backup at the last acknowledged epoch.
type Intermediary struct {
	img     *Image
	regions []mmu.Region
	log     *slog.Logger

	// mu orders applying and acknowledging against fencing: a checkpoint is
	// applied, passed to forward and acknowledged under mu, and only while
	// not fenced. So while mu is held the image is at the last epoch
	// forwarded (flushHeld relies on it).
	mu      sync.Mutex
	fenced  bool
	primary MessageConn // the primary link being served, if any

	// policy is the forwarding policy (its own lock).
	policy policyHolder

	// bmu guards backup, attached and stall.
	bmu      sync.Mutex
	backup   *backupLink
	attached chan struct{} // closed while a backup is attached
	stall    bool          // BackupLossPolicy StallWithoutBackup
	fencedCh chan struct{} // closed by Failover
	stopped  chan struct{} // closed by Stop
	stopOnce sync.Once

	// heard is closed once a backup has answered on its link (it stands
	// by); heardOnce guards the close. active is why a backup refused this
	// intermediary because it runs the guest already ("" if none did).
	heard     chan struct{}
	heardOnce sync.Once
	active    atomic.Pointer[string]

	// spare is page memory of a received checkpoint nothing uses any more,
	// for the next one.
	spare pageBuffer

	// disks is the copy of the guest's disks at the image's epoch
	// (diskstore.go).
	disks diskStore

	// Stats.
	received    atomic.Uint64 // checkpoint bytes received and applied
	forwarded   atomic.Uint64 // checkpoint bytes sent to backups
	backupAcked atomic.Uint64 // the backup's last acknowledged epoch
	reseeds     atomic.Uint64
	rate        rate

	failoverTimes atomic.Pointer[FailoverTimes]

	// WAN compression (guarded by bmu) and its page bytes in and out.
	wanLevel        wanzip.Level
	wanRaw, wanWire atomic.Uint64

	// Hold-back figures.
	heldBytes atomic.Uint64 // page bytes held back from the backup
	syncs     atomic.Uint64
	// Backup-driven retrieval figures.
	manifests, pagesRequested, pagesServed, requestsRefused atomic.Uint64
	stagedOut                                               atomic.Uint64 // page bytes sent ahead of a sync
	// applied[e%len] is when epoch e (stored alongside) was applied.
	appliedMu sync.Mutex
	applied   [4096]struct {
		epoch uint64
		at    time.Time
	}
}

// noteApplied records when epoch e was applied (for lag in time).
func (in *Intermediary) noteApplied(e uint64) {
	in.appliedMu.Lock()
	in.applied[e%uint64(len(in.applied))] = struct {
		epoch uint64
		at    time.Time
	}{e, time.Now()}
	in.appliedMu.Unlock()
}

// appliedAt returns when epoch e was applied here. An epoch too old to be
// remembered counts as old as the oldest one remembered after it (a lag is
// never understated by more than that); epoch 0 or one not yet seen is now.
func (in *Intermediary) appliedAt(e uint64) time.Time {
	in.appliedMu.Lock()
	defer in.appliedMu.Unlock()
	if a := in.applied[e%uint64(len(in.applied))]; a.epoch == e && e != 0 {
		return a.at
	}
	oldest := time.Now()
	for _, a := range in.applied {
		if a.epoch != 0 && a.epoch > e && a.at.Before(oldest) {
			oldest = a.at
		}
	}
	return oldest
}

// FailoverTimes are the phases of the last Failover.
type FailoverTimes struct {
	Flush    time.Duration // bringing the backup to the acknowledged epoch
	Activate time.Duration // from Activate sent to the backup's Ready (restore included)
}

// LastFailover returns the phases of the last successful Failover (nil if
// none).
func (in *Intermediary) LastFailover() *FailoverTimes { return in.failoverTimes.Load() }

// BackupLossPolicy is what the intermediary does while no backup is
// attached.
type BackupLossPolicy int

const (
	// ContinueWithoutBackup goes on acknowledging the primary, so its guest
	// and output go on; a returning or new backup is re-seeded with a full
	// image. While no backup is attached, losing the intermediary too
	// loses the epochs since the backup's last one (the backup reports
	// that window).
	ContinueWithoutBackup BackupLossPolicy = iota
	// StallWithoutBackup stops acknowledging the primary until a backup is
	// attached again, so the primary holds its output meanwhile.
	StallWithoutBackup
)

// ParseBackupLossPolicy parses "continue" or "stall".
func ParseBackupLossPolicy(s string) (BackupLossPolicy, error) {
	switch s {
	case "continue", "":
		return ContinueWithoutBackup, nil
	case "stall":
		return StallWithoutBackup, nil
	}
	return 0, fmt.Errorf("backup-loss policy %q: want continue or stall", s)
}

func (p BackupLossPolicy) String() string {
	if p == StallWithoutBackup {
		return "stall"
	}
	return "continue"
}

// SetBackupLossPolicy sets what happens while no backup is attached.
func (in *Intermediary) SetBackupLossPolicy(p BackupLossPolicy) {
	in.bmu.Lock()
	in.stall = p == StallWithoutBackup
	in.bmu.Unlock()
}

// waitForBackup blocks, under StallWithoutBackup, until a backup is
// attached or the intermediary is fenced.
func (in *Intermediary) waitForBackup() error {
	for {
		in.bmu.Lock()
		stall, attached, attachedCh := in.stall, in.backup != nil, in.attached
		in.bmu.Unlock()
		if !stall || attached {
			return nil
		}
		in.log.Warn("no backup attached: holding acknowledgements (policy stall)")
		select {
		case <-attachedCh:
		case <-in.fencedCh:
			return nil
		case <-in.stopped:
			return ErrStopped
		}
	}
}

// ErrStopped is returned by ServePrimary when Stop ended a wait for a
// backup: the checkpoint that waited is not acknowledged.
var ErrStopped = errors.New("intermediary stopped")

// Stop ends every wait for a backup (policy stall) without acknowledging:
// for an intermediary shutting down. It can be called more than once.
func (in *Intermediary) Stop() {
	in.stopOnce.Do(func() { close(in.stopped) })
}

// ErrFenced is returned by ServePrimary once Failover has fenced the
// primary: it is never acknowledged again.
var ErrFenced = errors.New("primary fenced")

// ErrNothingToActivate is returned by Failover when the primary was lost
// before the intermediary acknowledged any checkpoint: no output was
// released, and there is no guest to resume.
var ErrNothingToActivate = errors.New("the primary was lost before its first checkpoint was acknowledged: no output was released and there is no epoch to activate")

// ErrPrimaryLost is returned by ServePrimary when the primary's link ends
// without a goodbye or fails: the caller should fail over.
var ErrPrimaryLost = errors.New("primary lost")

// ErrRefused is returned by ServePrimary when it refused what the primary
// sent (a checkpoint that fails verification or does not apply, or a
// message out of protocol): the refusal changed nothing and ended the link,
// but the primary is alive. It may reconnect and send a full image; the
// caller should not fail over at once.
var ErrRefused = errors.New("refused the primary's message")

// NewIntermediary returns an intermediary for a guest of memSize bytes. It
// forwards with ForwardEvery until SetForwardPolicy says otherwise.
func NewIntermediary(memSize uint64, log *slog.Logger) (*Intermediary, error) {
	if memSize == 0 || memSize%mmu.RegionSize != 0 {
		return nil, fmt.Errorf("intermediary: guest memory of %d bytes: want a non-zero multiple of 2 MiB", memSize)
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return &Intermediary{img: NewImage(memSize), regions: mmu.Layout(memSize), log: log,
		attached: make(chan struct{}), fencedCh: make(chan struct{}), stopped: make(chan struct{}), heard: make(chan struct{})}, nil
}

// Image returns the intermediary's replica.
func (in *Intermediary) Image() *Image { return in.img }

// PageOffset maps a guest page frame number to its offset in the image.
func (in *Intermediary) PageOffset(pfn uint64) (uint64, error) {
	return mmu.LayoutOffset(in.regions, pfn*mmu.PageSize, mmu.PageSize)
}

// maxPFN is one past the highest guest page frame.
func (in *Intermediary) maxPFN() uint64 { return layoutMaxPFN(in.regions) }

// layoutMaxPFN is one past the highest page frame of a guest-physical layout.
func layoutMaxPFN(regions []mmu.Region) uint64 {
	r := regions[len(regions)-1]
	return (r.GPA + r.Size) / mmu.PageSize
}

// Fenced reports whether Failover has fenced the primary.
func (in *Intermediary) Fenced() bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.fenced
}

// ServePrimary handles one primary link until it ends. A checkpoint that
// arrived whole but fails verification or does not apply is refused with an
// Error, changes nothing, and ends the link (ErrRefused). A link that ends
// or breaks, also in the middle of a checkpoint (end of stream, a reset, a
// truncated frame), is a lost primary (ErrPrimaryLost): fail over. Once the intermediary is fenced it neither
// applies nor acknowledges anything from the primary and returns ErrFenced.
func (in *Intermediary) ServePrimary(c MessageConn) error {
	in.mu.Lock()
	if in.fenced {
		in.mu.Unlock()
		_ = c.WriteMessage(&wire.Error{Code: wire.CodeFenced, Reason: "this intermediary has failed over"})
		return ErrFenced
	}
	in.primary = c
	in.mu.Unlock()
	defer func() {
		in.mu.Lock()
		if in.primary == c {
			in.primary = nil
		}
		in.mu.Unlock()
	}()
	// The primary may compress its page batches (PrimaryConfig.Compression).
	dec, err := wanzip.NewDecoder()
	if err != nil {
		return err
	}
	rc := &decompressingConn{MessageConn: c, dec: dec}
	for {
		m, err := rc.ReadMessage()
		if in.Fenced() {
			return ErrFenced
		}
		if errors.Is(err, io.EOF) {
			// A primary that finishes says Bye; a link that just ends
			// means the primary (or its host) is gone.
			return fmt.Errorf("%w: link closed without a goodbye", ErrPrimaryLost)
		}
		if err != nil {
			return fmt.Errorf("%w: %w", ErrPrimaryLost, err)
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			cp, base, err := receiveCheckpoint(rc, m, in.maxPFN(), in.spare.take(int(min(m.Pages, in.maxPFN()))*mmu.PageSize), in.diskDir)
			if err == nil {
				err = in.commit(c, cp, base)
			}
			if errors.Is(err, ErrFenced) || errors.Is(err, ErrStopped) {
				return err
			}
			if errors.Is(err, ErrLinkBroken) || errors.Is(err, errAckFailed) {
				// The checkpoint never arrived whole, or its
				// acknowledgement could not go out: the link broke, the
				// primary is lost (a refusal is for a checkpoint that
				// arrived and failed verification).
				if in.Fenced() {
					return ErrFenced
				}
				return fmt.Errorf("%w: %w", ErrPrimaryLost, err)
			}
			if err != nil {
				in.log.Warn("refused a checkpoint", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return fmt.Errorf("%w: %w", ErrRefused, err)
			}
		case *wire.Bye:
			return nil
		default:
			err := fmt.Errorf("unexpected %v from the primary", m.Type())
			_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: err.Error()})
			return fmt.Errorf("%w: %w", ErrRefused, err)
		}
	}
}

// commit applies a verified checkpoint and acknowledges it, unless the
// primary has been fenced. An apply error changes nothing.
func (in *Intermediary) commit(c MessageConn, cp *Checkpoint, base uint64) error {
	if err := in.waitForBackup(); err != nil {
		return err
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	if in.fenced {
		return ErrFenced
	}
	// Disk replication (diskstore.go): the disk writes or seed must fit
	// before anything is applied.
	if err := in.checkDisks(cp); err != nil {
		cp.Seed.Remove()
		return err
	}
	// A full image received in its final place becomes the image without
	// a copy; the memory the image held until then is free.
	old, adopted, err := in.img.ApplyAdopting(cp, base, in.PageOffset)
	if err != nil {
		cp.Seed.Remove()
		return err
	}
	// Disk replication: the disks follow the image, and the epoch's
	// writes go to the backup ahead of the checkpoint that commits them.
	if err := in.applyDisks(cp); err != nil {
		return err
	}
	in.forwardDisks(cp)
	if adopted {
		in.spare.put(old)
	}
	in.received.Add(uint64(len(cp.Data) + len(cp.State)))
	in.noteApplied(cp.Epoch)
	// Queued under mu, so that Failover finds every applied epoch queued
	// (also one whose acknowledgement cannot be sent: Failover activates
	// the image's epoch, and hold-back's bookkeeping must know its pages).
	if !in.forward(cp, adopted) && !adopted {
		// No backup link took cp into its queue: its page memory is
		// free. (One that did gives it back once sent: sendBatch.)
		in.spare.put(cp.Data)
	}
	if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
		return fmt.Errorf("%w %d: %w", errAckFailed, cp.Epoch, err)
	}
	return nil
}

// errAckFailed wraps a failure to send an acknowledgement: the link broke.
var errAckFailed = errors.New("acknowledge epoch")

// Failover fences the primary (it is not read or acknowledged again and its
// link is closed), brings the backup to the last epoch the intermediary
// acknowledged, waits for the backup to acknowledge that epoch, and tells it
// to activate. It returns the epoch the backup activated at. Every output the
// primary released is covered by that epoch: the intermediary applied every
// checkpoint before acknowledging it, and the backup holds what it applied.
// Fencing cannot be undone; if no backup is attached or the backup link
// fails, Failover returns an error and may be called again once a backup is
// attached (it is re-seeded from the image).
func (in *Intermediary) Failover(ctx context.Context) (uint64, error) {
	epoch := in.fence("fenced: the backup takes over")
	if epoch == 0 {
		return 0, ErrNothingToActivate
	}
	in.bmu.Lock()
	b := in.backup
	in.bmu.Unlock()
	if b == nil {
		return 0, fmt.Errorf("failover to epoch %d: no backup attached", epoch)
	}
	in.log.Info("failover: primary fenced", "epoch", epoch)
	t0 := time.Now()
	if err := b.sync(ctx, in, epoch); err != nil {
		return 0, fmt.Errorf("failover to epoch %d: %w", epoch, err)
	}
	t1 := time.Now()
	if err := b.activate(ctx, epoch); err != nil {
		return 0, fmt.Errorf("failover to epoch %d: %w", epoch, err)
	}
	in.failoverTimes.Store(&FailoverTimes{Flush: t1.Sub(t0), Activate: time.Since(t1)})
	in.log.Info("failover: backup activated", "epoch", epoch, "flush", t1.Sub(t0), "activate", time.Since(t1))
	return epoch, nil
}

// fence fences the primary: it is never acknowledged again, and its link,
// if any, is closed with a CodeFenced error giving reason. It returns the
// image's epoch at that moment: everything applied was acknowledged (or
// its acknowledgement failed).
func (in *Intermediary) fence(reason string) uint64 {
	in.mu.Lock()
	if !in.fenced {
		close(in.fencedCh)
	}
	in.fenced = true
	pc := in.primary
	epoch := in.img.Epoch()
	in.mu.Unlock()
	switch c := pc.(type) {
	case interface {
		CloseWithError(wire.Code, string) error
	}:
		_ = c.CloseWithError(wire.CodeFenced, reason)
	case io.Closer:
		_ = c.Close()
	}
	return epoch
}

// ErrBackupActive is returned when the backup refused this intermediary
// because it runs the guest already: an earlier failover activated it. The
// intermediary fences the primary then, so a primary that another
// intermediary superseded never has its output released (say, after the
// intermediary was restarted and the old primary reached it again).
var ErrBackupActive = errors.New("the backup runs the guest already (an earlier failover activated it)")

// backupRefused handles an Error from a backup: one saying the backup is
// active fences the primary and returns ErrBackupActive.
func (in *Intermediary) backupRefused(err error) error {
	var we *wire.Error
	if !errors.As(err, &we) || we.Code != wire.CodeFenced {
		return nil
	}
	reason := we.Reason
	in.active.Store(&reason)
	in.fence("fenced: " + reason)
	in.log.Warn("the backup refused this intermediary: it runs the guest already; primary fenced", "reason", reason)
	return fmt.Errorf("%w: %s", ErrBackupActive, reason)
}

// WaitForBackup waits until a backup has answered this intermediary (it
// stands by, so no failover activated it), ctx ends, or a backup refused it
// as active (ErrBackupActive; the primary is fenced then). Until a backup
// has answered, the intermediary cannot know that no earlier failover
// superseded the primary: call it before acknowledging anything when the
// intermediary may be a restarted one.
func (in *Intermediary) WaitForBackup(ctx context.Context) error {
	select {
	case <-in.heard:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-in.fencedCh:
	}
	// Fenced: by a backup's refusal (active is set before the fence) or by
	// a failover.
	if r := in.active.Load(); r != nil {
		return fmt.Errorf("%w: %s", ErrBackupActive, *r)
	}
	return ErrFenced
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// backupAcked records the backup's acknowledgement of epoch e and tells the
// primary, whose status shows the backup's epoch.
func (in *Intermediary) noteBackupAck(e uint64) {
	in.backupAcked.Store(e)
	in.mu.Lock()
	pc := in.primary
	in.mu.Unlock()
	if pc != nil {
		_ = pc.WriteMessage(&wire.Status{Role: wire.RoleBackup, Committed: e})
	}
}

// Metrics returns the intermediary's metrics.
func (in *Intermediary) Metrics() []Metric {
	in.bmu.Lock()
	attached := 0.0
	if in.backup != nil {
		attached = 1
	}
	in.bmu.Unlock()
	fenced := 0.0
	if in.Fenced() {
		fenced = 1
	}
	lagE, lagS := in.BackupLag()
	return []Metric{
		{Name: "understudy_intermediary_epoch", Help: "Last epoch applied and acknowledged to the primary.", Kind: "gauge", Value: float64(in.img.Epoch())},
		{Name: "understudy_intermediary_backup_epoch", Help: "Last epoch the backup acknowledged.", Kind: "gauge", Value: float64(in.backupAcked.Load())},
		{Name: "understudy_intermediary_backup_attached", Help: "1 while a backup is attached.", Kind: "gauge", Value: attached},
		{Name: "understudy_intermediary_received_bytes_total", Help: "Checkpoint bytes received, verified and applied.", Kind: "counter", Value: float64(in.received.Load())},
		{Name: "understudy_intermediary_forwarded_bytes_total", Help: "Checkpoint bytes sent to the backup.", Kind: "counter", Value: float64(in.forwarded.Load())},
		{Name: "understudy_intermediary_reseeds_total", Help: "Full images sent to a backup.", Kind: "counter", Value: float64(in.reseeds.Load())},
		{Name: "understudy_intermediary_fenced", Help: "1 once the primary has been fenced (failed over).", Kind: "gauge", Value: fenced},
		{Name: "understudy_intermediary_held_bytes", Help: "Page bytes held back from the backup until the next sync (hold-back).", Kind: "gauge", Value: float64(in.heldBytes.Load())},
		{Name: "understudy_intermediary_backup_lag_epochs", Help: "Epochs the backup's committed epoch is behind.", Kind: "gauge", Value: float64(lagE)},
		{Name: "understudy_intermediary_backup_lag_seconds", Help: "How long ago the backup's committed epoch was applied here.", Kind: "gauge", Value: lagS.Seconds()},
		{Name: "understudy_intermediary_syncs_total", Help: "Hold-back syncs sent to the backup.", Kind: "counter", Value: float64(in.syncs.Load())},
		{Name: "understudy_intermediary_wan_bytes_total", Help: "Checkpoint bytes sent on the backup link (the WAN), before compression.", Kind: "counter", Value: float64(in.forwarded.Load())},
		{Name: "understudy_intermediary_wan_compressed_in_bytes_total", Help: "Page bytes compressed for the WAN.", Kind: "counter", Value: float64(in.wanRaw.Load())},
		{Name: "understudy_intermediary_wan_compressed_out_bytes_total", Help: "Bytes those pages took on the WAN.", Kind: "counter", Value: float64(in.wanWire.Load())},
		{Name: "understudy_intermediary_staged_bytes_total", Help: "Page bytes sent to the backup ahead of a sync (staged or requested).", Kind: "counter", Value: float64(in.stagedOut.Load())},
		{Name: "understudy_intermediary_manifests_total", Help: "Manifests sent to the backup (backup-driven retrieval).", Kind: "counter", Value: float64(in.manifests.Load())},
		{Name: "understudy_intermediary_requested_pages_total", Help: "Pages the backup requested.", Kind: "counter", Value: float64(in.pagesRequested.Load())},
		{Name: "understudy_intermediary_served_pages_total", Help: "Requested pages staged at the backup.", Kind: "counter", Value: float64(in.pagesServed.Load())},
		{Name: "understudy_intermediary_refused_requests_total", Help: "Page requests refused (a page outside guest memory).", Kind: "counter", Value: float64(in.requestsRefused.Load())},
		// Disk replication (diskstore.go).
		{Name: "understudy_intermediary_disk_bytes_total", Help: "Disk write bytes received, checked and applied to the intermediary's copy of the guest's disks.", Kind: "counter", Value: float64(in.disks.bytes.Load())},
	}
}

// BackupLag returns how far the backup's committed epoch is behind the
// intermediary's, in epochs and in time.
func (in *Intermediary) BackupLag() (uint64, time.Duration) {
	e, b := in.img.Epoch(), in.backupAcked.Load()
	if b >= e {
		return 0, 0
	}
	return e - b, time.Since(in.appliedAt(b))
}

// StatusLine returns the intermediary's live status (rates since the
// previous call).
func (in *Intermediary) StatusLine() string {
	in.bmu.Lock()
	attached := in.backup != nil
	in.bmu.Unlock()
	b := "attached"
	if !attached {
		b = "NONE"
	}
	lagE, lagS := in.BackupLag()
	s := fmt.Sprintf("epoch=%d in_MiB/s=%.1f backup=%s backup_epoch=%d lag=%d lag_s=%.2f held_MiB=%.1f wan_MiB=%.1f",
		in.img.Epoch(), in.rate.per(float64(in.received.Load()))/(1<<20), b, in.backupAcked.Load(),
		lagE, lagS.Seconds(), float64(in.heldBytes.Load())/(1<<20), float64(in.forwarded.Load())/(1<<20))
	if n := in.manifests.Load(); n > 0 {
		s += fmt.Sprintf(" manifests=%d requested=%d served=%d", n, in.pagesRequested.Load(), in.pagesServed.Load())
	}
	return s
}

// KeepBackup keeps a backup attached until ctx ends or a failover activated
// it: it dials one with dial, serves it (ServeBackup: a re-seed first), and
// when the link is lost dials again every retry. The primary is not
// affected by a lost backup unless the policy is StallWithoutBackup.
func (in *Intermediary) KeepBackup(ctx context.Context, dial Dialer, retry time.Duration) error {
	for {
		c, err := dial(ctx)
		if err == nil {
			err = in.ServeBackup(ctx, c)
			if cl, ok := c.(io.Closer); ok {
				cl.Close()
			}
			if err == nil {
				return nil // activated
			}
			if aerr := in.backupRefused(err); aerr != nil {
				return aerr
			}
			if in.Fenced() {
				return err
			}
			in.log.Warn("backup lost; the primary goes on", "err", err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if in.Fenced() {
			return fmt.Errorf("backup unreachable after failover: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(retry):
		}
	}
}

// ByePrimaryFinished is the reason of the Bye an intermediary sends the
// backup when the primary's guest exited: protection is over.
const ByePrimaryFinished = "primary finished"

// EndProtection tells the attached backup, if any, that the primary's guest
// exited in order (ServePrimary returned nil), so it stops waiting.
// It first lets the backup catch up with the last epoch, within timeout.
func (in *Intermediary) EndProtection(timeout time.Duration) {
	in.bmu.Lock()
	b := in.backup
	in.bmu.Unlock()
	if b != nil {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		_ = b.sync(ctx, in, in.img.Epoch())
		_ = b.c.WriteMessage(&wire.Bye{Reason: ByePrimaryFinished})
	}
}
