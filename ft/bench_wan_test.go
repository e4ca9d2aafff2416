package ft

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/wan"
	"github.com/understudy-vmm/understudy/vmm"
	"golang.org/x/sys/unix"
)

// inNetns runs fn on a thread that has entered network namespace ns, so
// that the sockets fn creates live there, and brings the thread back.
func inNetns(ns string) func(fn func() error) error {
	return func(fn func() error) error {
		runtime.LockOSThread()
		self, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			return err
		}
		defer self.Close()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			runtime.UnlockOSThread()
			return err
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			return fmt.Errorf("setns %s: %w", ns, err)
		}
		ferr := fn()
		if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("setns back: %w", err) // the thread stays locked and dies with the goroutine
		}
		runtime.UnlockOSThread()
		return ferr
	}
}

// wanBackup attaches a backup (in this process, its listener inside the
// link's namespace, reached through the delaying relay and the shaped veth
// pair) to in, and returns it serving.
func wanBackup(b *testing.B, l *wan.Link, in *Intermediary, memSize uint64, cfg BackupConfig) *Backup {
	listen := "tcp://" + netip.AddrPortFrom(l.NSAddr(), 0).String()
	ib, bi := roleLinkVia(b, memSize, wire.RoleIntermediary, wire.RoleBackup, listen, inNetns(l.Namespace()), func(addr string) string {
		ap, err := netip.ParseAddrPort(addr[len("tcp://"):])
		if err != nil {
			b.Fatal(err)
		}
		r, err := l.Relay(ap.String())
		if err != nil {
			b.Fatal(err)
		}
		return "tcp://" + r
	})
	bk, err := NewBackup(memSize, cfg)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(func() { cancel(); bk.Close() })
	go in.ServeBackup(ctx, ib)
	go bk.Serve(bi)
	return bk
}

// wanLink makes a shaped link, or skips the benchmark saying why.
func wanLink(b *testing.B, rate float64, rtt time.Duration) *wan.Link {
	l, err := wan.New(wan.Config{RateMbit: rate, RTT: rtt, Name: "bench"})
	if err != nil {
		b.Skipf("no shaped WAN link here: %v", err)
	}
	b.Cleanup(func() { l.Close() })
	return l
}

// holdBackWorkload is the counter guest of the hold-back benchmark: 64 hot
// pages (256 KiB) rewritten every iteration, 4032 cold pages written one per
// iteration round robin, a few hundred iterations a second (the line shows
// the rate): forwarding every epoch would need about 100 Mbit/s.
var holdBackWorkload = map[string]string{"pages": "4096", "hot": "64", "cold_every": "1", "iterations": "0", "spin": "6000000", "report": "0"}

// BenchmarkHoldBack runs the counter guest with a hot and a cold set under a
// primary and an intermediary on loopback, and a backup behind a shaped WAN
// (100 Mbit/s, 40 ms round trip: tbf on a veth pair into a network
// namespace, and a delaying relay). For each hold-back threshold, for a
// policy the backup installs itself (pull everything at most every 2 s),
// and for backup-driven retrieval (manifests; the backup requests the
// pages that settle for 4 epochs; a sync every second), it measures over
// 6 s of steady state (once the backup has caught up after its re-seed)
// the bytes that crossed the WAN and the bytes forwarding every epoch
// would have sent (everything the intermediary received in the same run),
// and the backup's lag sampled every 25 ms (lag_*_p99: since the
// intermediary applied the epoch the backup last acknowledged). Of the
// syncs queued in those 6 s it shows the largest lag at which one was
// queued (sync_at_lag_s_max: the sync rule's own measure, since the epoch
// of the sync before; at most MaxLag plus an epoch when the rule holds)
// and the longest one took from queued to acknowledged (sync_s_max); the
// sampled lag peaks at about their sum.
func BenchmarkHoldBack(b *testing.B) {
	kvmtest.Require(b)
	l := wanLink(b, 100, 40*time.Millisecond)
	for _, tc := range []struct {
		name   string
		policy ForwardPolicy
		backup BackupConfig
		zstd   bool
	}{
		{"threshold=2", HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: time.Second}, BackupConfig{}, false},
		{"threshold=4", HoldBack{Threshold: 4, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: time.Second}, BackupConfig{}, false},
		{"threshold=16", HoldBack{Threshold: 16, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: time.Second}, BackupConfig{}, false},
		{"backup:pull-every=2s,max-lag-epochs=400", nil, BackupConfig{Policy: "pull-every=2s,max-lag-epochs=400"}, false},
		{"backup:manifest,max-lag=1s+request:settle=4", nil, BackupConfig{Policy: "manifest,max-lag=1s", Request: &RequestPolicy{Settle: 4, MaxFreq: 1.5}}, false},
		{"threshold=2+zstd", HoldBack{Threshold: 2, MaxHeld: 64 << 20, MaxLagEpochs: 200, MaxLag: time.Second}, BackupConfig{}, true},
	} {
		b.Run(tc.name, func(b *testing.B) { holdBackRun(b, l, tc.name, tc.policy, tc.backup, tc.zstd) })
	}
}

