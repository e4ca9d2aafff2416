package ft

import (
	"fmt"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// ForwardPolicy decides what the intermediary forwards to the backup. It is
// the one seam for forwarding decisions: ForwardEvery, hold-back of hot
// pages (HoldBack), and backup-installed policies plug in here, and all
// they decide is in the Decision they return. Whatever a policy holds back,
// Failover still brings the backup to the acknowledged epoch, and the
// backup still commits only whole epochs.
type ForwardPolicy interface {
	// Decide is given every checkpoint the intermediary verified, applied
	// and acknowledged, in epoch order, with freq(i), the change frequency
	// of its i-th page (see Image). It must not modify cp.
	Decide(cp *Checkpoint, freq func(i int) float64) Decision
	// SyncNow is asked after a checkpoint that was not sent whole, once its
	// pages are accounted for in v: true brings the backup to that epoch
	// now (every held page, and the state).
	SyncNow(v BackupView) bool
}

// Decision is what a ForwardPolicy decided for one checkpoint.
type Decision struct {
	// Whole forwards the checkpoint whole, as a delta on what the backup
	// holds (after a hold-back, as a sync to its epoch). The other fields
	// are then ignored.
	Whole bool
	// Stage lists the pages (indexes into the checkpoint, ascending) to
	// stage at the backup now; the others are held back until a sync.
	Stage []int
	// Rate caps the page bytes per second staged ahead of a sync, these
	// and pages the backup requests (0: no cap); pages over it are held.
	Rate uint64
	// Describe lists the pages (indexes, ascending) to describe to the
	// backup in manifests (backup-driven retrieval, wire.Manifest),
	// unless a sync brings the epoch now.
	Describe []int
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

// Decide sends cp whole.
func (ForwardEvery) Decide(*Checkpoint, func(int) float64) Decision { return Decision{Whole: true} }

// SyncNow is never asked (everything is sent).
func (ForwardEvery) SyncNow(BackupView) bool { return false }

// policyHolder holds the intermediary's forwarding policy under a lock of
// its own (ForwardEvery until one is set).
type policyHolder struct {
	mu sync.Mutex
	p  ForwardPolicy
}

func (h *policyHolder) get() ForwardPolicy {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.p == nil {
		return ForwardEvery{}
	}
	return h.p
}

func (h *policyHolder) set(p ForwardPolicy) {
	h.mu.Lock()
	h.p = p
	h.mu.Unlock()
}

// SetForwardPolicy replaces the forwarding policy (nil: ForwardEvery).
func (in *Intermediary) SetForwardPolicy(p ForwardPolicy) { in.policy.set(p) }

// installPolicy validates a policy the backup asks for and, if it is good,
// makes it the forwarding policy. A refusal says why and changes nothing.
// Called from b's readLoop only.
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
	// Page requests may come before the next checkpoint's decision: they
	// are served at this policy's rate from now on.
	b.held.setRate(h.Bandwidth)
	in.log.Info("installed the backup's policy", "version", m.Version, "policy", h.String())
	return &wire.PolicyAck{Version: m.Version}
}
