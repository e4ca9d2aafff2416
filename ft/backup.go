package ft

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
)

// BackupConfig configures a backup.
type BackupConfig struct {
	// Restore is what the activated machine takes from this host and the
	// caller (console, OnRecord, ...) rather than from the replicated state.
	Restore vmm.RestoreConfig
	// Log receives refusals and activations (nil: discarded).
	Log *slog.Logger
	// Policy, if set, is the forwarding policy this backup installs at
	// every intermediary that serves it (backup-driven retrieval; see
	// ParseBackupPolicy), e.g. "pull-every=2s,max-lag-epochs=400".
	Policy string
	// Request is how the backup picks pages to request when its policy
	// has the intermediary send manifests (nil: DefaultRequestPolicy).
	Request *RequestPolicy
	// Disks are the paths of this backup's copies of the guest's disks,
	// in the primary's disk order (understudy backup --disk): each is a
	// diskrep.Replica, seeded with every full image and advanced with the
	// committed epoch; on activation the guest's disks are these files
	// (they replace Restore.Disks). None: the guest must have no disks.
	Disks []string
}

// Backup keeps a committed image of the protected guest at a complete epoch
// and activates it on the intermediary's request. A checkpoint stream is
// staged whole and verified (ReceiveCheckpoint) before it is committed, and
// it is committed atomically (Image.Apply): the committed epoch advances only
// by complete verified checkpoints, and anything refused changes nothing.
type Backup struct {
	img     *Image
	regions []mmu.Region
	cfg     BackupConfig
	log     *slog.Logger

	// mu guards active, activatedState, activatedHeat and ram.
	mu             sync.Mutex
	active         bool // activated (or failed to): the image is the guest's now
	activatedState *vmm.MachineState
	activatedHeat  []byte      // the large-page heat the activated checkpoint carried
	ram            *mmu.Memory // holds img's memory until a machine takes it over

	// policyVersion counts the policies sent; policyState says what became
	// of the last one ("" until answered).
	policyVersion atomic.Uint64
	policyMu      sync.Mutex
	policyState   string

	// staged holds pages that arrived ahead of the hold-back sync that
	// commits them (latest version of each page; only Serve touches it).
	staged      map[uint64][]byte
	stagedSums  map[uint64]uint32 // the staged pages' end-to-end sums
	stagedBytes atomic.Uint64
	// ret is backup-driven retrieval's state (manifests and requests).
	ret *retriever

	// What the intermediary last said it acknowledged to the primary, and
	// when (for the data-loss window of an activation without it).
	interEpoch atomic.Uint64
	interSeen  atomic.Int64 // Unix nanoseconds
	// disks are the disk replicas (diskbackup.go).
	disks backupDisks

	// Stats.
	received    atomic.Uint64
	checkpoints atomic.Uint64
	rate        rate
}

// ErrActivated is returned once the backup has activated: it takes no more
// checkpoints and does not activate twice.
var ErrActivated = errors.New("backup already activated")

// NewBackup returns a backup for a guest of memSize bytes, with no epoch yet.
func NewBackup(memSize uint64, cfg BackupConfig) (*Backup, error) {
	if memSize == 0 || memSize%mmu.RegionSize != 0 {
		return nil, fmt.Errorf("backup: guest memory of %d bytes: want a non-zero multiple of 2 MiB", memSize)
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	// The committed image lives in guest RAM, so that activation hands it
	// to the restored machine without a copy.
	ram, err := mmu.New(mmu.Config{Size: memSize, Backing: cfg.Restore.Backing})
	if err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	req := DefaultRequestPolicy
	if cfg.Request != nil {
		req = *cfg.Request
	}
	return &Backup{img: NewImageOn(ram.Backing()), ram: ram, regions: mmu.Layout(memSize), cfg: cfg, log: log,
		ret: newRetriever(req)}, nil
}

// errBackupClosed refuses a checkpoint that arrives once the backup was
// closed or activated.
var errBackupClosed = errors.New("the backup is closed or activated: it takes no more checkpoints")

// Close releases the backup's image unless an activated machine owns it now.
func (b *Backup) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	derr := b.closeDisks() // disk replication (diskbackup.go)
	if b.ram == nil {
		return derr
	}
	err := errors.Join(b.ram.Close(), derr)
	b.ram = nil
	b.active = true // nothing may use the image any more
	return err
}

