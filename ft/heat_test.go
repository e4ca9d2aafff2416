package ft

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
)

// heatWarmup is the warm-up of the heat failover's large-page controllers,
// in windows.
const heatWarmup = 6

// heatPager is the large-page controller of the heat failover, on both
// sides: the two hot regions fit its budget.
func heatPager(heat *mmu.Heat) largepage.Config {
	return largepage.Config{Budget: 2, Period: 60 * time.Millisecond, Window: 8 * time.Millisecond, Warmup: heatWarmup,
		Seed: 1, Source: largepage.SourceRefault, Heat: heat}
}

// heatRun is what one heat failover observed.
type heatRun struct {
	heat    mmu.Heat // what the activated checkpoint carried
	hot     []uint64 // the guest's hot regions
	windows int      // the backup controller's window when pages_2m > 0
	status  largepage.Status
	primary largepage.Status // the primary's controller at the failover
}

// heatFailover runs counter (its hot pages fill the first two data regions)
// under a primary whose large-page controller counts the pages each
// checkpoint reports written (dirty logging keeps it from sampling) and
// gives its heat to every checkpoint, through an intermediary to a backup.
// Once the primary's controller has warmed up and its heat is committed, the
// primary's host is lost, the intermediary fails over, and the activated
// guest gets a large-page controller, seeded with the carried heat if seed.
// It returns the window of that controller in which KVM first mapped a page
// of the guest with 2 MiB.
func heatFailover(t testing.TB, seed bool) heatRun {
	const memSize = 32 << 20
	pc, ic := link(t, memSize)
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	go in.ServePrimary(ic)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	go in.ServeBackup(ctx, ib)
	bk, err := NewBackup(memSize, BackupConfig{})
	if err != nil {
		t.Fatal(err)
	}
	type served struct {
		m   *vmm.Machine
		err error
	}
	backupDone := make(chan served, 1)
	go func() { m, err := bk.Serve(bi); backupDone <- served{m, err} }()

	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "2048", "hot": "1024", "cold_every": "0", "iterations": "0", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	hot := m.DataRegions()[:2]
	lp, err := largepage.Start(m, heatPager(nil))
	if err != nil {
		t.Fatal(err)
	}
	p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 10 * time.Millisecond, Heat: lp.CheckpointHeat})
	if err != nil {
		t.Fatal(err)
	}
	pctx, kill := context.WithCancel(ctx)
	machineDone := make(chan error, 1)
	go func() { _, err := m.Run(pctx); machineDone <- err }()
	primaryDone := make(chan error, 1)
	go func() { primaryDone <- p.Run(pctx) }()
	// The primary's controller warms up on the checkpoints' written pages;
	// the epoch committed after that carries its heat.
	waitFor(t, "the primary's large-page controller to warm up on written pages", func() bool {
		st := lp.Status()
		return st.WarmedUp && st.WriteWindows >= heatWarmup
	})
	warm := bk.Committed()
	waitFor(t, "the backup to commit 5 more epochs", func() bool { return bk.Committed() >= warm+5 })
	pc.Close()
	kill()
	<-primaryDone
	<-machineDone
	run := heatRun{hot: hot, primary: lp.Stop()}
	m.Close()
	if _, err := in.Failover(ctx); err != nil {
		t.Fatalf("Failover() = %v", err)
	}
	b := <-backupDone
	if b.err != nil || b.m == nil {
		t.Fatalf("Backup.Serve() = %v, %v, want a machine", b.m, b.err)
	}
	defer b.m.Close()
	if run.heat, err = mmu.DecodeHeat(bk.ActivatedHeat()); err != nil {
		t.Fatalf("the activated checkpoint's heat: %v", err)
	}

	// The activated guest and its controller.
	stats, err := b.m.VM().StatsFD()
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()
	cfg := heatPager(nil)
	if seed {
		cfg = heatPager(&run.heat)
	}
	blp, err := largepage.Start(b.m, cfg)
	if err != nil {
		t.Fatal(err)
	}
	bctx, stop := context.WithCancel(ctx)
	resumed := make(chan error, 1)
	go func() { _, err := b.m.Run(bctx); resumed <- err }()
	var st largepage.Status
	waitFor(t, "KVM to map a page of the activated guest with 2 MiB", func() bool {
		st = blp.Status() // before pages_2m: the window then is no later
		if st.Err != "" {
			t.Fatalf("the backup's large pages stopped: %s", st.Err)
		}
		p2m, _ := stats.Value("pages_2m")
		return p2m > 0
	})
	run.windows = st.Windows + 1
	waitFor(t, "the first promotion in the status", func() bool { return blp.Status().FirstPromotion != 0 })
	run.status = blp.Stop()
	stop()
	<-resumed
	return run
}

// TestHeatSurvivesFailover: the checkpoints carry the primary's large-page
// heat (the count values it took from the pages each checkpoint found
// written, since dirty logging keeps it from sampling), the backup commits
// it with the epoch, and the activated guest's controller, seeded with it,
// has KVM map the guest's hot regions with 2 MiB within its first window;
// without the heat the same failover waits out the warm-up.
func TestHeatSurvivesFailover(t *testing.T) {
	kvmtest.Require(t)
	with := heatFailover(t, true)
	// The carried heat ranks the hot regions first.
	top := slices.Clone(with.heat.Counts)
	slices.SortFunc(top, func(a, b mmu.RegionHeat) int { return cmp.Compare(b.Count, a.Count) })
	if len(top) < 2 || len(top) > 2 && top[2].Count >= top[1].Count || !containsU64(with.hot, top[0].Region) || !containsU64(with.hot, top[1].Region) || top[1].Count < 1 {
		t.Fatalf("carried heat %+v (primary %s): want the hot regions %v hottest", with.heat, with.primary, with.hot)
	}
	if !with.status.Seeded || with.windows > 2 || with.status.FirstPromotion != 1 {
		t.Errorf("with heat: pages_2m > 0 in window %d, first promotion in window %d (%s); want the first window", with.windows, with.status.FirstPromotion, with.status)
	}
	for _, r := range with.status.Promoted {
		if !containsU64(with.hot, r) {
			t.Errorf("with heat: promoted %v, want only hot regions %v", with.status.Promoted, with.hot)
		}
	}
	without := heatFailover(t, false)
	if without.status.Seeded || without.windows < heatWarmup {
		t.Errorf("without heat: pages_2m > 0 in window %d (%s); want no earlier than the last window of the %d-window warm-up", without.windows, without.status, heatWarmup)
	}
	t.Logf("windows to pages_2m > 0 on the activated backup: with heat %d, without %d; carried heat %d regions, primary %s",
		with.windows, without.windows, len(with.heat.Counts), with.primary)
}

func containsU64(s []uint64, v uint64) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// BenchmarkHeatFailover prints how many sampling windows the activated
// backup's large-page controller needs before KVM maps the guest with 2 MiB,
// seeded with the heat the checkpoints carried and warming up without it,
// over the same failover in the same run.
func BenchmarkHeatFailover(b *testing.B) {
	kvmtest.Require(b)
	var with, without int
	for range b.N {
		with += heatFailover(b, true).windows
		without += heatFailover(b, false).windows
	}
	fmt.Printf("bench heat-failover: windows_to_promote_with_heat=%.1f without=%.1f warmup=%d source=checkpoint_writes\n",
		float64(with)/float64(b.N), float64(without)/float64(b.N), heatWarmup)
}
