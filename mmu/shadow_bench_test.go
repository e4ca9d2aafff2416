package mmu

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

var shadowWalkOnce, exitDetectOnce sync.Once

// BenchmarkShadowWalk compares one sampling window's work: walking the
// whole page-table tree from CR3 (WalkPageTables) against updating the
// shadow set from the dirty bitmap, for an address space of 40 page tables
// (4,000 mapped 4 KiB pages) in which 3 tables changed during the window
// (8 A bits set or cleared and one page mapped in each).
func BenchmarkShadowWalk(b *testing.B) {
	shadowWalkOnce.Do(func() {
		g := newSGGuest(b, 64<<20)
		cr3 := g.newSpace()
		for k := 0; k < 40; k++ {
			va := uint64(0x10000000) + uint64(k)*arch.LargePageSize
			if k >= 20 {
				va = mmapVA + uint64(k-20)*arch.LargePageSize
			}
			g.mapPages(cr3, va, 50+(k*37)%101, true)
		}
		s := NewShadowSet(ShadowConfig{Detect: ExitDetectBoth})
		if err := s.Track(g.m, cr3); err != nil {
			b.Fatal(err)
		}
		all := NewShadowSet(ShadowConfig{Detect: ExitDetectBoth}) // diffs every traced page
		if err := all.Track(g.m, cr3); err != nil {
			b.Fatal(err)
		}
		g.takeDirty()
		const windows = 300
		var walk, update, updateAll time.Duration
		leaves, transitions := 0, 0
		for w := 0; w < windows; w++ {
			for _, k := range []int{w % 40, (w + 13) % 40, (w + 29) % 40} {
				va := uint64(0x10000000) + uint64(k)*arch.LargePageSize
				if k >= 20 {
					va = mmapVA + uint64(k-20)*arch.LargePageSize
				}
				for i := 0; i < 8; i++ {
					ea := g.entry(cr3, va+uint64(i)*PageSize, 1)
					g.put(ea, g.get(ea)^pteA)
				}
				ea := g.entry(cr3, va+uint64(200+w%50)*PageSize, 1)
				g.put(ea, g.get(ea)^(g.frame|present|write))
			}
			d := g.takeDirty()
			t0 := time.Now()
			st, err := g.m.WalkPageTables(cr3, 0, nil)
			t1 := time.Now()
			ts := s.Update(g.m, d)
			t2 := time.Now()
			tsAll := all.Update(g.m, nil)
			t3 := time.Now()
			if err != nil || len(tsAll) != len(ts) {
				b.Fatalf("window %d: walk error %v; %d transitions from the dirty pages, %d from all", w, err, len(ts), len(tsAll))
			}
			walk += t1.Sub(t0)
			update += t2.Sub(t1)
			updateAll += t3.Sub(t2)
			leaves += st.Leaves
			transitions += len(ts)
		}
		a := float64(walk.Microseconds()) / windows
		u := float64(update.Microseconds()) / windows
		ua := float64(updateAll.Microseconds()) / windows
		fmt.Printf("bench shadow-walk: full_walk_us=%.1f shadow_update_us=%.1f ratio=%.3f shadow_update_without_dirty_log_us=%.1f ratio_without_dirty_log=%.3f tables=%d leaves=%d dirty_tables=3 transitions_per_window=%.1f windows=%d\n",
			a, u, u/a, ua, ua/a, s.Stats().Pages, leaves/windows, float64(transitions)/windows, windows)
	})
}

// exitWorkload runs a synthetic process storm on g (with one ShadowSet per
// mode attached): a long-lived shell forks 20 children; each child execs (the
// forked mm is torn down, a new one built) and exits; a long-lived worker
// does a big munmap and a MADV_DONTNEED in the middle. It returns the
// exiting address spaces, the live ones, and where each teardown began in
// every mode's log.
func exitWorkload(g *sgGuest) (exits, live []uint64, start map[uint64][]int) {
	start = map[uint64][]int{}
	mark := func(cr3 uint64) {
		for i := range g.log {
			start[cr3] = append(start[cr3], len(g.log[i]))
		}
		exits = append(exits, cr3)
	}
	shell := g.process()
	worker := g.process()
	g.mapPages(worker, bigVA, 3*512, true)
	g.mapPages(worker, libVA, 10, true)
	live = []uint64{shell, worker}
	for n := 0; n < 20; n++ {
		child := g.fork(shell)
		st := g.entry(child, stackVA, 1)
		g.put(st, g.get(st)|pteA)
		nw := g.newSpace() // execve
		g.mapPages(nw, stackVA, 2, true)
		mark(child)
		g.exit(child)
		g.mapPages(nw, textVA, 8, true)
		g.mapPages(nw, heapVA, 4+n, true)
		mark(nw)
		g.exit(nw)
		if n == 10 {
			g.zap(worker, bigVA, bigVA+2*arch.LargePageSize)
			g.freeTables(worker, bigVA, bigVA+2*arch.LargePageSize)
			g.zap(worker, bigVA+2*arch.LargePageSize, bigVA+3*arch.LargePageSize) // MADV_DONTNEED
			g.mapPages(worker, bigVA+2*arch.LargePageSize, 4, true)
			g.mapPages(worker, libVA+10*PageSize, 1, true)
		}
	}
	g.update()
	return exits, live, start
}

// BenchmarkExitDetect prints, per mode, what each exit detector makes of
// the synthetic storm, Updating after every guest write (the unit tier's
// model) and after every 64, diffing by GPA or leaves first.
func BenchmarkExitDetect(b *testing.B) {
	exitDetectOnce.Do(func() {
		for _, run := range []struct {
			batch       int
			leavesFirst bool
		}{{1, false}, {64, false}, {64, true}} {
			batch := run.batch
			g := newSGGuest(b, 64<<20)
			g.batch = batch
			g.attach()
			for i, d := range allModes {
				g.sets[i] = NewShadowSet(ShadowConfig{Detect: d, LeavesFirst: run.leavesFirst})
			}
			exits, live, start := exitWorkload(g)
			none := len(g.log[0])
			for i, d := range allModes {
				detected, fp := 0, 0
				var lat []int
				for _, cr3 := range exits {
					n := 0
					for _, t := range g.log[i][start[cr3][i]:] {
						if t.Space != cr3 {
							continue
						}
						n++
						if t.Exit {
							detected++
							lat = append(lat, n)
							break
						}
					}
				}
				for _, cr3 := range live {
					for _, t := range only(g.log[i], cr3) {
						if t.Dropped {
							fp++
							break
						}
					}
				}
				p50 := 0
				if len(lat) > 0 {
					slices.Sort(lat)
					p50 = lat[len(lat)/2]
				}
				st := g.sets[i].Stats()
				fmt.Printf("bench exit-detect: mode=%s writes_per_update=%d leaves_first=%v exits=%d detected=%d false_positives=%d latency_transitions_p50=%d trace_events_saved_pct=%.1f shadow_kib_freed=%d transitions=%d dropped=%d diffs=%d diffs_avoided=%d\n",
					d, batch, run.leavesFirst, len(exits), detected, fp, p50, 100*(1-float64(len(g.log[i]))/float64(none)), st.FreedBytes/1024,
					len(g.log[i]), st.Dropped, st.Diffs, st.DiffsAvoided)
			}
		}
	})
}