// Image returns the committed image.
func (b *Backup) Image() *Image { return b.img }

// Committed returns the committed epoch (0: none).
func (b *Backup) Committed() uint64 { return b.img.Epoch() }

func (b *Backup) pageOffset(pfn uint64) (uint64, error) {
	return mmu.LayoutOffset(b.regions, pfn*mmu.PageSize, mmu.PageSize)
}

// Serve handles one intermediary link. It first reports its committed epoch
// (Status), then commits every verified checkpoint and acknowledges it (Ack).
// A checkpoint that fails verification or does not apply is refused with an
// Error, changes nothing, and ends the link. Activate{e} for the committed
// epoch e restores the guest, confirms with Ready and returns the machine,
// ready to Run (the caller runs and closes it); Activate for any other epoch
// is refused with an Error and changes nothing. Serve returns a nil machine
// when the link ends without activation (with ErrProtectionEnded if the
// intermediary said the guest exited on the primary).
func (b *Backup) Serve(c MessageConn) (*vmm.Machine, error) { return b.serve(c, false) }

// ServeDirect handles a link from the primary itself, which replicates
// straight to the backup while it cannot reach an intermediary (its policy
// for a lost intermediary says so). The backup then acts as intermediary
// too: it commits and acknowledges the primary's checkpoints (a full image
// first), and the primary releases output on those acknowledgements. It
// returns ErrProtectionEnded when the primary's guest exited (its Bye), and
// nil with a nil machine when the link ended or failed otherwise: the
// primary is lost then, and every epoch it was acknowledged is committed,
// so the caller activates the committed epoch (nothing lost).
func (b *Backup) ServeDirect(c MessageConn) (*vmm.Machine, error) { return b.serve(c, true) }

