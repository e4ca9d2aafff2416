package virtio

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"sync"
	"time"
)

// Output commit for packets (the egress gate). A protected guest's frames
// are output: a frame the guest transmits in epoch e may reach the tap only
// once checkpoint e is acknowledged (DESIGN.md section 4). With the gate on
// (Net.HoldOutput), the device takes a transmit chain as before (the frame
// is copied out and the chain returned to the guest at once, so the guest's
// driver sees it sent), but queues the frame instead of writing it to the
// tap. Every queued frame is open until SealOutput(e), called while the
// machine is paused for checkpoint e, stamps every open frame with e; the
// frames taken from then on are open again, for the next checkpoint.
// ReleaseOutput(e) writes every queued frame sealed with an epoch <= e to
// the tap, oldest first. Received frames are not gated.
//
// Why sealing at the pause is exact: the device takes transmit chains only
// on a notify or a kick, under the transport's lock, and never while the
// transport is quiesced (Quiesce to Resume). So every frame taken before
// the pause is in the used ring the checkpoint captures, and is sealed
// with it; every frame taken after Resume is neither in the checkpoint's
// used ring nor sealed with it. A backup activated at checkpoint e finds
// the frames still available in the ring and transmits them itself, and is
// handed the sealed frames the primary still held (SealOutput returns
// them; see HeldFrame) to send first.
//
// Bounds (EgressBounds): at most MaxFrames frames and MaxBytes bytes of
// frames are held per device. Past either bound the device applies
// backpressure, never loss: it stops taking transmit chains and leaves
// them in the available ring. The guest's ring fills, its driver stops its
// transmit queue and its qdisc holds further packets, as with a slow link.
// A ReleaseOutput that makes room takes the waiting chains itself (no
// notify will come from a guest whose ring is full) and raises the used
// interrupt. A frame is always accepted when nothing is held, so one frame
// larger than MaxBytes still goes through. While the machine is paused the
// release leaves the ring alone; Resume's kick takes the chains.
const (
	// DefaultEgressMaxBytes and DefaultEgressMaxFrames are the bounds of a
	// zero EgressBounds. A device holds the open epoch's frames and those
	// of the epoch awaiting its acknowledgement: about two epochs. At 40
	// checkpoints a second (25 ms epochs) 16 MiB is two epochs of a guest
	// sending 2.7 Gbit/s, and 8192 frames two epochs at 160 000 frames a
	// second; a busier guest is slowed to that (backpressure), not cut
	// off.
	DefaultEgressMaxBytes  = 16 << 20
	DefaultEgressMaxFrames = 8192
	// MaxEgressBytes and MaxEgressFrames cap the bounds one device may be
	// given.
	MaxEgressBytes  = 1 << 30
	MaxEgressFrames = 1 << 20
)

// EgressBounds bounds the frames one virtio-net device holds. A zero field
// takes its default.
type EgressBounds struct {
	MaxBytes  uint64 // bytes of held frames (without virtio-net headers)
	MaxFrames int    // held frames
}

// withDefaults fills zero fields and checks the bounds.
func (b EgressBounds) withDefaults() (EgressBounds, error) {
	if b.MaxBytes == 0 {
		b.MaxBytes = DefaultEgressMaxBytes
	}
	if b.MaxFrames == 0 {
		b.MaxFrames = DefaultEgressMaxFrames
	}
	switch {
	case b.MaxBytes > MaxEgressBytes:
		return b, fmt.Errorf("virtio-net output bound of %d bytes: at most %d", b.MaxBytes, MaxEgressBytes)
	case b.MaxFrames < 0 || b.MaxFrames > MaxEgressFrames:
		return b, fmt.Errorf("virtio-net output bound of %d frames: want 1 to %d", b.MaxFrames, MaxEgressFrames)
	}
	return b, nil
}

