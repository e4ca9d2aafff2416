package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The output gate's tests use a real tap: the host's packet socket sees
// exactly what the device wrote to it. "Not on the tap before Release" is
// shown by order, not by waiting: a marker frame written straight to the
// tap (SendCarried) after the guest's frames were taken arrives before
// them.

// txFrames makes frames available on the transmit queue, one chain each,
// and notifies once.
func (d *testDriver) txFrames(frames ...[]byte) {
	d.t.Helper()
	hdr := make([]byte, NetHeaderSize)
	for _, f := range frames {
		d.submit(netTxQueue, d.chain(buf{data: append(bytes.Clone(hdr), f...)}))
	}
	if err := d.notify(netTxQueue); err != nil {
		d.t.Fatalf("notify tx: %v", err)
	}
}

// expectFrames receives len(want) frames of the test EtherType from the
// tap and checks they are want, in order.
func (p *packetSocket) expectFrames(want ...[]byte) {
	p.t.Helper()
	for i, w := range want {
		if got := p.recv(); !bytes.Equal(got, w) {
			p.t.Fatalf("frame %d on the tap: %q, want %q", i, got[14:], w[14:])
		}
	}
}

// recvQuiet is recv for another goroutine: nil instead of failing.
func (p *packetSocket) recvQuiet() []byte {
	buf := make([]byte, 65536)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(p.fd, buf, 0)
		if err != nil {
			continue
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if n >= 14 && binary.BigEndian.Uint16(buf[12:]) == testEtherType {
			return bytes.Clone(buf[:n])
		}
	}
	return nil
}

func numbered(prefix string, n int) [][]byte {
	out := make([][]byte, n)
	for i := range out {
		out[i] = frame(hostMAC, guestMAC, fmt.Sprintf("%s %d", prefix, i))
	}
	return out
}

func TestNetHoldOutput(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	if err := n.HoldOutput(EgressBounds{}); err != nil {
		t.Fatal(err)
	}
	if err := n.HoldOutput(EgressBounds{}); err == nil {
		t.Errorf("second HoldOutput succeeded")
	}
	e1 := numbered("epoch 1", 3)
	d.txFrames(e1...)
	// The guest gets its buffers back at once: to it the frames are sent.
	if used := d.takeUsed(netTxQueue); len(used) != 3 {
		t.Fatalf("%d tx used entries, want 3", len(used))
	}
	if s := n.EgressStats(); !s.Holding || s.HeldFrames != 3 || s.OpenFrames != 3 || s.HeldBytes != uint64(len(bytes.Join(e1, nil))) {
		t.Errorf("stats after 3 frames: %+v", s)
	}
	// Nothing sealed: a release of any epoch writes nothing.
	if err := n.ReleaseOutput(100); err != nil {
		t.Fatal(err)
	}
	carried, err := n.SealOutput(1)
	if err != nil {
		t.Fatal(err)
	}
	if len(carried) != 3 || !bytes.Equal(carried[2].Data, e1[2]) || carried[0].Epoch != 1 {
		t.Errorf("SealOutput(1) = %d frames, want epoch 1's 3", len(carried))
	}
	e2 := numbered("epoch 2", 2)
	d.txFrames(e2...)
	mark1 := frame(hostMAC, guestMAC, "marker 1")
	if err := n.SendCarried([][]byte{mark1}); err != nil {
		t.Fatal(err)
	}
	if err := n.ReleaseOutput(1); err != nil {
		t.Fatal(err)
	}
	ps.expectFrames(append([][]byte{mark1}, e1...)...)
	if s := n.EgressStats(); s.HeldFrames != 2 || s.OpenFrames != 2 || s.ReleasedFrames != 3 {
		t.Errorf("after Release(1): %+v, want epoch 2's 2 frames still held (open)", s)
	}
	if _, err := n.SealOutput(0); err == nil {
		t.Errorf("SealOutput of an earlier epoch succeeded")
	}
	carried, err = n.SealOutput(2)
	if err != nil {
		t.Fatal(err)
	}
	if len(carried) != 2 || carried[0].Epoch != 2 || !bytes.Equal(carried[1].Data, e2[1]) {
		t.Errorf("SealOutput(2) = %+v, want epoch 2's 2 frames", carried)
	}
	mark2 := frame(hostMAC, guestMAC, "marker 2")
	if err := n.SendCarried([][]byte{mark2}); err != nil {
		t.Fatal(err)
	}
	if err := n.ReleaseOutput(1); err != nil { // again: epoch 2 stays held
		t.Fatal(err)
	}
	if err := n.ReleaseOutput(2); err != nil {
		t.Fatal(err)
	}
	ps.expectFrames(append([][]byte{mark2}, e2...)...)
	s := n.EgressStats()
	if s.HeldFrames != 0 || s.HeldBytes != 0 || s.ReleasedFrames != 5 || s.CarriedSent != 2 || s.Latency.Count != 5 || s.Stalls != 0 {
		t.Errorf("final stats %+v", s)
	}
	if ns := n.Stats(); ns.TxFrames != 7 || ns.TxErrors != 0 {
		t.Errorf("NetStats %+v, want 7 frames written (5 released, 2 carried)", ns)
	}
}