func (b *Backup) serve(c MessageConn, direct bool) (*vmm.Machine, error) {
	if b.activated() {
		_ = c.WriteMessage(&wire.Error{Code: wire.CodeRefused, Reason: ErrActivated.Error()})
		return nil, ErrActivated
	}
	// The intermediary may compress page batches for the WAN.
	dec, err := wanzip.NewDecoder()
	if err != nil {
		return nil, fmt.Errorf("backup: %w", err)
	}
	c = &decompressingConn{MessageConn: c, dec: dec}
	if err := c.WriteMessage(&wire.Status{Role: wire.RoleBackup, Committed: b.Committed()}); err != nil {
		return nil, fmt.Errorf("backup: report status: %w", err)
	}
	if b.cfg.Policy != "" && !direct {
		v := b.policyVersion.Add(1)
		if err := c.WriteMessage(&wire.Policy{Version: v, Spec: b.cfg.Policy}); err != nil {
			return nil, fmt.Errorf("backup: install policy: %w", err)
		}
	}
	maxPFN := layoutMaxPFN(b.regions)
	var spare []byte // page memory of the last checkpoint committed
	for {
		m, err := c.ReadMessage()
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		if err != nil {
			if direct {
				b.log.Warn("the primary's direct link failed", "err", err)
				return nil, nil
			}
			return nil, fmt.Errorf("backup: %w", err)
		}
		if direct {
			switch m.(type) {
			case *wire.CheckpointBegin, *wire.Bye:
			default:
				err := fmt.Errorf("backup: unexpected %v from the primary", m.Type())
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: err.Error()})
				return nil, err
			}
		}
		switch m := m.(type) {
		case *wire.CheckpointBegin:
			if b.activated() {
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeRefused, Reason: ErrActivated.Error()})
				return nil, ErrActivated
			}
			cp, base, err := receiveCheckpoint(c, m, maxPFN, spare, b.seedDir)
			spare = nil
			if errors.Is(err, ErrLinkBroken) {
				// Not a refusal: the link broke before the checkpoint
				// ended. A primary's direct link breaking is a lost
				// primary, like a link that ends between checkpoints.
				if direct {
					b.log.Warn("the primary's direct link failed", "err", err)
					return nil, nil
				}
				return nil, fmt.Errorf("backup: %w", err)
			}
			if err == nil {
				err = b.commit(cp, base)
			}
			if err != nil {
				b.log.Warn("refused a checkpoint", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return nil, fmt.Errorf("backup: %w", err)
			}
			b.log.Debug("committed", "epoch", cp.Epoch, "base", base, "kind", cp.Kind, "pages", len(cp.PFNs))
			spare = cp.Data[:0] // applied (copied into the image): free for the next one
			b.ret.committed(cp.Epoch)
			b.received.Add(uint64(len(cp.Data) + len(cp.State)))
			b.checkpoints.Add(1)
			if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
				if direct {
					// The link failed under the acknowledgement: a
					// lost primary, as when it fails under a read.
					b.log.Warn("the primary's direct link failed", "err", err)
					return nil, nil
				}
				return nil, fmt.Errorf("backup: acknowledge epoch %d: %w", cp.Epoch, err)
			}
		case *wire.Activate:
			mach, err := b.Activate(m.Epoch)
			if err != nil {
				b.log.Warn("refused to activate", "epoch", m.Epoch, "err", err)
				code := wire.CodeRefused
				if !errors.Is(err, ErrWrongEpoch) && !errors.Is(err, ErrActivated) {
					code = wire.CodeInternal
				}
				if werr := c.WriteMessage(&wire.Error{Code: code, Reason: truncate(err.Error(), wire.MaxReasonLen)}); werr != nil {
					return nil, fmt.Errorf("backup: %w", werr)
				}
				continue
			}
			if err := c.WriteMessage(&wire.Ready{}); err != nil {
				// The guest is restored and is the caller's to run: the
				// intermediary fenced the primary before asking.
				b.log.Warn("could not confirm activation", "epoch", m.Epoch, "err", err)
			}
			return mach, nil
		case *wire.PageBatch:
			if err := b.stage(m, maxPFN); err != nil {
				b.log.Warn("refused staged pages", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return nil, fmt.Errorf("backup: %w", err)
			}
			b.ret.staged(m)
		case *wire.Manifest:
			reqs, err := b.ret.manifest(m, maxPFN)
			if err != nil {
				b.log.Warn("refused a manifest", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return nil, fmt.Errorf("backup: %w", err)
			}
			for _, r := range reqs {
				if err := c.WriteMessage(r); err != nil {
					return nil, fmt.Errorf("backup: request pages: %w", err)
				}
			}
		case *wire.DiskWrites:
			// Disk replication (diskbackup.go): an epoch's writes, ahead
			// of the checkpoint that commits it.
			if err := b.diskWrites(m); err != nil {
				b.log.Warn("refused disk writes", "epoch", m.Epoch, "err", err)
				_ = c.WriteMessage(&wire.Error{Code: wire.CodeIncomplete, Reason: truncate(err.Error(), wire.MaxReasonLen)})
				return nil, fmt.Errorf("backup: %w", err)
			}
		case *wire.Served:
			b.ret.done(m.ID, m.Pages)
		case *wire.Status:
			if m.Role == wire.RoleIntermediary {
				b.interEpoch.Store(m.Committed)
				b.interSeen.Store(time.Now().UnixNano())
			}
		case *wire.PolicyAck:
			b.setPolicyState(fmt.Sprintf("policy %d installed: %s", m.Version, b.cfg.Policy))
			b.log.Info("the intermediary installed this backup's policy", "version", m.Version, "policy", b.cfg.Policy)
		case *wire.Error:
			if m.Code == wire.CodeBadRequest {
				b.ret.refusedRequest(m.Reason)
				b.log.Warn("the intermediary refused a page request", "reason", m.Reason)
				continue
			}
			if m.Code != wire.CodeRefused || b.cfg.Policy == "" {
				return nil, fmt.Errorf("backup: the intermediary says: %w", m)
			}
			b.setPolicyState(m.Reason)
			b.log.Warn("the intermediary refused this backup's policy; it forwards by its own", "reason", m.Reason)
		case *wire.Bye:
			// A primary says Bye only when its guest exited.
			if m.Reason == ByePrimaryFinished || direct {
				return nil, ErrProtectionEnded
			}
			return nil, nil
		default:
			err := fmt.Errorf("backup: unexpected %v from the intermediary", m.Type())
			_ = c.WriteMessage(&wire.Error{Code: wire.CodeProtocol, Reason: err.Error()})
			return nil, err
		}
	}
}

func (b *Backup) activated() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.active
}