// EgressStats counts a gated device's output (Net.EgressStats).
type EgressStats struct {
	Holding        bool   // the gate is on
	HeldFrames     uint64 // frames held now (sealed and open)
	HeldBytes      uint64 // their bytes
	OpenFrames     uint64 // held frames not sealed yet (taken since the last SealOutput)
	SealedEpoch    uint64 // the epoch of the last SealOutput
	ReleasedFrames uint64 // frames written to the tap by ReleaseOutput
	ReleasedBytes  uint64
	ReleaseErrors  uint64 // released frames the tap refused (dropped, as a wire would)
	Stalls         uint64 // times the device stopped taking transmit chains at a bound
	WaitedFrames   uint64 // frames taken from the ring after waiting there at a bound
	CarriedSent    uint64 // carried frames written by SendCarried
	// Latency is the added latency of released frames: from the device
	// taking the frame to its write to the tap.
	Latency LatencyHistogram
}

// heldFrame is one queued frame.
type heldFrame struct {
	epoch uint64 // valid once sealed
	at    int64  // monotonic nanoseconds (since egressClock) when taken
	data  []byte
}

var egressClock = time.Now()

func egressNow() int64 { return int64(time.Since(egressClock)) }

// egress is a Net's output gate.
type egress struct {
	// relMu serializes the tap writes of ReleaseOutput and SendCarried,
	// so frames reach the tap in order; only the holder removes frames
	// from the front of the queue. It is taken before mu, never while
	// the transport's lock is held.
	relMu sync.Mutex

	// mu guards everything below. The transmit path takes it with the
	// transport's lock held.
	mu     sync.Mutex
	on     bool
	bounds EgressBounds
	frames []heldFrame // oldest first
	sealed int         // frames[:sealed] carry their epoch, the rest are open
	bytes  uint64
	epoch  uint64 // the last sealed epoch
	// stalled is set when the device left a chain in the ring at a bound;
	// waitLeft counts the chains that were waiting then and not yet taken.
	stalled  bool
	waitLeft int
	stats    EgressStats
}

// HoldOutput turns the output gate on with bounds b (zero fields take the
// defaults): from now on the frames the guest transmits are held until
// ReleaseOutput (see the package's output-commit rules above). Turning it
// on twice is refused; it cannot be turned off (a protected guest stays
// protected: Close drops whatever is still held).
func (n *Net) HoldOutput(b EgressBounds) error {
	b, err := b.withDefaults()
	if err != nil {
		return err
	}
	g := &n.egress
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.on {
		return errors.New("virtio-net: output is already held")
	}
	g.on, g.bounds = true, b
	return nil
}

// holding reports whether the gate is on.
func (g *egress) holding() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.on
}

// admit queues a copy of frame if the bounds allow. It returns false, and
// marks the device stalled, when they do not: the caller leaves the chain
// in the ring (and tells waiting how many chains wait there).
func (g *egress) admit(frame []byte) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	size := uint64(len(frame))
	if len(g.frames) > 0 && (len(g.frames)+1 > g.bounds.MaxFrames || g.bytes+size > g.bounds.MaxBytes) {
		if !g.stalled {
			g.stats.Stalls++
		}
		g.stalled = true
		return false
	}
	if g.waitLeft > 0 {
		g.waitLeft--
		g.stats.WaitedFrames++
	}
	g.frames = append(g.frames, heldFrame{at: egressNow(), data: append([]byte(nil), frame...)})
	g.bytes += size
	return true
}

// waiting records how many transmit chains wait in the ring at a bound.
func (g *egress) waiting(chains int) {
	g.mu.Lock()
	g.waitLeft = chains
	g.mu.Unlock()
}

