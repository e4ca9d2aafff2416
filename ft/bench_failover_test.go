package ft

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// BenchmarkRate measures the epoch rate the primary sustains at the default
// 25 ms interval (the target is 40 epochs/s) while the counter payload
// dirties 64 KiB, 4 MiB, 16 MiB and 40 MiB per iteration, streaming to an
// intermediary over mutual TLS on loopback. The send is pipelined: epoch
// e+1 runs and is taken while checkpoint e streams. The dirty rate is the
// page data the checkpoints carried per second; the 40 MiB guest writes as
// fast as this host lets a guest dirty pages (each first write after a
// harvest is a write-protect fault), so its line is the epoch rate at the
// highest dirty rate the payload reaches. The last line runs the 4 MiB
// guest with a 1 MiB dirty budget: more, smaller epochs and shorter stuns.
func BenchmarkRate(b *testing.B) {
	kvmtest.Require(b)
	const interval = 25 * time.Millisecond
	for _, tc := range []struct {
		hot    int
		budget uint64
	}{{16, 0}, {1024, 0}, {4096, 0}, {10240, 0}, {1024, 1 << 20}} {
		hot := tc.hot
		memSize := uint64(64 << 20)
		pc, ic := link(b, memSize)
		in, err := NewIntermediary(memSize, nil)
		if err != nil {
			b.Fatal(err)
		}
		go in.ServePrimary(ic)
		var p *Primary
		m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
			Options:  map[string]string{"pages": strconv.Itoa(hot), "hot": strconv.Itoa(hot), "cold_every": "0", "iterations": "0", "report": "0"},
			OnRecord: func(r vmm.Record) { p.Record(r) }}})
		if err != nil {
			b.Fatal(err)
		}
		p, err = NewPrimary(m, pc, PrimaryConfig{Interval: interval, DirtyBudget: tc.budget})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		ran := make(chan struct{})
		go func() { m.Run(ctx); p.Halted(); close(ran) }()
		done := make(chan error, 1)
		go func() { done <- p.Run(ctx) }()
		// Past the first full image, measure 3 s of steady state.
		for p.Acked() < 5 {
			time.Sleep(time.Millisecond)
		}
		e0, b0, t0, g0 := p.Epochs(), p.bytesSent.Load(), time.Now(), p.BudgetEpochs()
		time.Sleep(3 * time.Second)
		e1, b1, dt, g1 := p.Epochs(), p.bytesSent.Load(), time.Since(t0), p.BudgetEpochs()
		q := p.stuns.quantiles(0.5, 0.99)
		cancel()
		<-ran
		<-done
		m.Close()
		eps := float64(e1-e0) / dt.Seconds()
		target := float64(time.Second) / float64(interval)
		fmt.Printf("bench ft-rate: epochs_s=%.1f interval=25ms target_epochs_s=%.0f ratio=%.2f dirty_rate_mib_s=%.1f dirty_per_iteration_kib=%d stun_ms_p50=%.2f stun_ms_p99=%.2f dirty_budget_mib=%d by_budget=%.2f\n",
			eps, target, eps/target, float64(b1-b0)/(1<<20)/dt.Seconds(), hot*4, q[0]*1e3, q[1]*1e3, tc.budget>>20, float64(g1-g0)/max(1, float64(e1-e0)))
	}
}

// BenchmarkFailover measures a failover of a 256 MiB counter guest on
// loopback (primary, intermediary and backup in one process, links over
// mutual TLS): the primary's host is lost (its link closes with no
// goodbye, as a killed process's does); detect is until the intermediary
// declares it lost, flush until the backup holds the last acknowledged
// epoch, activate until the backup confirms the guest is restored, and
// total until the resumed guest emits its first new record. Median of 3.
func BenchmarkFailover(b *testing.B) {
	kvmtest.Require(b)
	const memSize = 256 << 20
	var detects, flushes, activates, totals []time.Duration
	for range 3 {
		d, f, a, t := failoverOnce(b, memSize)
		detects, flushes, activates, totals = append(detects, d), append(flushes, f), append(activates, a), append(totals, t)
	}
	fmt.Printf("bench ft-failover: detect_ms=%.2f flush_ms=%.2f activate_ms=%.2f total_ms=%.2f guest_mib=%d runs=3\n",
		msf(pct(detects, 50)), msf(pct(flushes, 50)), msf(pct(activates, 50)), msf(pct(totals, 50)), memSize>>20)
}

func failoverOnce(b *testing.B, memSize uint64) (detect, flush, activate, total time.Duration) {
	pc, ic := link(b, memSize)
	ib, bi := roleLink(b, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		b.Fatal(err)
	}
	lost := make(chan time.Time, 1)
	go func() { in.ServePrimary(ic); lost <- time.Now() }()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	go in.ServeBackup(ctx, ib)

	var (
		mu       sync.Mutex
		heldMax  uint64 // the largest record released at activation (held by the primary)
		firstNew atomic.Int64
		armed    atomic.Bool
	)
	bk, err := NewBackup(memSize, BackupConfig{Restore: vmm.RestoreConfig{OnRecord: func(r vmm.Record) {
		mu.Lock()
		defer mu.Unlock()
		if !armed.Load() {
			heldMax = max(heldMax, r.Value)
			return
		}
		if r.Value > heldMax && firstNew.Load() == 0 {
			firstNew.Store(time.Now().UnixNano())
		}
	}}})
	if err != nil {
		b.Fatal(err)
	}
	served := make(chan *vmm.Machine, 1)
	go func() { m, _ := bk.Serve(bi); served <- m }()

	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "256", "hot": "16", "cold_every": "2", "iterations": "0", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		b.Fatal(err)
	}
	if p, err = NewPrimary(m, pc, PrimaryConfig{}); err != nil {
		b.Fatal(err)
	}
	pctx, kill := context.WithCancel(ctx)
	machineDone := make(chan struct{})
	go func() { m.Run(pctx); close(machineDone) }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(pctx) }()
	// Steady state: the backup follows the intermediary (the re-seed's
	// backlog of deltas is drained).
	for bk.Committed() < 20 || bk.Committed()+1 < in.Image().Epoch() {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)

	t0 := time.Now()
	pc.Close() // the primary's host is gone
	kill()
	tLost := <-lost
	if _, err := in.Failover(ctx); err != nil {
		b.Fatal(err)
	}
	ft := in.LastFailover()
	bm := <-served
	if bm == nil {
		b.Fatal("the backup did not activate")
	}
	armed.Store(true)
	runDone := make(chan error, 1)
	go func() { _, err := bm.Run(ctx); runDone <- err }()
	for firstNew.Load() == 0 {
		time.Sleep(50 * time.Microsecond)
	}
	total = time.Unix(0, firstNew.Load()).Sub(t0)
	bm.Stop(0)
	if err := <-runDone; err != nil && !errors.Is(err, context.Canceled) {
		b.Fatal(err)
	}
	bm.Close()
	<-primaryDone
	<-machineDone
	m.Close()
	return tLost.Sub(t0), ft.Flush, ft.Activate, total
}