// ActivatedState returns the machine state the guest was activated from
// (nil before activation); with the machine's memory, before it runs, it
// makes a snapshot of exactly what was activated (vmm.WriteSnapshot).
func (b *Backup) ActivatedState() *vmm.MachineState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.activatedState
}

// ErrProtectionEnded is returned by Serve when the intermediary says the
// protected guest exited on the primary: there is nothing left to resume.
var ErrProtectionEnded = errors.New("protection ended: the guest exited on the primary")

// ErrWrongEpoch is returned by Activate for an epoch the backup has not
// committed.
var ErrWrongEpoch = errors.New("epoch not committed here")

// Activate restores the guest of committed epoch epoch into a new machine
// that is ready to Run, with the console and callbacks of the backup's
// configuration. An epoch other than the committed one is refused
// (ErrWrongEpoch) and changes nothing. Before returning it passes the output
// records the primary still held at that epoch (see envelope.go) to the
// configured OnRecord, so clients, which drop records they have already
// seen, continue without a gap; a Linux guest's held frames go to the
// taps of Restore.Nets (given in the order of the primary's NICs; the MAC
// is the state's) before it transmits, and its held console bytes to
// Restore.Console. The restore announces each NIC's MAC (RARP). Once a machine has been restored the backup
// takes no more checkpoints and does not activate again.
func (b *Backup) Activate(epoch uint64) (*vmm.Machine, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.active {
		return nil, ErrActivated
	}
	var (
		m   *vmm.Machine
		env envelope
		err error
	)
	b.img.Read(func(mem, state []byte, committed uint64) {
		if committed == 0 || committed != epoch {
			err = fmt.Errorf("activate epoch %d: %w (committed: %d)", epoch, ErrWrongEpoch, committed)
			return
		}
		if env, err = openEnvelope(state); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
			return
		}
		st := new(vmm.MachineState)
		if err = st.UnmarshalBinary(env.Machine); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
			return
		}
		// Disk replication (diskbackup.go): the replicas, at this
		// epoch, are the guest's disks.
		rc := b.cfg.Restore
		if err = b.activateDisks(epoch, &rc); err != nil {
			return
		}
		// The machine takes the image's memory over (and closes it even
		// if the restore fails): from here the backup is spent.
		ram := b.ram
		b.ram, b.active = nil, true
		// A Linux guest's frames the primary still held go out on this
		// host's taps before the guest transmits (vmm's restore).
		rc.NetCarried = env.Frames
		if m, err = vmm.RestoreMemory(rc, st, ram); err != nil {
			err = fmt.Errorf("activate epoch %d: %w", epoch, err)
		}
		b.activatedState = st
		b.activatedHeat = bytes.Clone(env.Heat) // checked by openEnvelope
	})
	if err != nil {
		return nil, err
	}
	// Release the output the primary still held at this epoch: it is
	// covered by the committed checkpoint (clients drop what they saw).
	if b.cfg.Restore.OnRecord != nil {
		for _, r := range env.Records {
			b.cfg.Restore.OnRecord(r)
		}
	}
	// And the console bytes it still held, before the guest prints more.
	if len(env.Console) > 0 && b.cfg.Restore.Console != nil {
		b.cfg.Restore.Console.Write(env.Console)
	}
	b.active = true
	b.log.Info("activated", "epoch", epoch)
	return m, nil
}

// ActivatedHeat returns the large-page heat (an encoded mmu.Heat) the
// checkpoint the guest was activated from carried: the primary's regions'
// count values and its large regions at that epoch; nil before activation
// or if the primary gave none.
func (b *Backup) ActivatedHeat() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.activatedHeat
}

// LossWindow describes what an activation without the intermediary may
// lose: the primary may have released output of every epoch the
// intermediary acknowledged after the backup's committed one.
type LossWindow struct {
	Committed uint64    // the epoch the backup activates at
	Reported  uint64    // the last epoch the intermediary said it acknowledged (0: never said)
	At        time.Time // when it said so (zero: never)
}

// Epochs returns how many acknowledged epochs are known to be lost.
func (w LossWindow) Epochs() uint64 { return w.Reported - min(w.Reported, w.Committed) }

