package ft

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// BenchmarkLinuxOutputCommit measures what output commit adds to a Linux
// guest's frames: a protected machine (primary, intermediary and backup on
// loopback mTLS, epochs of 10 ms) transmits one frame at a time, and the
// time from the guest's notification to the frame's arrival on the tap is
// compared with the same machine's NIC unprotected, in the same run. The
// device's own histogram (taken to written) gives the added latency.
//
//	bench linux-output-commit: interval_ms=I frames=N added_ms_p50=A added_ms_p99=B
//	    wire_ms_p50_protected=P wire_ms_p50_unprotected=U added_p50_per_interval=A/I
func BenchmarkLinuxOutputCommit(b *testing.B) {
	kvmtest.Require(b)
	const (
		frames   = 60
		interval = 10 * time.Millisecond
	)
	tb := b
	tap := makeLxTap(tb)
	rd := newLxTap(tb, tap)
	mac := net.HardwareAddr{0x02, 0, 0, 0x13, 0x13, 0x09}

	// Unprotected: the same NIC, frames written at once.
	m0, err := vmm.New(vmm.Config{MemSize: lxMem, Linux: &vmm.LinuxConfig{
		Kernel: lxKernel(tb, linuxtest.CodeSpin), Nets: []vmm.NetConfig{{Tap: tap, MAC: mac}}}})
	if err != nil {
		b.Fatal(err)
	}
	nic0 := lxDriver(tb, m0)
	nic0.Setup(2)
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	ran0 := make(chan struct{})
	go func() { m0.Run(ctx); close(ran0) }()
	unprotected := sendFramesTimed(tb, nic0, rd, mac, frames)
	m0.Stop(0)
	<-ran0
	m0.Close()

	// Protected.
	c := newCluster(tb)
	blog, btl := newTestLog()
	go RunBackup(ctx, BackupRunConfig{Listen: "tcp://127.0.0.1:0", Links: c.links("backup", RoleBackup, blog), Log: blog})
	backupAddr := btl.waitFor(tb, `listening on (tcp://\S+)`)[1]
	ilog, itl := newTestLog()
	go RunIntermediary(ctx, IntermediaryRunConfig{Listen: "tcp://127.0.0.1:0", Backup: backupAddr,
		Links: c.links("intermediary", RoleIntermediary, ilog), Log: ilog})
	interAddr := itl.waitFor(tb, `listening on (tcp://\S+)`)[1]
	p, err := newPrimary(nil, PrimaryConfig{Interval: interval})
	if err != nil {
		b.Fatal(err)
	}
	p.lx = &linuxOutput{}
	m, err := vmm.New(vmm.Config{MemSize: lxMem, Linux: &vmm.LinuxConfig{
		Kernel: lxKernel(tb, linuxtest.CodeSpin), Nets: []vmm.NetConfig{{Tap: tap, MAC: mac}}}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if err := m.HoldNetOutput(virtio.EgressBounds{}); err != nil {
		b.Fatal(err)
	}
	if err := p.attach(m); err != nil {
		b.Fatal(err)
	}
	nic := lxDriver(tb, m)
	nic.Setup(2)
	links := c.links("primary", RolePrimary, nil)
	dial := func(ctx context.Context) (MessageConn, error) {
		return transport.Dial(ctx, interAddr, links.transport(wire.RolePrimary, lxMem))
	}
	ran := make(chan struct{})
	go func() { m.Run(ctx); p.Halted(); close(ran) }()
	go p.Protect(ctx, dial, nil)
	for deadline := time.Now().Add(30 * time.Second); p.Acked() < 3; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("no acknowledgement")
		}
	}
	protected := sendFramesTimed(tb, nic, rd, mac, frames)
	s := m.NetOutputStats()
	cancel()
	<-ran
	added50, added99 := s.Latency.Quantile(0.5), s.Latency.Quantile(0.99)
	fmt.Printf("bench linux-output-commit: interval_ms=%.0f frames=%d added_ms_p50=%.2f added_ms_p99=%.2f wire_ms_p50_protected=%.2f wire_ms_p50_unprotected=%.3f added_p50_per_interval=%.2f\n",
		msf(interval), frames, msf(added50), msf(added99), msf(pct(protected, 50)), msf(pct(unprotected, 50)), float64(added50)/float64(interval))
}

// sendTimed transmits n frames one at a time and returns, for each, the
// time from the notification to its arrival on the tap.
func sendFramesTimed(tb testing.TB, nic *linuxtest.Driver, rd *lxTap, mac net.HardwareAddr, n int) []time.Duration {
	var d []time.Duration
	for i := range n {
		f := lxFrame(mac, fmt.Sprintf("timed frame %d", i))
		nic.TxAvail(i, f)
		start := time.Now()
		nic.Notify(1)
		got := rd.next(lxEthType, 10*time.Second)
		if string(got) != string(f) {
			tb.Fatalf("frame %d on the tap: %q, want %q", i, got, f)
		}
		d = append(d, time.Since(start))
		time.Sleep(time.Duration(i%7) * time.Millisecond) // spread over the epoch
	}
	return d
}
