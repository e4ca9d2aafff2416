package ft

import (
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// cutRelay is a TCP relay between a dialer and a listener on loopback that
// cuts the link on demand: once armed, after a given number of further
// bytes from the dialer, it ends both connections, with a reset or a plain
// close (a FIN, so the far end reads a truncated stream).
type cutRelay struct {
	ln    net.Listener
	reset bool

	mu      sync.Mutex
	armed   bool
	left    int // bytes to pass once armed
	conns   []*net.TCPConn
	cutDone chan struct{}
}

func newCutRelay(t testing.TB, reset bool) *cutRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &cutRelay{ln: ln, reset: reset, cutDone: make(chan struct{})}
	t.Cleanup(func() { ln.Close(); r.cut() })
	return r
}

// via starts relaying to target and returns the relay's address.
func (r *cutRelay) via(target string) string {
	target = strings.TrimPrefix(target, "tcp://")
	go func() {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", target)
		if err != nil {
			c.Close()
			return
		}
		r.mu.Lock()
		r.conns = append(r.conns, c.(*net.TCPConn), s.(*net.TCPConn))
		r.mu.Unlock()
		go io.Copy(c, s) // replies pass untouched
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				r.mu.Lock()
				if r.armed && n >= r.left {
					n, r.left = r.left, 0
				} else if r.armed {
					r.left -= n
				}
				cut := r.armed && r.left == 0
				r.mu.Unlock()
				if _, werr := s.Write(buf[:n]); werr != nil {
					return
				}
				if cut {
					r.cut()
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	return "tcp://" + r.ln.Addr().String()
}

// arm makes the relay cut the link after n more bytes from the dialer.
func (r *cutRelay) arm(n int) {
	r.mu.Lock()
	r.armed, r.left = true, n
	r.mu.Unlock()
}

func (r *cutRelay) cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		if r.reset {
			c.SetLinger(0) // close with a reset
		}
		c.Close()
	}
	r.conns = nil
}

// TestLinkCutMidCheckpoint: a primary whose link breaks while a checkpoint
// is on the wire (the process was killed: the stream ends between frames,
// inside a frame, or with a reset) is a lost primary, not a refused
// checkpoint. ServePrimary must say ErrPrimaryLost, never ErrRefused, so
// the intermediary fails over at once instead of waiting for a primary that
// will not reconnect.
func TestLinkCutMidCheckpoint(t *testing.T) {
	const memSize = 16 << 20
	for _, tc := range []struct {
		name string
		cut  func(pc MessageConn, r *cutRelay) // cuts the link mid-checkpoint (before the send)
	}{
		// The primary's side closes cleanly between two frames of the
		// checkpoint: the intermediary reads the end of the stream.
		{"end of stream between frames", nil},
		// The link ends inside a page batch frame: a truncated frame.
		{"truncated frame", func(_ MessageConn, r *cutRelay) { r.arm(1 << 20) }},
		// The link is reset inside a page batch frame.
		{"reset", func(_ MessageConn, r *cutRelay) { r.arm(1 << 20) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newCutRelay(t, tc.name == "reset")
			pc, ic := roleLinkVia(t, memSize, wire.RolePrimary, wire.RoleIntermediary, "tcp://127.0.0.1:0", nil, r.via)
			in, err := NewIntermediary(memSize, nil)
			if err != nil {
				t.Fatal(err)
			}
			served := make(chan error, 1)
			go func() { served <- in.ServePrimary(ic) }()
			// Epoch 1, a full image, arrives whole and is acknowledged.
			full := testImage(1, memSize)
			if err := SendCheckpoint(pc, full, 0); err != nil {
				t.Fatal(err)
			}
			if m, err := pc.ReadMessage(); err != nil || m.Type() != wire.TypeAck {
				t.Fatalf("reply to epoch 1: %v, %v; want an Ack", m, err)
			}
			// Epoch 2, 8 MiB of pages, is cut on the wire.
			delta := &Checkpoint{Epoch: 2, State: sealState([]byte("state"), nil)}
			for p := uint64(0); p < 2048; p++ {
				delta.PFNs = append(delta.PFNs, p)
			}
			delta.Data = make([]byte, len(delta.PFNs)*mmu.PageSize)
			if tc.cut == nil {
				// Begin and one batch, then the primary's end closes.
				cutter := &closeAfter{MessageConn: pc, after: 2, close: func() { pc.(io.Closer).Close() }}
				SendCheckpoint(cutter, delta, 1)
			} else {
				tc.cut(pc, r)
				SendCheckpoint(pc, delta, 1)
			}
			err = <-served
			if !errors.Is(err, ErrPrimaryLost) || errors.Is(err, ErrRefused) {
				t.Fatalf("ServePrimary after the link broke mid-checkpoint = %v; want ErrPrimaryLost (fail over now), not ErrRefused", err)
			}
			if !errors.Is(err, ErrLinkBroken) {
				t.Errorf("ServePrimary = %v; want it to say the link broke mid-checkpoint (ErrLinkBroken)", err)
			}
			if e := in.Image().Epoch(); e != 1 {
				t.Errorf("image at epoch %d after the cut; want 1 (the cut checkpoint changes nothing)", e)
			}
		})
	}
}