// At a bound the device leaves transmit chains in the ring; a release
// takes them (no notify comes), raises the interrupt, and nothing is lost
// or reordered.
func TestNetHoldOutputBound(t *testing.T) {
	for _, c := range []struct {
		name   string
		bounds EgressBounds
	}{
		{"frames", EgressBounds{MaxFrames: 2}},
		{"bytes", EgressBounds{MaxBytes: 80}}, // frames of 29 bytes: two fit
	} {
		t.Run(c.name, func(t *testing.T) {
			tap := makeTunTap(t, unix.IFF_TAP)
			d, n := newNetDriver(t, tap)
			ps := newPacketSocket(t, tap)
			if err := n.HoldOutput(c.bounds); err != nil {
				t.Fatal(err)
			}
			all := numbered("bounded frame", 5)
			d.txFrames(all...)
			if used := d.takeUsed(netTxQueue); len(used) != 2 {
				t.Fatalf("%d tx used entries, want 2 (the bound)", len(used))
			}
			if s := n.EgressStats(); s.HeldFrames != 2 || s.Stalls != 1 {
				t.Fatalf("stats at the bound: %+v", s)
			}
			// A notify while at the bound takes nothing more.
			if err := d.notify(netTxQueue); err != nil {
				t.Fatal(err)
			}
			if used := d.takeUsed(netTxQueue); len(used) != 0 {
				t.Fatalf("%d tx used entries after a notify at the bound, want 0", len(used))
			}
			for e := uint64(1); ; e++ {
				if _, err := n.SealOutput(e); err != nil {
					t.Fatal(err)
				}
				irqs := d.irqs.Load()
				before := n.EgressStats().ReleasedFrames
				if err := n.ReleaseOutput(e); err != nil {
					t.Fatal(err)
				}
				if n.EgressStats().ReleasedFrames == before {
					t.Fatalf("epoch %d released nothing", e)
				}
				if s := n.EgressStats(); s.HeldFrames == 0 {
					break
				}
				if d.irqs.Load() == irqs {
					t.Errorf("epoch %d: the release took waiting chains without an interrupt", e)
				}
				if e > 5 {
					t.Fatalf("frames still held after 5 epochs: %+v", n.EgressStats())
				}
			}
			ps.expectFrames(all...)
			s := n.EgressStats()
			if s.ReleasedFrames != 5 || s.WaitedFrames != 3 || s.Stalls < 2 || n.Stats().TxErrors != 0 {
				t.Errorf("final stats %+v (NetStats %+v): want 5 released, 3 waited, 2 or more stalls, no errors", s, n.Stats())
			}
			if used := d.takeUsed(netTxQueue); len(used) != 3 {
				t.Errorf("%d more tx used entries, want the 3 that waited", len(used))
			}
		})
	}
}

// A release while the transport is quiesced (the machine paused) writes
// the frames but takes no chain: guest memory must not change. Resume's
// kick takes the waiting ones.
func TestNetReleaseWhileQuiesced(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	if err := n.HoldOutput(EgressBounds{MaxFrames: 1}); err != nil {
		t.Fatal(err)
	}
	all := numbered("paused", 2)
	d.txFrames(all...)
	if err := d.tr.Quiesce(); err != nil {
		t.Fatal(err)
	}
	if _, err := n.SealOutput(1); err != nil {
		t.Fatal(err)
	}
	if err := n.ReleaseOutput(1); err != nil {
		t.Fatal(err)
	}
	ps.expectFrames(all[0])
	if used := d.takeUsed(netTxQueue); len(used) != 1 {
		t.Fatalf("%d tx used entries while quiesced, want 1 (taken before)", len(used))
	}
	if err := d.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	if used := d.takeUsed(netTxQueue); len(used) != 1 {
		t.Fatalf("%d tx used entries after Resume, want 1", len(used))
	}
	if s := n.EgressStats(); s.OpenFrames != 1 {
		t.Fatalf("after Resume: %+v, want the second frame held, open", s)
	}
	if _, err := n.SealOutput(2); err != nil {
		t.Fatal(err)
	}
	if err := n.ReleaseOutput(2); err != nil {
		t.Fatal(err)
	}
	ps.expectFrames(all[1])
}

