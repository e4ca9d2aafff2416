package vmm

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

// TestPauseCycles runs many pause cycles of a 2-vCPU machine with capture
// at parking on, mixing RequestPause, CaptureState, OnVCPU and Resume: the
// guest goes on after every Resume, and the state the vCPUs read as they
// parked is what their registers hold while they stay parked.
func TestPauseCycles(t *testing.T) {
	requireKVM(t)
	var recs atomic.Uint64
	m, err := New(Config{MemSize: 8 << 20, CPUs: 2, Payload: &PayloadConfig{Name: "counter",
		Options:  map[string]string{"iterations": "0", "report": "0", "pages": "4", "hot": "4"},
		OnRecord: func(r Record) { recs.Store(r.Value) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.CaptureOnPause(true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	for i := 0; i < 500; i++ {
		before := recs.Load()
		deadline := time.Now().Add(20 * time.Second)
		for recs.Load() <= before {
			if time.Now().After(deadline) {
				t.Fatalf("cycle %d: records stuck at %d after Resume", i, before)
			}
			time.Sleep(20 * time.Microsecond)
		}
		if i%3 == 0 {
			m.RequestPause()
		}
		if _, err := m.Pause(); err != nil {
			t.Fatalf("cycle %d: Pause = %v", i, err)
		}
		st, err := m.CaptureState()
		if err != nil {
			t.Fatalf("cycle %d: CaptureState = %v", i, err)
		}
		if i%5 == 0 {
			for c := range 2 {
				var regs arch.Regs
				if err := m.OnVCPU(c, func(v *arch.VCPU) (err error) { regs, err = v.Regs(); return err }); err != nil {
					t.Fatal(err)
				}
				if regs != st.VCPUs[c].Regs {
					t.Fatalf("cycle %d: vCPU %d: captured registers %+v, its registers while parked %+v", i, c, st.VCPUs[c].Regs, regs)
				}
			}
		}
		if _, err := m.Resume(); err != nil {
			t.Fatalf("cycle %d: Resume = %v", i, err)
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run = %v, want Canceled", err)
	}
}