// closeAfter is a link that closes after its first `after` writes.
type closeAfter struct {
	MessageConn
	after, n int
	close    func()
}

func (c *closeAfter) WriteMessage(m wire.Message) error {
	if c.n == c.after {
		return net.ErrClosed
	}
	err := c.MessageConn.WriteMessage(m)
	if c.n++; c.n == c.after {
		c.close()
	}
	return err
}

// TestRefusalIsNotLoss: a checkpoint that arrives whole and fails
// verification is refused (ErrRefused), not taken for a lost primary.
func TestRefusalIsNotLoss(t *testing.T) {
	const memSize = 16 << 20
	in, pc := servingIntermediaryErr(t, memSize)
	cp := testImage(1, memSize)
	bad := &corruptingConn{MessageConn: pc}
	// The refusal may end the link before the whole image is written.
	SendCheckpoint(bad, cp, 0)
	if m, err := pc.ReadMessage(); err == nil {
		if e, ok := m.(*wire.Error); !ok || e.Code != wire.CodeIncomplete {
			t.Errorf("reply to a corrupt checkpoint: %v; want an Error (incomplete)", m)
		}
	}
	err := <-in
	if !errors.Is(err, ErrRefused) || errors.Is(err, ErrPrimaryLost) {
		t.Fatalf("ServePrimary after a corrupt checkpoint = %v; want ErrRefused", err)
	}
}

// servingIntermediaryErr is servingIntermediary that also returns what
// ServePrimary returned.
func servingIntermediaryErr(t testing.TB, memSize uint64) (<-chan error, MessageConn) {
	t.Helper()
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() {
		err := in.ServePrimary(ic)
		ic.Close() // as the role loop does once ServePrimary returns
		served <- err
	}()
	return served, pc
}

// testImage returns a full image of memSize bytes at epoch.
func testImage(epoch, memSize uint64) *Checkpoint {
	cp := &Checkpoint{Epoch: epoch, Kind: KindFull, State: sealState([]byte("state"), nil), Data: make([]byte, memSize)}
	for i := range cp.Data {
		cp.Data[i] = byte(i * 7)
	}
	for p := uint64(0); p < memSize/mmu.PageSize; p++ {
		cp.PFNs = append(cp.PFNs, p)
	}
	return cp
}

// TestStopEndsStall: under the stall policy with no backup, a checkpoint
// waits unacknowledged; Stop ends the wait: ServePrimary returns ErrStopped
// and the checkpoint is never acknowledged.
func TestStopEndsStall(t *testing.T) {
	const memSize = 2 << 20
	pc, ic := link(t, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetBackupLossPolicy(StallWithoutBackup)
	served := make(chan error, 1)
	go func() { served <- in.ServePrimary(ic) }()
	if err := SendCheckpoint(pc, testImage(1, memSize), 0); err != nil {
		t.Fatal(err)
	}
	acks := make(chan wire.Message, 1)
	go func() {
		m, _ := pc.ReadMessage()
		acks <- m
	}()
	in.Stop()
	if err := <-served; !errors.Is(err, ErrStopped) {
		t.Fatalf("ServePrimary after Stop = %v, want ErrStopped", err)
	}
	ic.Close()
	if m := <-acks; m != nil && m.Type() == wire.TypeAck {
		t.Errorf("the stalled checkpoint was acknowledged")
	}
	in.Stop() // a second Stop does nothing
}

// TestBackupCloseWhileCommitting: Close unmaps the backup's image; a
// checkpoint arriving meanwhile is refused, never applied to unmapped
// memory (which crashed the process).
func TestBackupCloseWhileCommitting(t *testing.T) {
	const memSize = 2 << 20
	for range 20 {
		pc, ic := link(t, memSize)
		b, err := NewBackup(memSize, BackupConfig{})
		if err != nil {
			t.Fatal(err)
		}
		served := make(chan error, 1)
		go func() {
			_, err := b.Serve(ic)
			ic.Close()
			served <- err
		}()
		go func() {
			for e := uint64(1); ; e++ {
				if SendCheckpoint(pc, testImage(e, memSize), 0) != nil {
					return
				}
			}
		}()
		time.Sleep(time.Millisecond)
		if err := b.Close(); err != nil {
			t.Fatal(err)
		}
		pc.Close()
		if err := <-served; err != nil && !errors.Is(err, errBackupClosed) && !errors.Is(err, ErrLinkBroken) {
			t.Logf("Serve after Close: %v", err)
		}
	}
}