// Received frames go in at once while output is held.
func TestNetHoldOutputReceive(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	if err := n.HoldOutput(EgressBounds{MaxFrames: 1}); err != nil {
		t.Fatal(err)
	}
	d.txFrames(numbered("held", 2)...) // one held, one waiting at the bound
	bufs := d.postRx(1, 1526)
	want := frame(guestMAC, hostMAC, "to the guest while its output is held")
	ps.send(want)
	used := d.waitUsed(netRxQueue, 1)
	got := d.slice(bufs[uint16(used[0].id)].addr+NetHeaderSize, uint64(used[0].len)-NetHeaderSize)
	if !bytes.Equal(got, want) {
		t.Errorf("guest received %q, want %q", got, want)
	}
	if s := n.Stats(); s.RxFrames != 1 || s.TxFrames != 0 {
		t.Errorf("stats %+v, want 1 received and none transmitted", s)
	}
}

// Without HoldOutput the gate is off: frames go to the tap at once (as
// TestNetTransmit shows) and SealOutput refuses.
func TestNetOutputNotHeld(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	f := numbered("unheld", 1)
	d.txFrames(f...)
	ps.expectFrames(f...)
	if s := n.EgressStats(); s.Holding || s.HeldFrames != 0 {
		t.Errorf("EgressStats() = %+v, want not holding", s)
	}
	if _, err := n.SealOutput(1); err == nil {
		t.Errorf("SealOutput without HoldOutput succeeded")
	}
	if err := n.ReleaseOutput(1); err != nil {
		t.Errorf("ReleaseOutput without HoldOutput = %v", err)
	}
}

func TestEgressBounds(t *testing.T) {
	b, err := EgressBounds{}.withDefaults()
	if err != nil || b.MaxBytes != DefaultEgressMaxBytes || b.MaxFrames != DefaultEgressMaxFrames {
		t.Errorf("defaults = %+v, %v", b, err)
	}
	for _, bad := range []EgressBounds{{MaxBytes: MaxEgressBytes + 1}, {MaxFrames: -1}, {MaxFrames: MaxEgressFrames + 1}} {
		if _, err := bad.withDefaults(); err == nil {
			t.Errorf("bounds %+v accepted", bad)
		}
	}
}

