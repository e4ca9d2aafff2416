package ft

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// TestRunPrimaryFenced: a primary whose intermediary says it has failed
// over (CodeFenced) stops its guest and ends with ErrSuperseded; nothing
// past the last acknowledged epoch is ever released.
func TestRunPrimaryFenced(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 8 << 20
	c := newCluster(t)
	ln := c.listen("intermediary", RoleIntermediary, wire.RolePrimary)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// A stand-in intermediary: it acknowledges the first five checkpoints
	// and fences the primary at the sixth.
	const acked = 5
	go func() {
		pc, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		for {
			m, err := pc.ReadMessage()
			if err != nil {
				return
			}
			begin, ok := m.(*wire.CheckpointBegin)
			if !ok {
				continue
			}
			cp, _, err := ReceiveCheckpoint(pc, begin, memSize/4096)
			if err != nil {
				return
			}
			if cp.Epoch > acked {
				pc.CloseWithError(wire.CodeFenced, "fenced: the backup takes over")
				return
			}
			if pc.WriteMessage(&wire.Ack{Epoch: cp.Epoch}) != nil {
				return
			}
		}
	}()

	var (
		mu       sync.Mutex
		released []uint64
	)
	log, tl := newTestLog()
	_, err := RunPrimary(ctx, PrimaryRunConfig{
		Machine: vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter", Options: map[string]string{"pages": "16", "iterations": "0", "report": "0"}}},
		Epochs: PrimaryConfig{Interval: 10 * time.Millisecond, OnRelease: func(r vmm.Record) {
			mu.Lock()
			released = append(released, r.Value)
			mu.Unlock()
		}},
		Intermediary: ln.Addr().String(), Links: c.links("primary", RolePrimary, log), Log: log,
	})
	if !errors.Is(err, ErrSuperseded) {
		t.Fatalf("RunPrimary fenced = %v, want ErrSuperseded", err)
	}
	mu.Lock()
	defer mu.Unlock()
	for i, v := range released {
		if v != uint64(i+1) {
			t.Fatalf("released records %v...: not the guest's sequence from 1", released[:i+1])
		}
	}
	if tl.has("all output released") {
		t.Errorf("a fenced primary reports its output released")
	}
}