func (w LossWindow) String() string {
	switch {
	case w.At.IsZero():
		return fmt.Sprintf("activated at epoch %d; the intermediary never reported its acknowledged epoch, so any output the primary released after epoch %d may be lost", w.Committed, w.Committed)
	case w.Epochs() == 0:
		return fmt.Sprintf("activated at epoch %d; the intermediary's last report (%s) was epoch %d, so output the primary released for epochs acknowledged after that report may be lost",
			w.Committed, w.At.Format(time.RFC3339Nano), w.Reported)
	}
	return fmt.Sprintf("activated at epoch %d; output the primary released for epochs %d..%d (%d epochs, known from the intermediary's report at %s) and for any epoch acknowledged after that report may be lost",
		w.Committed, w.Committed+1, w.Reported, w.Epochs(), w.At.Format(time.RFC3339Nano))
}

// Window returns the data-loss window of activating now, without the
// intermediary.
func (b *Backup) Window() LossWindow {
	w := LossWindow{Committed: b.Committed(), Reported: b.interEpoch.Load()}
	if ns := b.interSeen.Load(); ns != 0 {
		w.At = time.Unix(0, ns)
	}
	return w
}

// ActivateAlone activates the committed epoch without the intermediary, for
// when the primary and the intermediary are both lost. It never claims
// RPO = 0: it returns the data-loss window with the machine. Use it only
// when the primary is known to be gone: a primary that reaches another
// intermediary could still release output.
func (b *Backup) ActivateAlone() (*vmm.Machine, LossWindow, error) {
	w := b.Window()
	if w.Committed == 0 {
		return nil, w, errors.New("activate without the intermediary: no epoch committed yet")
	}
	m, err := b.Activate(w.Committed)
	return m, w, err
}

// Metrics returns the backup's metrics.
func (b *Backup) Metrics() []Metric {
	active := 0.0
	if b.activated() {
		active = 1
	}
	return []Metric{
		{Name: "understudy_backup_committed_epoch", Help: "The committed epoch (the guest activates from it).", Kind: "gauge", Value: float64(b.Committed())},
		{Name: "understudy_backup_intermediary_epoch", Help: "The epoch the intermediary last said it acknowledged to the primary.", Kind: "gauge", Value: float64(b.interEpoch.Load())},
		{Name: "understudy_backup_checkpoints_total", Help: "Checkpoints verified and committed.", Kind: "counter", Value: float64(b.checkpoints.Load())},
		{Name: "understudy_backup_received_bytes_total", Help: "Checkpoint bytes verified and committed.", Kind: "counter", Value: float64(b.received.Load())},
		{Name: "understudy_backup_activated", Help: "1 once the guest runs here.", Kind: "gauge", Value: active},
		{Name: "understudy_backup_staged_bytes", Help: "Page bytes staged ahead of the next hold-back sync.", Kind: "gauge", Value: float64(b.stagedBytes.Load())},
		{Name: "understudy_backup_manifests_total", Help: "Manifests received (backup-driven retrieval).", Kind: "counter", Value: float64(b.ret.manifests.Load())},
		{Name: "understudy_backup_requested_pages_total", Help: "Pages requested from the intermediary ahead of a sync.", Kind: "counter", Value: float64(b.ret.requested.Load())},
		{Name: "understudy_backup_served_pages_total", Help: "Requested pages the intermediary staged.", Kind: "counter", Value: float64(b.ret.served.Load())},
		{Name: "understudy_backup_refused_requests_total", Help: "Page requests the intermediary refused.", Kind: "counter", Value: float64(b.ret.refused.Load())},
		// Disk replication (diskbackup.go).
		{Name: "understudy_backup_disk_bytes_total", Help: "Disk write bytes staged on the disk replicas.", Kind: "counter", Value: float64(b.disks.bytes.Load())},
	}
}

// StatusLine returns the backup's live status (rates since the previous
// call).
func (b *Backup) StatusLine() string {
	s := fmt.Sprintf("committed=%d intermediary_epoch=%d in_MiB/s=%.1f checkpoints=%d staged_MiB=%.1f",
		b.Committed(), b.interEpoch.Load(), b.rate.per(float64(b.received.Load()))/(1<<20), b.checkpoints.Load(),
		float64(b.stagedBytes.Load())/(1<<20))
	if n := b.ret.manifests.Load(); n > 0 {
		s += fmt.Sprintf(" manifests=%d requested=%d served=%d", n, b.ret.requested.Load(), b.ret.served.Load())
	}
	if p := b.PolicyState(); p != "" {
		s += " (" + p + ")"
	}
	return s
}

