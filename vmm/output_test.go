package vmm

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/linuxtest"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

const (
	tTxBufs    = 0x2300000 // transmit buffers, 4 KiB apart
	tEtherType = 0x88b5    // IEEE 802 local experimental
)

// tapReader reads the frames of tEtherType the device writes to a tap.
type tapReader struct{ *linuxtest.TapReader }

func newTapReader(t *testing.T, tap string) *tapReader {
	return &tapReader{linuxtest.NewTapReader(t, tap)}
}

// expect receives len(want) test frames and checks they are want, in order.
func (r *tapReader) expect(want ...[]byte) { r.Expect(tEtherType, 5*time.Second, want...) }

func testFrame(mac net.HardwareAddr, payload string) []byte {
	f := append(bytes.Repeat([]byte{0xff}, 6), mac...)
	f = append(f, tEtherType>>8, tEtherType&0xff)
	return append(f, payload...)
}

// TestNetOutputCommit drives a protected Linux machine's NIC from the host
// side: frames are held until the release of their epoch, in order; a
// checkpoint carries the frames still held; the machine restored from it
// with those frames sends them before what its guest had queued.
func TestNetOutputCommit(t *testing.T) {
	requireKVM(t)
	tap := makeTap(t)
	cfg := linuxConfig(t, linuxtest.CodeSpin)
	cfg.Linux.Nets = []NetConfig{{Tap: tap}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.HoldNetOutput(virtio.EgressBounds{MaxBytes: virtio.MaxEgressBytes + 1}); err == nil {
		t.Errorf("HoldNetOutput with a bound beyond the maximum succeeded")
	}
	if err := m.HoldNetOutput(virtio.EgressBounds{}); err != nil {
		t.Fatal(err)
	}
	mac := m.linux.virtio[0].dev.(*virtio.Net).MAC()
	nic := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: tNetRings, Hdr: tHdr, TxBufs: tTxBufs}
	nic.Setup(2)
	rd := newTapReader(t, tap)
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	if err := m.HoldNetOutput(virtio.EgressBounds{}); err == nil {
		t.Errorf("HoldNetOutput after Run succeeded")
	}

	a, b, c := testFrame(mac, "frame A, epoch 1"), testFrame(mac, "frame B, epoch 2"), testFrame(mac, "frame C, queued")
	nic.TxAvail(0, a)
	nic.W32(linuxtest.RegQueueNotify, 1)
	if got := nic.UsedIdx(1); got != 1 {
		t.Fatalf("transmit used index %d, want 1: the device did not take the frame", got)
	}
	if _, err := m.SealNetOutput(1); !errors.Is(err, ErrNotPaused) {
		t.Errorf("SealNetOutput while running = %v, want ErrNotPaused", err)
	}
	seal := func(e uint64) []virtio.HeldFrame {
		t.Helper()
		if _, err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		carried, err := m.SealNetOutput(e)
		if err != nil {
			t.Fatal(err)
		}
		frames, err := virtio.DecodeHeldFrames(carried)
		if err != nil {
			t.Fatal(err)
		}
		return frames
	}
	if got := seal(1); len(got) != 1 || !bytes.Equal(got[0].Data, a) || got[0].Epoch != 1 || got[0].NIC != 0 {
		t.Errorf("checkpoint 1 carries %+v, want frame A", got)
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	nic.TxAvail(1, b)
	nic.W32(linuxtest.RegQueueNotify, 1)
	if err := m.ReleaseNetOutput(1); err != nil {
		t.Fatal(err)
	}
	if got := seal(2); len(got) != 1 || !bytes.Equal(got[0].Data, b) {
		t.Errorf("checkpoint 2 carries %+v, want frame B only (A was released)", got)
	}
	carried, err := m.SealNetOutput(2) // again, same epoch: nothing new
	if err != nil {
		t.Fatal(err)
	}
	// C is available but not notified: the checkpoint's ring holds it.
	nic.TxAvail(2, c)
	var snap bytes.Buffer
	if err := m.SaveSnapshot(&snap); err != nil {
		t.Fatal(err)
	}
	if s := m.NetOutputStats(); !s.Holding || s.HeldFrames != 1 || s.ReleasedFrames != 1 || s.Latency.Count != 1 {
		t.Errorf("NetOutputStats() = %+v, want B held and A released", s)
	}
	if _, err := m.Resume(); err != nil { // the kick takes C, which stays held
		t.Fatal(err)
	}
	if err := m.ReleaseNetOutput(2); err != nil {
		t.Fatal(err)
	}
	m.Stop(0)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if s := m.NetOutputStats(); s.HeldFrames != 1 || s.OpenFrames != 1 {
		t.Errorf("after Release(2): %+v, want C held, open", s)
	}
	m.Close() // lets go of the tap; C is never released
	// A was written after B was taken, and B only after A: a frame
	// written at once would come out of order.
	rd.expect(a, b)

	restore := func(carried []byte) (*Machine, error) {
		return RestoreSnapshot(RestoreConfig{Nets: []NetConfig{{Tap: tap, MAC: mac}}, NetCarried: carried}, bytes.NewReader(snap.Bytes()))
	}
	otherNIC, _ := virtio.AppendHeldFrames(nil, []virtio.HeldFrame{{NIC: 1, Epoch: 2, Data: b}})
	for _, bad := range []struct {
		name, want string
		carried    []byte
	}{
		{"corrupt", "bad carried frames", append(bytes.Clone(carried), 0)},
		{"no such NIC", "NIC 1", otherNIC},
	} {
		r, err := restore(bad.carried)
		if err == nil || r != nil || !strings.Contains(err.Error(), bad.want) {
			t.Errorf("%s: restore = %v, %v; want an error with %q and no machine", bad.name, r, err, bad.want)
		}
		if r != nil {
			r.Close()
		}
	}
	r, err := restore(carried)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The carried B first, then C, which the restored guest had queued.
	rd.expect(b, c)
	if s := r.NetOutputStats(); s.Holding || s.CarriedSent != 1 {
		t.Errorf("restored machine's NetOutputStats() = %+v, want 1 carried frame sent and no holding", s)
	}
}

func TestHoldNetOutputPayload(t *testing.T) {
	requireKVM(t)
	m, err := New(Config{MemSize: 16 << 20, Payload: &PayloadConfig{Name: "counter"}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.HoldNetOutput(virtio.EgressBounds{}); err == nil {
		t.Errorf("HoldNetOutput on a payload machine succeeded")
	}
	if err := m.ReleaseNetOutput(1); err != nil {
		t.Errorf("ReleaseNetOutput on a payload machine = %v", err)
	}
}

// At the bound the machine's NIC leaves the guest's frames in the ring; each
// release (with the machine running) takes the next one, with no loss and
// in order.
func TestNetOutputBound(t *testing.T) {
	requireKVM(t)
	tap := makeTap(t)
	cfg := linuxConfig(t, linuxtest.CodeSpin)
	cfg.Linux.Nets = []NetConfig{{Tap: tap}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.HoldNetOutput(virtio.EgressBounds{MaxFrames: 1}); err != nil {
		t.Fatal(err)
	}
	mac := m.linux.virtio[0].dev.(*virtio.Net).MAC()
	nic := &linuxtest.Driver{T: t, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: tNetRings, Hdr: tHdr, TxBufs: tTxBufs}
	nic.Setup(2)
	rd := newTapReader(t, tap)
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	defer func() {
		m.Stop(0)
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	frames := [][]byte{testFrame(mac, "bounded 0"), testFrame(mac, "bounded 1"), testFrame(mac, "bounded 2")}
	for i, f := range frames {
		nic.TxAvail(i, f)
	}
	nic.W32(linuxtest.RegQueueNotify, 1)
	for e := uint64(1); e <= 3; e++ {
		if got := nic.UsedIdx(1); got != uint16(e) {
			t.Fatalf("epoch %d: transmit used index %d, want %d (one frame per release)", e, got, e)
		}
		if _, err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		if _, err := m.SealNetOutput(e); err != nil {
			t.Fatal(err)
		}
		if _, err := m.Resume(); err != nil {
			t.Fatal(err)
		}
		if err := m.ReleaseNetOutput(e); err != nil {
			t.Fatal(err)
		}
	}
	rd.expect(frames...)
	if s := m.NetOutputStats(); s.ReleasedFrames != 3 || s.Stalls != 2 || s.WaitedFrames != 2 {
		t.Errorf("NetOutputStats() = %+v, want 3 released, 2 stalls, 2 waited", s)
	}
}