func TestHeldFramesEncoding(t *testing.T) {
	frames := []HeldFrame{
		{NIC: 0, Epoch: 4, Data: []byte("first frame")},
		{NIC: 1, Epoch: 2, Data: []byte("another NIC")},
		{NIC: 0, Epoch: 5, Data: nil},
		{NIC: 0, Epoch: 5, Data: bytes.Repeat([]byte{0xab}, NetMaxFrame)},
	}
	b, err := AppendHeldFrames(nil, frames)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeHeldFrames(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(frames) {
		t.Fatalf("decoded %d frames, want %d", len(got), len(frames))
	}
	for i := range got {
		if got[i].NIC != frames[i].NIC || got[i].Epoch != frames[i].Epoch || !bytes.Equal(got[i].Data, frames[i].Data) {
			t.Errorf("frame %d = %d/%d/%d bytes, want %d/%d/%d bytes", i, got[i].NIC, got[i].Epoch, len(got[i].Data),
				frames[i].NIC, frames[i].Epoch, len(frames[i].Data))
		}
	}
	if got, err := DecodeHeldFrames(nil); err != nil || got != nil {
		t.Errorf("DecodeHeldFrames(nil) = %v, %v; want no frames", got, err)
	}
	b0, _ := AppendHeldFrames(nil, nil)
	if got, err := DecodeHeldFrames(b0); err != nil || len(got) != 0 {
		t.Errorf("empty list round trip = %v, %v", got, err)
	}

	// The encoder refuses what the decoder would.
	for _, bad := range [][]HeldFrame{
		{{NIC: MaxCarriedNICs}},
		{{NIC: -1}},
		{{Data: make([]byte, NetMaxFrame+1)}},
		{{Epoch: 3}, {Epoch: 2}},
	} {
		if _, err := AppendHeldFrames(nil, bad); !errors.Is(err, ErrBadHeldFrames) {
			t.Errorf("AppendHeldFrames(%d frames, bad) = %v, want ErrBadHeldFrames", len(bad), err)
		}
	}
	// The decoder refuses every corruption of a good encoding.
	small, _ := AppendHeldFrames(nil, frames[:2])
	mut := func(off int, v byte) []byte { c := bytes.Clone(small); c[off] = v; return c }
	for name, bad := range map[string][]byte{
		"magic":          mut(0, 'x'),
		"version":        mut(8, 2),
		"reserved":       mut(10, 1),
		"count":          mut(12, 3),
		"total":          mut(16, 0),
		"nic":            mut(heldFramesFixed, MaxCarriedNICs),
		"frame reserved": mut(heldFramesFixed+2, 1),
		"length":         mut(heldFramesFixed+4, 12),
		"epoch order":    mut(heldFramesFixed+heldFrameHeader+11, 0), // second frame's NIC becomes 0, epoch 2 < 4
		"truncated":      small[:len(small)-1],
		"trailing":       append(bytes.Clone(small), 0),
		"short":          small[:heldFramesFixed-1],
	} {
		if _, err := DecodeHeldFrames(bad); !errors.Is(err, ErrBadHeldFrames) {
			t.Errorf("%s: DecodeHeldFrames = %v, want ErrBadHeldFrames", name, err)
		}
	}
}

func FuzzDecodeHeldFrames(f *testing.F) {
	good, _ := AppendHeldFrames(nil, []HeldFrame{{NIC: 0, Epoch: 1, Data: []byte("frame")}, {NIC: 2, Epoch: 7, Data: []byte("x")}})
	f.Add(good)
	f.Add([]byte{})
	f.Add([]byte(heldFramesMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		frames, err := DecodeHeldFrames(b)
		if err != nil {
			if !errors.Is(err, ErrBadHeldFrames) {
				t.Fatalf("error %v does not wrap ErrBadHeldFrames", err)
			}
			return
		}
		again, err := AppendHeldFrames(nil, frames)
		if err != nil {
			t.Fatalf("decoded frames do not encode: %v", err)
		}
		if len(b) > 0 && !bytes.Equal(again, b) {
			t.Fatalf("re-encoding differs from the input")
		}
	})
}

func TestLatencyHistogram(t *testing.T) {
	var h LatencyHistogram
	if h.Quantile(0.5) != 0 {
		t.Errorf("empty histogram's median is not 0")
	}
	for i := 1; i <= 100; i++ {
		h.Add(time.Duration(i) * time.Millisecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 50 * time.Millisecond}, {0.99, 99 * time.Millisecond}, {0, time.Millisecond}, {1, 100 * time.Millisecond}} {
		got := h.Quantile(c.q)
		if d := got - c.want; d < -c.want/16 || d > c.want/16 {
			t.Errorf("Quantile(%v) = %v, want %v within 6%%", c.q, got, c.want)
		}
	}
	var m LatencyHistogram
	m.Merge(&h)
	m.Add(time.Hour * 1000) // beyond the last bucket: counted there
	if m.Count != 101 || m.Quantile(1) < time.Hour {
		t.Errorf("merged: count %d, max %v", m.Count, m.Quantile(1))
	}
	for us := uint64(0); us < 1<<20; us = us*5/4 + 1 {
		i := latencyBucket(us)
		if v := latencyValue(i); v < float64(us)*0.9 || v > float64(us)*1.1+1 {
			t.Errorf("bucket of %d µs has midpoint %v", us, v)
		}
	}
}

// The guest transmits while checkpoints seal and acknowledgements release
// concurrently, at a small bound: every frame reaches the tap once, in
// order.
func TestNetHoldOutputConcurrent(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	if err := n.HoldOutput(EgressBounds{MaxFrames: 3}); err != nil {
		t.Fatal(err)
	}
	const total = 100
	all := numbered("concurrent", total)
	stop := make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		// The checkpointer: pause (quiesce), seal, resume, acknowledge.
		for e := uint64(1); ; e++ {
			if err := d.tr.Quiesce(); err != nil {
				errs <- err
				return
			}
			_, err := n.SealOutput(e)
			if err == nil {
				err = d.tr.Resume()
			}
			if err == nil {
				err = n.ReleaseOutput(e)
			}
			if err != nil {
				errs <- err
				return
			}
			select {
			case <-stop:
				errs <- nil
				return
			default:
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	hdr := make([]byte, NetHeaderSize)
	outstanding := 0
	got := make(chan []byte, total)
	go func() {
		for range total {
			got <- ps.recvQuiet()
		}
	}()
	for i, f := range all {
		for outstanding >= 8 {
			outstanding -= len(d.takeUsed(netTxQueue))
			time.Sleep(50 * time.Microsecond)
		}
		d.submit(netTxQueue, d.chain(buf{data: append(bytes.Clone(hdr), f...)}))
		outstanding++
		if err := d.write(regQueueNotify, netTxQueue); err != nil {
			t.Fatalf("notify %d: %v", i, err)
		}
	}
	for i, w := range all {
		select {
		case f := <-got:
			if !bytes.Equal(f, w) {
				t.Fatalf("frame %d on the tap: %q, want %q", i, f, w)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("frame %d did not reach the tap; stats %+v", i, n.EgressStats())
		}
	}
	close(stop)
	if err := <-errs; err != nil {
		t.Fatal(err)
	}
	s := n.EgressStats()
	if s.ReleasedFrames != total || s.HeldFrames != 0 {
		t.Errorf("stats %+v, want %d released and none held", s, total)
	}
	t.Logf("%d frames: %d stalls at the bound, %d frames waited; added latency p50 %v p99 %v",
		total, s.Stalls, s.WaitedFrames, s.Latency.Quantile(0.5), s.Latency.Quantile(0.99))
}

// A frame larger than the byte bound still goes through, alone.
func TestNetHoldOutputOversize(t *testing.T) {
	tap := makeTunTap(t, unix.IFF_TAP)
	d, n := newNetDriver(t, tap)
	ps := newPacketSocket(t, tap)
	if err := n.HoldOutput(EgressBounds{MaxBytes: 10}); err != nil {
		t.Fatal(err)
	}
	all := numbered("larger than the bound", 2)
	d.txFrames(all...)
	if used := d.takeUsed(netTxQueue); len(used) != 1 {
		t.Fatalf("%d tx used entries, want 1", len(used))
	}
	for e := uint64(1); e <= 2; e++ {
		if _, err := n.SealOutput(e); err != nil {
			t.Fatal(err)
		}
		if err := n.ReleaseOutput(e); err != nil {
			t.Fatal(err)
		}
	}
	ps.expectFrames(all...)
}

// TestNetOutputGateCost measures, in one run, the host time per frame of
// transmitting straight to the tap and through the output gate (the frame
// copied, then sealed and released in epochs of 32 frames), and logs a
// bench line with the ratio. It asserts only that every frame arrives.
func TestNetOutputGateCost(t *testing.T) {
	if testing.Short() {
		t.Skip("bench line only")
	}
	tapD, tapH := makeTunTap(t, unix.IFF_TAP), makeTunTap(t, unix.IFF_TAP)
	dd, nd := newNetDriver(t, tapD)
	dh, nh := newNetDriver(t, tapH)
	if err := nh.HoldOutput(EgressBounds{}); err != nil {
		t.Fatal(err)
	}
	f := frame(hostMAC, guestMAC, strings.Repeat("p", 1400))
	hdr := make([]byte, NetHeaderSize)
	const rounds, perEpoch = 200, 32
	var direct, held []time.Duration // per round
	epoch := uint64(0)
	for range rounds {
		start := time.Now()
		for range perEpoch {
			dd.submit(netTxQueue, dd.chain(buf{data: append(bytes.Clone(hdr), f...)}))
			if err := dd.notify(netTxQueue); err != nil {
				t.Fatal(err)
			}
			dd.takeUsed(netTxQueue)
		}
		direct = append(direct, time.Since(start))
		dd.next = bufBase
		start = time.Now()
		for range perEpoch {
			dh.submit(netTxQueue, dh.chain(buf{data: append(bytes.Clone(hdr), f...)}))
			if err := dh.notify(netTxQueue); err != nil {
				t.Fatal(err)
			}
			dh.takeUsed(netTxQueue)
		}
		epoch++
		if _, err := nh.SealOutput(epoch); err != nil {
			t.Fatal(err)
		}
		if err := nh.ReleaseOutput(epoch); err != nil {
			t.Fatal(err)
		}
		held = append(held, time.Since(start))
		dh.next = bufBase
	}
	n := rounds * perEpoch
	if nd.Stats().TxFrames != uint64(n) || nh.Stats().TxFrames != uint64(n) {
		t.Fatalf("frames written: direct %d, held %d; want %d each", nd.Stats().TxFrames, nh.Stats().TxFrames, n)
	}
	// Medians of the rounds: the machine is shared, and a round that
	// another process interrupted says nothing about the gate.
	median := func(ds []time.Duration) time.Duration {
		slices.Sort(ds)
		return ds[len(ds)/2]
	}
	md, mh := median(direct), median(held)
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 / perEpoch }
	t.Logf("bench net-output-gate: frames=%d frame_bytes=%d direct_us_per_frame=%.2f held_us_per_frame=%.2f ratio=%.2f (medians of %d epochs of %d frames)",
		n, len(f), us(md), us(mh), float64(mh)/float64(md), rounds, perEpoch)
}
