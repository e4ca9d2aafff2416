package ft

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// BenchmarkDiskCheckpoint measures what disk replication adds to a
// checkpoint: the time from a checkpoint's pause to the intermediary's
// acknowledgement (real mTLS, a backup attached that stages and commits
// on a diskrep replica), with diskMiB of disk written in the epoch,
// against epochs whose guest writes the same bytes to memory only (same
// dirty pages, no disk write), alternating, in one run. It runs with a
// backup attached (in this process, on the same disk: its journal's
// syncs compete with the primary's and the intermediary's writes) and
// without one.
func BenchmarkDiskCheckpoint(b *testing.B) {
	kvmtest.Require(b)
	benchDiskCheckpoint(b, true)
	benchDiskCheckpoint(b, false)
}

func benchDiskCheckpoint(b *testing.B, withBackup bool) {
	const (
		memSize  = 64 << 20
		diskSize = 32 << 20
		diskMiB  = 4
		epochs   = 15
		bufGPA   = 0x2800000
	)
	g := newDiskGuest(b, memSize, diskSize)
	pc, ic := link(b, memSize)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		b.Fatal(err)
	}
	in.SetDiskDir(b.TempDir())
	go in.ServePrimary(ic)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ib, bi := roleLink(b, memSize, wire.RoleIntermediary, wire.RoleBackup)
	bk, err := NewBackup(memSize, BackupConfig{Disks: []string{filepath.Join(b.TempDir(), "replica.img")}})
	if err != nil {
		b.Fatal(err)
	}
	defer bk.Close()
	if withBackup {
		go in.ServeBackup(ctx, ib)
		go bk.Serve(bi)
	}

	p, err := NewPrimary(g.m, nil, PrimaryConfig{DiskSeedDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	go g.m.Run(ctx)
	send := func(full bool) (time.Duration, time.Duration) {
		t0 := time.Now()
		cp, err := p.checkpoint(full)
		if err != nil {
			b.Fatal(err)
		}
		base := cp.Epoch - 1
		if full {
			base = 0
		}
		err = SendCheckpoint(pc, cp, base)
		p.diskSent(cp, err)
		if err != nil {
			b.Fatal(err)
		}
		for {
			m, err := pc.ReadMessage()
			if err != nil {
				b.Fatal(err)
			}
			if a, ok := m.(*wire.Ack); ok && a.Epoch == cp.Epoch {
				break
			}
		}
		return time.Since(t0), cp.Stun
	}
	send(true)
	data := make([]byte, diskMiB<<20)
	var with, without, stunWith, stunWithout []time.Duration
	for i := range 2 * epochs {
		for j := range data {
			data[j] = byte(i + j>>12)
		}
		g.blk.Write(bufGPA, data)
		disk := i%2 == 0
		if disk {
			off := uint64(i*diskMiB<<20) % (diskSize - diskMiB<<20)
			g.blk.BlockRequest(0, g.avail, virtio.BlockTOut, off/512, bufGPA, uint32(len(data)), dkStatus)
			g.avail++
			g.blk.Publish(g.avail)
		}
		d, stun := send(false)
		if disk {
			if g.blk.UsedIdx(0) != g.avail {
				b.Fatal("the write did not complete at the checkpoint's pause")
			}
			with, stunWith = append(with, d), append(stunWith, stun)
		} else {
			without, stunWithout = append(without, d), append(stunWithout, stun)
		}
	}
	backup := "none"
	if withBackup {
		backup = "attached"
		waitFor(b, "the backup to catch up", func() bool { return bk.Committed() >= p.c.Epoch() })
		if d := bk.DiskEpochs(); len(d) != 1 || d[0] != bk.Committed() {
			b.Fatalf("backup disks at %v, memory at %d", d, bk.Committed())
		}
	}
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2].Microseconds()) / 1000
	}
	a, z := med(with), med(without)
	fmt.Printf("bench ft-disk: backup=%s disk_mib_per_epoch=%d ckpt_ms_p50_disk=%.2f ckpt_ms_p50_nodisk=%.2f ratio=%.2f stun_ms_p50_disk=%.2f stun_ms_p50_nodisk=%.2f epochs=%d (pause to the intermediary's ack)\n",
		backup, diskMiB, a, z, a/z, med(stunWith), med(stunWithout), epochs)
}