func holdBackRun(b *testing.B, l *wan.Link, name string, policy ForwardPolicy, bcfg BackupConfig, zstd bool) {
	const memSize = 64 << 20
	pc, ic := link(b, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		b.Fatal(err)
	}
	if policy != nil {
		in.SetForwardPolicy(policy)
	}
	if zstd {
		in.SetWANCompression(wanzip.DefaultLevel)
	}
	go in.ServePrimary(ic)
	bk := wanBackup(b, l, in, memSize, bcfg)
	var (
		p          *Primary
		iterations atomic.Uint64
	)
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter", Options: holdBackWorkload,
		OnRecord: func(r vmm.Record) { iterations.Store(r.Value); p.Record(r) }}})
	if err != nil {
		b.Fatal(err)
	}
	if p, err = NewPrimary(m, pc, PrimaryConfig{}); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { m.Run(ctx); p.Halted(); close(ran) }()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	// Steady state: the re-seed (all of guest memory, over 5 s on this
	// link) has crossed the WAN, and so has what the intermediary queued
	// behind it while it crossed (staged pages and the syncs of those
	// seconds): the backup has acknowledged the epoch the intermediary
	// was at when the re-seed landed. Until then the backup's lag is the
	// backlog's, not the sync bound's.
	waitBackup := func(what string, cond func() bool) {
		for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatalf("the backup did not %s within a minute", what)
			}
		}
	}
	waitBackup("take the re-seed", func() bool { return in.backupAcked.Load() != 0 })
	seeded := in.img.Epoch()
	waitBackup(fmt.Sprintf("catch up to epoch %d", seeded), func() bool { return in.backupAcked.Load() >= seeded })
	time.Sleep(time.Second)
	// The bytes on the WAN: what was forwarded, with the compressed page
	// bytes counted as they went out.
	onWAN := func() uint64 { return in.forwarded.Load() - in.wanRaw.Load() + in.wanWire.Load() }
	w0, n0, r0, it0 := onWAN(), in.received.Load(), p.Epochs(), iterations.Load()
	var (
		mu    sync.Mutex
		lagsE []float64
		lagsS []float64
	)
	stop := Every(25*time.Millisecond, func() {
		e, s := in.BackupLag()
		mu.Lock()
		lagsE, lagsS = append(lagsE, float64(e)), append(lagsS, s.Seconds())
		mu.Unlock()
	})
	t0 := time.Now()
	time.Sleep(6 * time.Second)
	stop()
	w1, n1, r1, it1, dt := onWAN(), in.received.Load(), p.Epochs(), iterations.Load(), time.Since(t0)
	// The syncs queued in the window: the backup's lag when each was
	// queued (what the policy's bound is checked against), and how long
	// each took to be acknowledged (its bytes, what was queued ahead of
	// it, the round trip, the backup's commit). The sampled lag peaks at
	// about the sum of the two.
	var syncLag, syncTook []float64
	if bl := attachedBackup(in); bl != nil {
		for _, r := range bl.held.syncs.list() {
			if r.queued.Before(t0) || r.queued.After(t0.Add(dt)) {
				continue
			}
			syncLag = append(syncLag, r.lag.Seconds())
			if !r.acked.IsZero() {
				syncTook = append(syncTook, r.acked.Sub(r.queued).Seconds())
			}
		}
	}
	cancel()
	<-ran
	<-done
	m.Close()
	wanMiB, naiveMiB := float64(w1-w0)/(1<<20), float64(n1-n0)/(1<<20)
	mu.Lock()
	defer mu.Unlock()
	fmt.Printf("bench ft-holdback: policy=%s wan_mib=%.1f naive_wan_mib=%.1f savings=%.2f lag_epochs_p99=%.0f lag_s_p99=%.2f"+
		" sync_at_lag_s_max=%.2f sync_s_max=%.2f window_syncs=%d"+
		" epochs=%d seconds=%.1f iterations_s=%.0f rate_mbit=100 rtt_ms=40 syncs=%d reseeds=%d manifests=%d requested=%d served=%d policy_state=%q\n",
		name, wanMiB, naiveMiB, 1-wanMiB/naiveMiB, p99(lagsE), p99(lagsS), maxOf(syncLag), maxOf(syncTook), len(syncLag),
		r1-r0, dt.Seconds(), float64(it1-it0)/dt.Seconds(), in.syncs.Load(), in.reseeds.Load(),
		in.manifests.Load(), in.pagesRequested.Load(), in.pagesServed.Load(), bk.PolicyState())
}

// BenchmarkOutputWAN measures output-commit latency with the backup behind
// a WAN of 10 ms and of 80 ms round trip: acknowledgements come from the
// intermediary, so the WAN must not show in them.
func BenchmarkOutputWAN(b *testing.B) {
	kvmtest.Require(b)
	for _, rtt := range []time.Duration{10 * time.Millisecond, 80 * time.Millisecond} {
		l := wanLink(b, 100, rtt)
		lat := outputLatency(b, func(in *Intermediary, memSize uint64) { wanBackup(b, l, in, memSize, BackupConfig{}) })
		fmt.Printf("bench ft-output: wan_rtt_ms=%d added_latency_ms_p50=%.2f p99=%.2f records=%d interval=25ms\n",
			rtt.Milliseconds(), msf(pct(lat, 50)), msf(pct(lat, 99)), len(lat))
		l.Close()
	}
}

// maxOf is the largest of v (0 if none).
func maxOf(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return slices.Max(v)
}

func p99(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[(len(s)-1)*99/100]
}
