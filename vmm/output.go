package vmm

// Output commit for a Linux guest's packets: the machine-level side of
// virtio-net's output gate (vmm/virtio/egress.go). A fault-tolerant primary
// uses it like this:
//
//	m.HoldNetOutput(virtio.EgressBounds{})   // before Run: every NIC's frames are held
//	// checkpoint e, with the machine paused:
//	carried, err := m.SealNetOutput(e)       // frames so far are epoch e's; carry the held ones
//	// checkpoint e acknowledged, from any goroutine:
//	err = m.ReleaseNetOutput(e)              // frames of epochs <= e go to the taps, in order
//
// and the activated backup restores with RestoreConfig.NetCarried set to
// the carried bytes of the epoch it activates at: those frames reach the
// taps before the restored guest transmits anything.
//
// The epoch is advanced by SealNetOutput, which the caller calls while the
// machine is paused for the checkpoint, not by the pause itself: the
// machine is paused for other reasons too (large-page sampling, snapshots),
// and only the checkpointer knows which pause ends an epoch and its number.
// It cannot race with transmission: while the machine is paused every
// virtio transport is quiesced, and the devices take no transmit chain then
// (see virtio.Net.SealOutput).

import (
	"errors"
	"fmt"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// nets returns the machine's virtio-net devices in device order (the NIC
// index of virtio.HeldFrame).
func (m *Machine) nets() []*virtio.Net {
	if m.linux == nil {
		return nil
	}
	var out []*virtio.Net
	for _, s := range m.linux.virtio {
		if n, ok := s.dev.(*virtio.Net); ok {
			out = append(out, n)
		}
	}
	return out
}

// HoldNetOutput turns output commit on for every virtio-net device of a
// Linux machine, each with bounds b (zero fields take the defaults): from
// then on the frames the guest transmits are held until ReleaseNetOutput
// covers them. Past a bound a device stops taking transmit chains until a
// release makes room (backpressure, no loss; see virtio.EgressBounds). Call
// it before Run. A machine without network devices holds nothing and
// accepts the call.
func (m *Machine) HoldNetOutput(b virtio.EgressBounds) error {
	if m.linux == nil {
		return errors.New("hold network output: not a Linux machine")
	}
	if m.ran.Load() {
		return errors.New("hold network output: the machine has run; call it before Run")
	}
	for i, n := range m.nets() {
		if err := n.HoldOutput(b); err != nil {
			return fmt.Errorf("hold network output of NIC %d (tap %s): %w", i, n.Tap(), err)
		}
	}
	return nil
}

// SealNetOutput ends an output epoch: every frame the guest transmitted
// and that is not sealed yet belongs to checkpoint epoch. It returns, in
// the encoding of virtio.AppendHeldFrames, every frame still held (of
// every NIC: epochs <= epoch), which checkpoint epoch must carry. The
// machine must be paused (ErrNotPaused), or its Run over; call it during
// the checkpoint's pause, once per checkpoint, with epochs that never
// decrease. A machine whose output is not held returns nil and no error.
// The cost is a copy of the held frames (what the guest sent since the
// last acknowledged checkpoint).
func (m *Machine) SealNetOutput(epoch uint64) ([]byte, error) {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if !m.paused && !m.halted.Load() {
		return nil, fmt.Errorf("seal network output: %w", ErrNotPaused)
	}
	if m.linux == nil {
		return nil, nil
	}
	if m.halted.Load() {
		// Run is over but no pause quiesced the transports: a release
		// could still take waiting transmit chains. Quiesce them, as
		// CaptureState does.
		for _, s := range m.linux.virtio {
			if s.t != nil && !s.t.Quiesced() {
				if err := s.t.Quiesce(); err != nil {
					return nil, fmt.Errorf("seal network output: %w", err)
				}
			}
		}
	}
	var all []virtio.HeldFrame
	held := false
	for i, n := range m.nets() {
		if !n.EgressStats().Holding {
			continue
		}
		held = true
		frames, err := n.SealOutput(epoch)
		if err != nil {
			return nil, fmt.Errorf("seal network output of NIC %d: %w", i, err)
		}
		for j := range frames {
			frames[j].NIC = i
		}
		all = append(all, frames...)
	}
	if !held {
		return nil, nil
	}
	b, err := virtio.AppendHeldFrames(nil, all)
	if err != nil {
		return nil, fmt.Errorf("seal network output: %w", err)
	}
	return b, nil
}

// ReleaseNetOutput writes every held frame of an epoch <= epoch to its
// tap, in the order the guest sent them, and lets devices that waited at a
// bound take the guest's waiting frames. Call it once checkpoint epoch is
// acknowledged; it may be called from any goroutine, also while the machine
// is paused. A frame a tap refuses is dropped and counted, as a wire would
// drop it; the errors are returned after every frame was tried.
func (m *Machine) ReleaseNetOutput(epoch uint64) error {
	var errs []error
	for _, n := range m.nets() {
		errs = append(errs, n.ReleaseOutput(epoch))
	}
	return errors.Join(errs...)
}

// NetOutputStats returns the output counters of every virtio-net device,
// added up (see virtio.EgressStats: held frames and bytes, released
// frames, waits at the bounds, the added latency's histogram).
func (m *Machine) NetOutputStats() virtio.EgressStats {
	var s virtio.EgressStats
	for _, n := range m.nets() {
		s.Add(n.EgressStats())
	}
	return s
}

// sendCarried writes the frames a checkpoint carried (RestoreConfig's
// NetCarried) to the restored machine's taps, before its transports
// resume. A frame for a NIC the machine does not have is refused before
// any is written. Tap write errors are logged: a frame lost there is like
// one lost on the wire.
func (m *Machine) sendCarried(frames []virtio.HeldFrame) error {
	if len(frames) == 0 {
		return nil
	}
	nets := m.nets()
	for i, f := range frames {
		if f.NIC >= len(nets) {
			return fmt.Errorf("carried frame %d is for NIC %d; the machine has %d", i, f.NIC, len(nets))
		}
	}
	per := make([][][]byte, len(nets))
	for _, f := range frames {
		per[f.NIC] = append(per[f.NIC], f.Data)
	}
	for i, n := range nets {
		if err := n.SendCarried(per[i]); err != nil && m.log != nil {
			m.log.Warn("send carried frames", "nic", i, "err", err)
		}
	}
	return nil
}

// VirtioTransport returns the transport of the machine's i-th virtio device
// (disks, then network interfaces, in the order configured), or nil if
// there is none: for drivers on the host side, in tests and tools
// (internal/linuxtest).
func (m *Machine) VirtioTransport(i int) *virtio.Transport {
	if m.linux == nil || i < 0 || i >= len(m.linux.virtio) {
		return nil
	}
	return m.linux.virtio[i].t
}