// stage keeps a batch of pages sent ahead of a hold-back sync. They change
// nothing until the sync commits them; a page staged again replaces the
// older version.
func (b *Backup) stage(m *wire.PageBatch, maxPFN uint64) error {
	if m.Epoch <= b.Committed() {
		return badf("staged pages of epoch %d, not after the committed epoch %d", m.Epoch, b.Committed())
	}
	if b.staged == nil {
		b.staged = make(map[uint64][]byte)
		b.stagedSums = make(map[uint64]uint32)
	}
	for _, p := range m.Pages {
		if p.PFN >= maxPFN {
			return badf("staged page %#x beyond guest memory", p.PFN)
		}
	}
	if err := wire.VerifyPages(m.Pages); err != nil {
		return badf("staged pages of epoch %d: digest mismatch: %v", m.Epoch, err)
	}
	for _, p := range m.Pages {
		buf, ok := b.staged[p.PFN]
		if !ok {
			buf = make([]byte, mmu.PageSize)
			b.staged[p.PFN] = buf
			b.stagedBytes.Add(mmu.PageSize)
		}
		copy(buf, p.Data)
		b.stagedSums[p.PFN] = p.Sum
	}
	return nil
}

// commit applies a verified checkpoint: a full image drops whatever was
// staged; a hold-back sync (KindSync) commits the staged pages together with
// its own, which win, in one atomic Apply.
func (b *Backup) commit(cp *Checkpoint, base uint64) error {
	// Under b.mu: Close unmaps the image's memory, and Activate hands it to
	// the restored machine; neither may happen in the middle of an apply.
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.active {
		return errBackupClosed
	}
	// Disk replication (diskbackup.go): the disks are ready for the
	// epoch before the image takes it, and commit it right after.
	if err := b.beforeCommit(cp); err != nil {
		return err
	}
	if cp.Kind == KindSync && len(b.staged) > 0 {
		cp = mergeStaged(cp, b.staged, b.stagedSums)
	}
	if err := b.img.Apply(cp, base, b.pageOffset); err != nil {
		return err
	}
	if err := b.afterCommit(cp); err != nil {
		return err
	}
	if cp.Kind == KindFull || cp.Kind == KindSync {
		b.staged, b.stagedSums = nil, nil
		b.stagedBytes.Store(0)
	}
	return nil
}

// mergeStaged returns cp with the staged pages it does not carry itself,
// in PFN order.
func mergeStaged(cp *Checkpoint, staged map[uint64][]byte, sums map[uint64]uint32) *Checkpoint {
	pfns := make([]uint64, 0, len(staged)+len(cp.PFNs))
	for pfn := range staged {
		pfns = append(pfns, pfn)
	}
	slices.Sort(pfns)
	out := &Checkpoint{Epoch: cp.Epoch, Kind: KindSync, Base: cp.Base, State: cp.State}
	out.PFNs = make([]uint64, 0, len(pfns)+len(cp.PFNs))
	out.Data = make([]byte, 0, (len(pfns)+len(cp.PFNs))*mmu.PageSize)
	out.Sums = make([]uint32, 0, len(pfns)+len(cp.PFNs))
	i, j := 0, 0
	for i < len(pfns) || j < len(cp.PFNs) {
		switch {
		case j == len(cp.PFNs) || i < len(pfns) && pfns[i] < cp.PFNs[j]:
			out.PFNs = append(out.PFNs, pfns[i])
			out.Data = append(out.Data, staged[pfns[i]]...)
			out.Sums = append(out.Sums, sums[pfns[i]])
			i++
		default:
			if i < len(pfns) && pfns[i] == cp.PFNs[j] {
				i++ // the sync's version is newer
			}
			out.PFNs = append(out.PFNs, cp.PFNs[j])
			out.Data = append(out.Data, cp.Page(j)...)
			out.Sums = append(out.Sums, cp.Sums[j])
			j++
		}
	}
	return out
}

func (b *Backup) setPolicyState(s string) {
	b.policyMu.Lock()
	b.policyState = s
	b.policyMu.Unlock()
}

// PolicyState says what became of the policy this backup last asked its
// intermediary to install ("" while unanswered or with no policy).
func (b *Backup) PolicyState() string {
	b.policyMu.Lock()
	defer b.policyMu.Unlock()
	return b.policyState
}