// SealOutput stamps every open frame with epoch: they are covered by
// checkpoint epoch, and ReleaseOutput(e) for e >= epoch writes them. It
// returns every frame still held then (sealed frames only: all of them),
// which checkpoint epoch must carry, oldest first; their Data is shared
// and never changed. Call it while the machine is paused for the
// checkpoint (the transport quiesced: see above), after the checkpoint's
// memory and device state were captured or before: nothing changes them in
// between. An epoch below the last sealed one is refused.
func (n *Net) SealOutput(epoch uint64) ([]HeldFrame, error) {
	g := &n.egress
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.on {
		return nil, errors.New("virtio-net: output is not held")
	}
	if epoch < g.epoch {
		return nil, fmt.Errorf("virtio-net: seal output of epoch %d after epoch %d", epoch, g.epoch)
	}
	g.epoch = epoch
	for i := g.sealed; i < len(g.frames); i++ {
		g.frames[i].epoch = epoch
	}
	g.sealed = len(g.frames)
	out := make([]HeldFrame, len(g.frames))
	for i, f := range g.frames {
		out[i] = HeldFrame{Epoch: f.epoch, Data: f.data}
	}
	return out, nil
}

// ReleaseOutput writes every held frame sealed with an epoch <= epoch to
// the tap, oldest first, and then, if the device waited at a bound, takes
// the transmit chains the guest left in the ring. A frame stays held (and
// so in any checkpoint sealed meanwhile) until it has been written. A
// frame the tap refuses is dropped and counted (ReleaseErrors), as a wire
// would drop it; the first such error is returned. It may be called from
// any goroutine, also while the machine is paused.
func (n *Net) ReleaseOutput(epoch uint64) error {
	g := &n.egress
	g.relMu.Lock()
	g.mu.Lock()
	k := 0
	for k < g.sealed && g.frames[k].epoch <= epoch {
		k++
	}
	out := g.frames[:k:k]
	g.mu.Unlock()

	var first error
	var failed, bytes uint64
	lat := make([]int64, 0, k)
	for _, f := range out {
		if _, err := n.tap.Write(f.data); err != nil {
			failed++
			if first == nil {
				first = fmt.Errorf("virtio-net: write released frame to tap %s: %w", n.tapName, err)
			}
		}
		bytes += uint64(len(f.data))
		lat = append(lat, egressNow()-f.at)
	}

	g.mu.Lock()
	// Only the holder of relMu removes from the front; admit appends.
	clear(g.frames[:k])
	g.frames = g.frames[k:]
	if len(g.frames) == 0 {
		g.frames = nil
	}
	g.sealed -= k
	g.bytes -= bytes
	g.stats.ReleasedFrames += uint64(k) - failed
	g.stats.ReleasedBytes += bytes
	g.stats.ReleaseErrors += failed
	for _, d := range lat {
		g.stats.Latency.Add(time.Duration(d))
	}
	resume := g.stalled && k > 0
	if resume {
		g.stalled = false
	}
	g.mu.Unlock()
	n.txFrames.Add(uint64(k) - failed)
	n.txErrors.Add(failed)
	g.relMu.Unlock()

	if resume {
		n.resumeTransmit()
	}
	return first
}

// resumeTransmit takes the transmit chains the device left in the ring at
// a bound. Nothing else would: the guest notifies only when it adds a
// chain, and its ring is full. While the transport is quiesced it does
// nothing (Resume kicks every queue).
func (n *Net) resumeTransmit() {
	h := n.active.Load()
	if h == nil {
		return
	}
	err := h.Deliver(func() error {
		if h.Paused() || n.h != h {
			return nil
		}
		return n.transmit()
	})
	if err != nil && !errors.Is(err, ErrInactive) {
		slog.Warn("virtio-net transmit after release", "tap", n.tapName, "err", err)
	}
}

// SendCarried writes frames to the tap, in order: the frames a checkpoint
// carried (HeldFrame), which the activated backup sends before the guest
// transmits anything new. Call it after the transport's LoadState and
// before its Resume (Resume's kick transmits what the guest made available
// since). A frame the tap refuses is dropped and counted (TxErrors); the
// first such error is returned after the rest were written.
func (n *Net) SendCarried(frames [][]byte) error {
	g := &n.egress
	g.relMu.Lock()
	defer g.relMu.Unlock()
	var first error
	var sent uint64
	for _, f := range frames {
		if _, err := n.tap.Write(f); err != nil {
			n.txErrors.Add(1)
			if first == nil {
				first = fmt.Errorf("virtio-net: write carried frame to tap %s: %w", n.tapName, err)
			}
			continue
		}
		sent++
	}
	n.txFrames.Add(sent)
	g.mu.Lock()
	g.stats.CarriedSent += sent
	g.mu.Unlock()
	return first
}

