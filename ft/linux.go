package ft

// Protecting a Linux guest: its output is its network frames and its
// console bytes, and both follow the output-commit rule (DESIGN.md section
// 4, Remus's rule): what the guest emits in epoch e reaches the outside
// only once the intermediary has acknowledged checkpoint e.
//
//   - Frames are held by the machine's virtio-net output gate
//     (vmm.Machine.HoldNetOutput, bounded per NIC; past a bound the device
//     stops taking transmit chains: backpressure, never loss). Each
//     checkpoint's pause seals the epoch (SealNetOutput) and the envelope
//     carries every frame still held; an acknowledgement releases the
//     frames of its epoch and the earlier ones (ReleaseNetOutput), in the
//     order the guest sent them.
//   - Console bytes are held here (consoleGate), tagged with the open
//     epoch as a payload's records are, carried in the envelope, and
//     written to the console on the acknowledgement. A console is output a
//     person reads and acts on ("service started", a key printed), so it
//     gets the same rule as packets; the cost is that it appears one
//     acknowledgement late (an interval plus a round trip). While no
//     intermediary acknowledges, a guest that has printed more than
//     maxConsolePause held bytes is paused, as one past MaxHeld records is.
//
// Received frames go into the guest at once: a frame lost with the primary
// is ordinary packet loss, which TCP retransmits.

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/vmm"
)

// maxConsolePause is the held console bytes past which a primary without
// an intermediary pauses its guest.
const maxConsolePause = 1 << 20

// linuxOutput is a Linux guest's held output at the primary.
type linuxOutput struct {
	console *consoleGate
	// err is the first failure to seal the network output: the checkpoint
	// lacks frames the guest sent, so it must not be sent (see
	// Primary.sealFailed).
	errMu sync.Mutex
	err   error
}

// seal adds the guest's held frames and console bytes to env, with the
// machine paused for checkpoint epoch.
func (lx *linuxOutput) seal(m *vmm.Machine, epoch uint64, env *envelope) {
	frames, err := m.SealNetOutput(epoch)
	if err == nil && lx.console != nil {
		env.Console = lx.console.held()
		if len(env.Console) > maxConsoleHeld {
			err = fmt.Errorf("%d console bytes held, more than a checkpoint carries (%d)", len(env.Console), maxConsoleHeld)
		}
	}
	if err != nil {
		lx.errMu.Lock()
		if lx.err == nil {
			lx.err = fmt.Errorf("primary: checkpoint %d: %w", epoch, err)
		}
		lx.errMu.Unlock()
		return
	}
	env.Frames = frames
}

// failed returns the first sealing failure.
func (lx *linuxOutput) failed() error {
	lx.errMu.Lock()
	defer lx.errMu.Unlock()
	return lx.err
}

// release releases the output of epochs <= e. A frame a tap refuses is
// counted by the device (EgressStats.ReleaseErrors), as a wire drops it.
func (lx *linuxOutput) release(m *vmm.Machine, e uint64) {
	_ = m.ReleaseNetOutput(e)
	if lx.console != nil {
		lx.console.release(e)
	}
}

// consoleGate holds a guest's console bytes until the checkpoint of the
// epoch they were written in is acknowledged. The machine's UART writes to
// it on a vCPU's thread, so the epoch (open) cannot change during a write:
// it changes only while the vCPUs are paused.
type consoleGate struct {
	out  io.Writer
	open *atomic.Uint64

	// relMu serializes releases; only the holder removes chunks.
	relMu sync.Mutex
	// mu guards chunks and bytes.
	mu     sync.Mutex
	chunks []consoleChunk
	bytes  int

	released atomic.Uint64 // console bytes written out
}

type consoleChunk struct {
	epoch uint64
	data  []byte
}

func newConsoleGate(out io.Writer, open *atomic.Uint64) *consoleGate {
	if out == nil {
		out = io.Discard
	}
	return &consoleGate{out: out, open: open}
}

// Write holds b for the open epoch. It never fails and never blocks on the
// console.
func (g *consoleGate) Write(b []byte) (int, error) {
	e := g.open.Load()
	g.mu.Lock()
	defer g.mu.Unlock()
	if n := len(g.chunks); n > 0 && g.chunks[n-1].epoch == e {
		g.chunks[n-1].data = append(g.chunks[n-1].data, b...)
	} else {
		g.chunks = append(g.chunks, consoleChunk{epoch: e, data: append([]byte(nil), b...)})
	}
	g.bytes += len(b)
	return len(b), nil
}

// held returns a copy of every byte held (what a checkpoint carries).
func (g *consoleGate) held() []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.bytes == 0 {
		return nil
	}
	b := make([]byte, 0, g.bytes)
	for _, c := range g.chunks {
		b = append(b, c.data...)
	}
	return b
}

