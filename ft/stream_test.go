package ft

import (
	"bytes"
	"errors"
	"testing"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// testCheckpoint builds a checkpoint of n pages with recognisable contents.
func testCheckpoint(epoch uint64, full bool, pfns ...uint64) *Checkpoint {
	cp := &Checkpoint{Epoch: epoch, PFNs: pfns, State: []byte("state")}
	if full {
		cp.Kind = KindFull
	}
	for _, pfn := range pfns {
		cp.Data = append(cp.Data, bytes.Repeat([]byte{byte(pfn + epoch)}, mmu.PageSize)...)
	}
	return cp
}

// TestStreamRefusesBadCheckpoints sends good and bad checkpoint streams over
// a real mTLS link: good ones are acknowledged and applied; every bad one is
// refused with an Error and leaves the intermediary's image as it was.
func TestStreamRefusesBadCheckpoints(t *testing.T) {
	const memSize = 4 << 20
	bad := []struct {
		name string
		send func(c MessageConn) error
	}{
		{"digest mismatch", func(c MessageConn) error {
			begin := wire.CheckpointBegin{Epoch: 2, Base: 1, Pages: 1, StateLen: 5}
			c.WriteMessage(&begin)
			c.WriteMessage(&wire.PageBatch{Epoch: 2, Pages: []wire.Page{{PFN: 3, Data: make([]byte, mmu.PageSize)}}})
			c.WriteMessage(&wire.StateBlob{Epoch: 2, Data: []byte("state")})
			return c.WriteMessage(&wire.CheckpointEnd{Epoch: 2, Pages: 1, StateLen: 5})
		}},
		{"missing page", func(c MessageConn) error {
			cp := testCheckpoint(2, false, 3, 4)
			begin := wire.CheckpointBegin{Epoch: 2, Base: 1, Pages: 3, StateLen: 5}
			c.WriteMessage(&begin)
			d := wire.NewDigester(begin)
			b := wire.PageBatch{Epoch: 2, Pages: []wire.Page{{PFN: 3, Data: cp.Page(0)}, {PFN: 4, Data: cp.Page(1)}}}
			d.AddBatch(&b)
			d.AddState(cp.State)
			c.WriteMessage(&b)
			c.WriteMessage(&wire.StateBlob{Epoch: 2, Data: cp.State})
			return c.WriteMessage(&wire.CheckpointEnd{Epoch: 2, Pages: 3, StateLen: 5, Digest: d.Sum()})
		}},
		{"page beyond memory", func(c MessageConn) error {
			return SendCheckpoint(c, testCheckpoint(2, false, 5, memSize/mmu.PageSize), 1)
		}},
		{"delta on the wrong base", func(c MessageConn) error {
			return SendCheckpoint(c, testCheckpoint(3, false, 5), 2)
		}},
		{"frame of another epoch", func(c MessageConn) error {
			c.WriteMessage(&wire.CheckpointBegin{Epoch: 2, Base: 1, Pages: 1, StateLen: 5})
			return c.WriteMessage(&wire.PageBatch{Epoch: 7, Pages: []wire.Page{{PFN: 3, Data: make([]byte, mmu.PageSize)}}})
		}},
		{"unexpected message", func(c MessageConn) error { return c.WriteMessage(&wire.Ack{Epoch: 1}) }},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			pc, ic := link(t, memSize)
			in, err := NewIntermediary(memSize, nil)
			if err != nil {
				t.Fatal(err)
			}
			served := make(chan error, 1)
			go func() { served <- in.ServePrimary(ic) }()
			if err := SendCheckpoint(pc, testCheckpoint(1, true, 1, 2, 3), 0); err != nil {
				t.Fatal(err)
			}
			if m, err := pc.ReadMessage(); err != nil || m.Type() != wire.TypeAck {
				t.Fatalf("after a good full image: %v, %v; want an Ack", m, err)
			}
			var before []byte
			in.Image().Read(func(mem, _ []byte, _ uint64) { before = append([]byte(nil), mem...) })
			if err := tc.send(pc); err != nil {
				t.Fatal(err)
			}
			m, err := pc.ReadMessage()
			var e *wire.Error
			if err == nil {
				e, _ = m.(*wire.Error)
			}
			if e == nil {
				t.Errorf("reply to a bad checkpoint: %v, %v; want an Error", m, err)
			}
			if err := <-served; err == nil {
				t.Errorf("ServePrimary returned nil after a bad checkpoint")
			} else {
				if e != nil && e.Code == wire.CodeIncomplete && !errors.Is(err, ErrBadCheckpoint) {
					t.Errorf("ServePrimary = %v, want ErrBadCheckpoint", err)
				}
				if !errors.Is(err, ErrRefused) || errors.Is(err, ErrPrimaryLost) {
					t.Errorf("ServePrimary = %v, want ErrRefused (the primary is alive: no failover)", err)
				}
			}
			if in.Image().Epoch() != 1 {
				t.Errorf("image epoch %d after a refused checkpoint, want 1", in.Image().Epoch())
			}
			in.Image().Read(func(mem, _ []byte, _ uint64) {
				if !bytes.Equal(mem, before) {
					t.Errorf("a refused checkpoint changed the image")
				}
			})
			// The primary reconnects and starts again with a full image.
			pc2, ic2 := link(t, memSize)
			go func() { served <- in.ServePrimary(ic2) }()
			if err := SendCheckpoint(pc2, testCheckpoint(5, true, 4, 5), 0); err != nil {
				t.Fatal(err)
			}
			if m, err := pc2.ReadMessage(); err != nil || m.Type() != wire.TypeAck {
				t.Errorf("after reconnecting with a full image: %v, %v; want an Ack", m, err)
			}
			if in.Image().Epoch() != 5 {
				t.Errorf("image epoch %d after the reconnected primary's full image, want 5", in.Image().Epoch())
			}
		})
	}
}

func TestImageFrequency(t *testing.T) {
	im := NewImage(2 << 20)
	off := func(pfn uint64) (uint64, error) { return pfn * mmu.PageSize, nil }
	if err := im.Apply(testCheckpoint(1, true, 0, 1), 0, off); err != nil {
		t.Fatal(err)
	}
	for e := uint64(2); e <= 40; e++ {
		pfns := []uint64{0}
		if e%10 == 0 {
			pfns = append(pfns, 1)
		}
		if err := im.Apply(testCheckpoint(e, false, pfns...), e-1, off); err != nil {
			t.Fatal(err)
		}
	}
	hot, _ := im.Frequency(0)
	cold, _ := im.Frequency(1)
	never, _ := im.Frequency(2)
	if !(hot > 4*cold && cold > never && never == 0) {
		t.Errorf("Frequency: page changed every epoch %.2f, every 10th %.2f, never %.2f", hot, cold, never)
	}
	if _, err := im.Frequency(1 << 20); err == nil {
		t.Errorf("Frequency of a page beyond the image succeeded")
	}
	if err := im.Apply(testCheckpoint(42, false, 0), 40, off); err != nil {
		t.Errorf("delta 42 on 40 = %v", err)
	}
	if err := im.Apply(testCheckpoint(43, false, 0), 41, off); err == nil {
		t.Errorf("delta on a base other than the image's epoch applied")
	}
}