// EgressStats returns the output gate's counters.
func (n *Net) EgressStats() EgressStats {
	g := &n.egress
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.stats
	s.Holding = g.on
	s.HeldFrames = uint64(len(g.frames))
	s.HeldBytes = g.bytes
	s.OpenFrames = uint64(len(g.frames) - g.sealed)
	s.SealedEpoch = g.epoch
	return s
}

// Add adds o's counters to s (several devices' stats as one): the held
// and released counts and the latency histograms add up; Holding is
// either's; SealedEpoch the larger.
func (s *EgressStats) Add(o EgressStats) {
	s.Holding = s.Holding || o.Holding
	s.HeldFrames += o.HeldFrames
	s.HeldBytes += o.HeldBytes
	s.OpenFrames += o.OpenFrames
	s.SealedEpoch = max(s.SealedEpoch, o.SealedEpoch)
	s.ReleasedFrames += o.ReleasedFrames
	s.ReleasedBytes += o.ReleasedBytes
	s.ReleaseErrors += o.ReleaseErrors
	s.Stalls += o.Stalls
	s.WaitedFrames += o.WaitedFrames
	s.CarriedSent += o.CarriedSent
	s.Latency.Merge(&o.Latency)
}

// LatencyHistogram counts durations in log-linear buckets: 8 per power of
// two of microseconds, so a quantile is within 6% of the true value
// (bucket midpoints); below 8 µs the buckets are 1 µs wide. It covers up
// to 2^36 µs (19 hours); longer ones count in the last bucket.
type LatencyHistogram struct {
	Buckets [latencyBuckets]uint64
	Count   uint64
	Sum     time.Duration
}

const (
	latencySub     = 8 // buckets per power of two
	latencyMaxExp  = 36
	latencyBuckets = latencySub * (latencyMaxExp - 2) // exponents 3..36, plus the linear 0..7 µs
)

// latencyBucket maps microseconds to a bucket.
func latencyBucket(us uint64) int {
	if us < latencySub {
		return int(us)
	}
	e := bits.Len64(us) - 1 // us in [2^e, 2^(e+1)), e >= 3
	if e >= latencyMaxExp {
		return latencyBuckets - 1
	}
	sub := int(us>>(e-3)) - latencySub // 0..7
	return latencySub*(e-2) + sub
}

// latencyValue returns a bucket's midpoint in microseconds.
func latencyValue(i int) float64 {
	if i < latencySub {
		return float64(i) + 0.5
	}
	e := i/latencySub + 2
	sub := i % latencySub
	lo := float64(uint64(latencySub+sub) << (e - 3))
	return lo + float64(uint64(1)<<(e-3))/2
}

// Add counts one duration.
func (h *LatencyHistogram) Add(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.Buckets[latencyBucket(uint64(d/time.Microsecond))]++
	h.Count++
	h.Sum += d
}

// Merge adds o's counts to h.
func (h *LatencyHistogram) Merge(o *LatencyHistogram) {
	for i, c := range o.Buckets {
		h.Buckets[i] += c
	}
	h.Count += o.Count
	h.Sum += o.Sum
}

// Quantile returns the q-quantile (0 <= q <= 1) of the counted durations,
// or 0 when none were counted.
func (h *LatencyHistogram) Quantile(q float64) time.Duration {
	if h.Count == 0 {
		return 0
	}
	rank := uint64(q*float64(h.Count-1)) + 1
	var seen uint64
	for i, c := range h.Buckets {
		seen += c
		if seen >= rank {
			return time.Duration(latencyValue(i) * float64(time.Microsecond))
		}
	}
	return time.Duration(latencyValue(latencyBuckets-1) * float64(time.Microsecond))
}