// heldBytes returns how many bytes are held.
func (g *consoleGate) heldBytes() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.bytes
}

// release writes the bytes of epochs <= e to the console, in order. They
// stay held (and carried) until written.
func (g *consoleGate) release(e uint64) {
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	n := 0
	for n < len(g.chunks) && g.chunks[n].epoch <= e {
		n++
	}
	out := append([]consoleChunk(nil), g.chunks[:n]...)
	g.mu.Unlock()
	size := 0
	for _, c := range out {
		g.out.Write(c.data) // a console that fails loses its bytes, as a wire would
		size += len(c.data)
	}
	g.released.Add(uint64(size))
	g.mu.Lock()
	g.chunks = append(g.chunks[:0], g.chunks[n:]...)
	g.bytes -= size
	g.mu.Unlock()
}

// sealFailed returns the first failure to seal a Linux guest's output into
// a checkpoint (nil for a payload guest).
func (p *Primary) sealFailed() error {
	if p.lx == nil {
		return nil
	}
	return p.lx.failed()
}

// consoleHeld returns the console bytes held (0 without a console gate).
func (p *Primary) consoleHeld() int {
	if p.lx == nil || p.lx.console == nil {
		return 0
	}
	return p.lx.console.heldBytes()
}

// heldOutput says what output the primary holds: records, or a Linux
// guest's frames and console bytes.
func (p *Primary) heldOutput() string {
	if p.lx == nil {
		return fmt.Sprintf("%d records", p.Held())
	}
	s := p.m.NetOutputStats()
	return fmt.Sprintf("%d frames of %d bytes, %d console bytes", s.HeldFrames, s.HeldBytes, p.consoleHeld())
}

// linuxMetrics returns a Linux guest's output metrics.
func (p *Primary) linuxMetrics() []Metric {
	if p.lx == nil {
		return nil
	}
	s := p.m.NetOutputStats()
	p50, p99 := s.Latency.Quantile(0.5), s.Latency.Quantile(0.99)
	const latHelp = "Latency output commit added to released frames (the device taking the frame to its write to the tap), over every frame released."
	return []Metric{
		{Name: "understudy_primary_held_frames", Help: "Network frames the guest sent, held until their checkpoint is acknowledged.", Kind: "gauge", Value: float64(s.HeldFrames)},
		{Name: "understudy_primary_held_frame_bytes", Help: "Bytes of the held network frames.", Kind: "gauge", Value: float64(s.HeldBytes)},
		{Name: "understudy_primary_released_frames_total", Help: "Network frames released to the taps after their checkpoint was acknowledged.", Kind: "counter", Value: float64(s.ReleasedFrames)},
		{Name: "understudy_primary_released_frame_bytes_total", Help: "Bytes of the released network frames.", Kind: "counter", Value: float64(s.ReleasedBytes)},
		{Name: "understudy_primary_frame_release_errors_total", Help: "Released frames a tap refused (dropped, as a wire would).", Kind: "counter", Value: float64(s.ReleaseErrors)},
		{Name: "understudy_primary_output_stalls_total", Help: "Times a NIC stopped taking the guest's frames at a held-output bound (backpressure).", Kind: "counter", Value: float64(s.Stalls)},
		{Name: "understudy_primary_frame_latency_seconds", Help: latHelp, Kind: "gauge", Labels: []Label{{"quantile", "0.5"}}, Value: p50.Seconds()},
		{Name: "understudy_primary_frame_latency_seconds", Help: latHelp, Kind: "gauge", Labels: []Label{{"quantile", "0.99"}}, Value: p99.Seconds()},
		{Name: "understudy_primary_held_console_bytes", Help: "Console bytes held until their checkpoint is acknowledged.", Kind: "gauge", Value: float64(p.consoleHeld())},
	}
}

// linuxStatus is the Linux guest's part of the status line: held frames
// and bytes, and the latency output commit adds to released frames.
func (p *Primary) linuxStatus() string {
	if p.lx == nil {
		return ""
	}
	s := p.m.NetOutputStats()
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	line := fmt.Sprintf(" disk_KiB/s=%.1f held_frames=%d held_KiB=%.1f released_frames=%d frame_ms p50=%.2f p99=%.2f",
		p.diskRate.per(float64(p.diskSentB.Load()))/1024,
		s.HeldFrames, float64(s.HeldBytes)/1024, s.ReleasedFrames, ms(s.Latency.Quantile(0.5)), ms(s.Latency.Quantile(0.99)))
	if s.Stalls > 0 {
		line += fmt.Sprintf(" stalls=%d", s.Stalls)
	}
	if n := p.consoleHeld(); n > 0 {
		line += fmt.Sprintf(" console_held=%d", n)
	}
	return line
}
