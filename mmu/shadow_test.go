package mmu

import (
	"fmt"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
)

// A small Linux-like process layout. The first text page is mapped but not
// accessed, so the accessed minimum VA is the second one.
const (
	textVA  = 0x400000       // 16 pages: PML4 0, PUD 0, PMD 2
	heapVA  = 0x600000       // 40 pages: PMD 3
	mmapVA  = 0x7f0000000000 // 100 pages: PML4 254, PUD 0, PMD 0
	bigVA   = 0x7f0000200000 // big anonymous mappings: PMD 1..
	libVA   = 0x7f0000800000 // a library after them: PMD 4
	stackVA = 0x7ffffffde000 // 8 pages: PML4 255, PUD 511, PMD 511, PT 478..485
)

func (g *sgGuest) process() uint64 {
	cr3 := g.newSpace()
	g.mapPages(cr3, textVA, 1, false)
	g.mapPages(cr3, textVA+PageSize, 15, true)
	g.mapPages(cr3, heapVA, 40, true)
	g.mapPages(cr3, mmapVA, 100, true)
	g.mapPages(cr3, stackVA, 8, true)
	return cr3
}

// names returns the tables of a process() space, with suffix.
func (g *sgGuest) names(n sgNames, cr3 uint64, suffix string) sgNames {
	n.add(cr3, "PML4"+suffix)
	n.add(g.table(cr3, textVA, 3), "PUDa"+suffix)
	n.add(g.table(cr3, textVA, 2), "PMDa"+suffix)
	n.add(g.table(cr3, textVA, 1), "PT1"+suffix)
	n.add(g.table(cr3, heapVA, 1), "PT2"+suffix)
	n.add(g.table(cr3, mmapVA, 3), "PUDb"+suffix)
	n.add(g.table(cr3, mmapVA, 2), "PMDb"+suffix)
	n.add(g.table(cr3, mmapVA, 1), "PT3"+suffix)
	n.add(g.table(cr3, stackVA, 3), "PUDc"+suffix)
	n.add(g.table(cr3, stackVA, 2), "PMDc"+suffix)
	n.add(g.table(cr3, stackVA, 1), "PT4"+suffix)
	n.add(g.table(cr3, bigVA, 1), "PTb1"+suffix)
	n.add(g.table(cr3, bigVA+arch.LargePageSize, 1), "PTb2"+suffix)
	n.add(g.table(cr3, bigVA+2*arch.LargePageSize, 1), "PTb3"+suffix)
	n.add(g.table(cr3, libVA, 1), "PTlib"+suffix)
	return n
}

func (g *sgGuest) resetLogs() {
	for i := range g.log {
		g.log[i] = nil
	}
}

// checkModes compares each mode's rendered transitions of cr3 with want.
func (g *sgGuest) checkModes(t *testing.T, names sgNames, cr3 uint64, want map[ExitDetect]string) {
	t.Helper()
	for i, d := range allModes {
		got := names.render(only(g.log[i], cr3))
		if got != want[d] {
			t.Errorf("exit-detect=%s: transitions of %#x differ: %s", d, cr3, diffLines(got, want[d]))
		}
		checkShadows(t, g.sets[i], g.m)
	}
}

// diffLines shows the first differing line of two renderings.
func diffLines(got, want string) string {
	gl, wl := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(gl) || i < len(wl); i++ {
		var a, b string
		if i < len(gl) {
			a = gl[i]
		}
		if i < len(wl) {
			b = wl[i]
		}
		if a != b {
			return fmt.Sprintf("line %d: got %q, want %q", i+1, a, b)
		}
	}
	return "(equal)"
}

func (e *sgExpect) S() string { return e.String() }

// exitMinVA is what embodiment 1 sees of a process() exit whose accessed
// minimum VA is PT1[1] (suffix names the space).
func exitMinVA(s string) string {
	e := new(sgExpect).one("PT1"+s, 0, "u", "").one("PT1"+s, 1, "u", " exit drop")
	e.one("PT2"+s, 0, "u", " drop").one("PT3"+s, 0, "u", " drop").one("PT4"+s, 478, "u", " drop")
	e.one("PMDa"+s, 2, "u", " drop").one("PUDa"+s, 0, "u", " drop").one("PML4"+s, 0, "u", " drop")
	return e.S()
}

// exitAll is every transition of a process() exit.
func exitAll(s string, suffix func(table string, i int) string) string {
	e := new(sgExpect)
	add := func(name string, from, to int) {
		for i := from; i <= to; i++ {
			e.one(name+s, i, "u", suffix(name, i))
		}
	}
	add("PT1", 0, 15)
	add("PT2", 0, 39)
	add("PT3", 0, 99)
	add("PT4", 478, 485)
	add("PMDa", 2, 3)
	add("PUDa", 0, 0)
	add("PML4", 0, 0)
	add("PMDb", 0, 0)
	add("PUDb", 0, 0)
	add("PML4", 254, 254)
	add("PMDc", 511, 511)
	add("PUDc", 511, 511)
	add("PML4", 255, 255)
	return e.S()
}

// exitConsecutive is what embodiment 2 sees of a process() exit: PT1 runs
// 16, PT2 reaches 4, so PT2's fifth clear drops PT2; the first clears of PT3
// and PT4 drop them; PMDa's first clear drops PMDa, whose subtables (PT1,
// PT2) go with their counts, which disarms the detector: the PUD and PML4
// clears are followed and the root stays traced.
func exitConsecutive(s string) string {
	e := new(sgExpect).run("PT1"+s, 0, 15, "u", "").run("PT2"+s, 0, 3, "u", "").one("PT2"+s, 4, "u", " exit drop")
	e.one("PT3"+s, 0, "u", " drop").one("PT4"+s, 478, "u", " drop").one("PMDa"+s, 2, "u", " drop")
	e.one("PUDa"+s, 0, "u", "").one("PML4"+s, 0, "u", "").one("PMDb"+s, 0, "u", "").one("PUDb"+s, 0, "u", "")
	e.one("PML4"+s, 254, "u", "").one("PMDc"+s, 511, "u", "").one("PUDc"+s, 511, "u", "").one("PML4"+s, 255, "u", "")
	return e.S()
}

func TestShadowProcessExit(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	cr3 := g.process()
	names := g.names(sgNames{}, cr3, "")
	for i, s := range g.sets {
		info, ok := s.Space(cr3)
		// root, PUDa, PMDa, PT1, PT2, PUDb, PMDb, PT3, PUDc, PMDc, PT4, kernel PDPT and PD
		if !ok || info.Pages != 13 || !info.MinVAValid || info.MinVA != textVA+PageSize {
			t.Fatalf("exit-detect=%s: Space(%#x) = %+v, %v; want 13 pages, MinVA %#x", allModes[i], cr3, info, ok, textVA+PageSize)
		}
	}
	g.resetLogs()
	g.exit(cr3)
	g.checkModes(t, names, cr3, map[ExitDetect]string{
		ExitDetectNone:        exitAll("", func(string, int) string { return "" }),
		ExitDetectMinVA:       exitMinVA(""),
		ExitDetectConsecutive: exitConsecutive(""),
		ExitDetectBoth:        exitMinVA(""),
	})
	// What is left: none follows the teardown to its end and keeps the
	// root and the kernel half; min-va dropped the root with the rest;
	// consecutive keeps the root and the kernel half.
	wantLeft := map[ExitDetect]int{ExitDetectNone: 3, ExitDetectMinVA: 0, ExitDetectConsecutive: 3, ExitDetectBoth: 0}
	for i, s := range g.sets {
		d := allModes[i]
		info, _ := s.Space(cr3)
		st := s.Stats()
		if info.Pages != wantLeft[d] || st.Pages != wantLeft[d] {
			t.Errorf("exit-detect=%s: %d shadow pages left (set %d), want %d", d, info.Pages, st.Pages, wantLeft[d])
		}
		if wantExits := uint64(min(1, int(d))); st.ExitsDetected != wantExits {
			t.Errorf("exit-detect=%s: ExitsDetected = %d, want %d", d, st.ExitsDetected, wantExits)
		}
		if d != ExitDetectNone && (st.FreedBytes == 0 || st.DiffsAvoided == 0) {
			t.Errorf("exit-detect=%s: FreedBytes = %d, DiffsAvoided = %d; want both > 0", d, st.FreedBytes, st.DiffsAvoided)
		}
		if st.Malformed() != 0 {
			t.Errorf("exit-detect=%s: malformed entries counted in a well-formed guest: %+v", d, st)
		}
	}
}

func TestShadowExec(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	old := g.process()
	names := g.names(sgNames{}, old, "")
	g.resetLogs()
	// execve: bprm_mm_init builds the new mm and copy_strings fills its
	// stack; exec_mmap switches to it and mmput tears the old one down;
	// then the loader maps the binary and the process runs.
	nw := g.newSpace()
	g.mapPages(nw, stackVA, 2, true)
	g.exit(old)
	g.mapPages(nw, textVA, 8, true)
	g.mapPages(nw, heapVA, 4, true)
	g.checkModes(t, names, old, map[ExitDetect]string{
		ExitDetectNone:        exitAll("", func(string, int) string { return "" }),
		ExitDetectMinVA:       exitMinVA(""),
		ExitDetectConsecutive: exitConsecutive(""),
		ExitDetectBoth:        exitMinVA(""),
	})
	for i, s := range g.sets {
		ts := only(g.log[i], nw)
		// PML4, PUD, PMD and 2 PTEs (stack); PML4, PUD, PMD and 8 PTEs
		// (text); PMD and 4 PTEs (heap).
		if len(ts) != 5+11+5 {
			t.Errorf("exit-detect=%s: %d transitions in the new mm, want 21", allModes[i], len(ts))
		}
		for _, tr := range ts {
			if tr.Kind != Mapped || tr.Exit || tr.Dropped {
				t.Errorf("exit-detect=%s: new mm transition %+v, want mapped, kept", allModes[i], tr)
			}
		}
		if info, ok := s.Space(nw); !ok || info.Exiting || info.Pages != 10 {
			t.Errorf("exit-detect=%s: new mm Space = %+v, %v; want tracked, 10 pages, not exiting", allModes[i], info, ok)
		}
	}
}

// TestShadowMunmap: a live process unmaps three page tables' worth of
// anonymous memory (zap, then free_pgtables of the three PTs; the PMD stays
// for the mappings around), then faults a library page and a heap page in.
// Embodiment 1 does not take it for an exit. Embodiment 2 does: after PTb1's
// 512 clears and PTb2's fourth, it drops PTb2, PTb3 and then the live PMD
// (with PT3 and PTlib under it), so the later library fault is missed.
func TestShadowMunmap(t *testing.T) {
	g := newSGGuest(t, 16<<20)
	g.attach()
	cr3 := g.process()
	g.mapPages(cr3, bigVA, 3*512, true)
	g.mapPages(cr3, libVA, 10, true)
	names := g.names(sgNames{}, cr3, "")
	g.resetLogs()
	g.zap(cr3, bigVA, bigVA+3*arch.LargePageSize)
	g.freeTables(cr3, bigVA, bigVA+3*arch.LargePageSize)
	g.mapPages(cr3, libVA+10*PageSize, 1, true)
	g.mapPages(cr3, heapVA+40*PageSize, 1, true)

	all := new(sgExpect).run("PTb1", 0, 511, "u", "").run("PTb2", 0, 511, "u", "").run("PTb3", 0, 511, "u", "")
	all.run("PMDb", 1, 3, "u", "").one("PTlib", 10, "m", "").one("PT2", 40, "m", "")
	cons := new(sgExpect).run("PTb1", 0, 511, "u", "").run("PTb2", 0, 3, "u", "").one("PTb2", 4, "u", " exit drop")
	cons.one("PTb3", 0, "u", " drop").one("PMDb", 1, "u", " drop").one("PT2", 40, "m", "")
	g.checkModes(t, names, cr3, map[ExitDetect]string{
		ExitDetectNone:        all.S(),
		ExitDetectMinVA:       all.S(),
		ExitDetectConsecutive: cons.S(),
		ExitDetectBoth:        cons.S(),
	})
	for i, s := range g.sets {
		d := allModes[i]
		info, _ := s.Space(cr3)
		if want := d.consecutive(); info.Exiting != want {
			t.Errorf("exit-detect=%s: live process Exiting = %v, want %v", d, info.Exiting, want)
		}
		missed := countKind(only(g.log[0], cr3), Mapped) - countKind(only(g.log[i], cr3), Mapped)
		untraced := len(g.sets[0].Tables(cr3)) - len(s.Tables(cr3))
		want := 0
		if d.consecutive() {
			want = 3 // PMDb and, under it, PT3 and PTlib
		}
		if untraced != want || missed != min(want, 1) {
			t.Errorf("exit-detect=%s: live tables untraced %d, faults missed %d; want %d, %d", d, untraced, missed, want, min(want, 1))
		}
		t.Logf("exit-detect=%s: munmap of 3 PTs: transitions seen %d (none: %d), traces dropped %d, live tables untraced %d, later faults missed %d",
			d, len(only(g.log[i], cr3)), len(only(g.log[0], cr3)), s.Stats().Dropped, untraced, missed)
	}
}

// TestShadowMunmapMinVA: unmapping the range that holds the accessed
// minimum VA is, by embodiment 1's rule, an exit (a false positive in a
// live process): the present→not-present transitions after it drop their
// tables, while not-present→present ones are still followed.
func TestShadowMunmapMinVA(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	cr3 := g.process()
	names := g.names(sgNames{}, cr3, "")
	g.resetLogs()
	g.zap(cr3, textVA, textVA+16*PageSize)
	g.mapPages(cr3, heapVA+40*PageSize, 1, true)
	g.zap(cr3, heapVA, heapVA+PageSize)
	g.mapPages(cr3, heapVA+41*PageSize, 1, true)
	minva := new(sgExpect).one("PT1", 0, "u", "").one("PT1", 1, "u", " exit drop").one("PT2", 40, "m", "").one("PT2", 0, "u", " drop")
	all := new(sgExpect).run("PT1", 0, 15, "u", "").one("PT2", 40, "m", "").one("PT2", 0, "u", "").one("PT2", 41, "m", "")
	// Embodiment 2 counts 16 in PT1, then PT2's new mapping resets nothing
	// that matters: one table at 4 is not enough.
	g.checkModes(t, names, cr3, map[ExitDetect]string{
		ExitDetectNone:        all.S(),
		ExitDetectMinVA:       minva.S(),
		ExitDetectConsecutive: all.S(),
		ExitDetectBoth:        minva.S(),
	})
}

// TestShadowDontneed: MADV_DONTNEED of 512 pages across two page tables (a
// zap without freeing tables), then two refaults. Embodiment 1: nothing.
// Embodiment 2 drops PTb2 at its fifth clear; its refault is missed, and
// PTb1's refault resets PTb1's run.
func TestShadowDontneed(t *testing.T) {
	g := newSGGuest(t, 16<<20)
	g.attach()
	cr3 := g.process()
	g.mapPages(cr3, bigVA, 1024, true)
	names := g.names(sgNames{}, cr3, "")
	g.resetLogs()
	lo := uint64(bigVA + 256*PageSize)
	g.zap(cr3, lo, lo+512*PageSize)
	g.mapPages(cr3, bigVA+300*PageSize, 1, true)
	g.mapPages(cr3, bigVA+(512+10)*PageSize, 1, true)
	all := new(sgExpect).run("PTb1", 256, 511, "u", "").run("PTb2", 0, 255, "u", "").one("PTb1", 300, "m", "").one("PTb2", 10, "m", "")
	cons := new(sgExpect).run("PTb1", 256, 511, "u", "").run("PTb2", 0, 3, "u", "").one("PTb2", 4, "u", " exit drop").one("PTb1", 300, "m", "")
	g.checkModes(t, names, cr3, map[ExitDetect]string{
		ExitDetectNone:        all.S(),
		ExitDetectMinVA:       all.S(),
		ExitDetectConsecutive: cons.S(),
		ExitDetectBoth:        cons.S(),
	})
	s := g.sets[2]
	if sp := s.spaces[cr3]; sp.atRun != 1 || sp.consec[names.gpa("PTb1")] != 0 {
		t.Errorf("after the refault: atRun = %d, PTb1 run = %d; want 1 (PTb2, dropped), 0 (reset)", sp.atRun, sp.consec[names.gpa("PTb1")])
	}
}

func (n sgNames) gpa(name string) uint64 {
	for g, s := range n {
		if s == name {
			return g
		}
	}
	return 0
}

// TestShadowForkExit: fork write-protects the parent's PTEs (flag
// transitions) and builds the child's tables (copies without the A bit);
// the child breaks COW on a heap page, touches its stack, and exits. The
// parent stays tracked and untouched by every detector.
func TestShadowForkExit(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	parent := g.process()
	before := g.sets[0].Tables(parent)
	names := g.names(sgNames{}, parent, "")
	g.resetLogs()
	child := g.newSpace()
	g.forkTable(parent, child, 4, 0)
	g.names(names, child, "c")
	g.put(g.entry(child, heapVA, 1), g.frame|present|write|arch.PTEUser|pteA) // COW break
	g.frame += PageSize
	st := g.entry(child, stackVA, 1)
	g.put(st, g.get(st)|pteA)
	g.resetLogs()
	g.exit(child)
	// The child's accessed minimum VA is the COW-broken heap page.
	minva := new(sgExpect).run("PT1c", 0, 15, "u", "").one("PT2c", 0, "u", " exit drop")
	minva.one("PT3c", 0, "u", " drop").one("PT4c", 478, "u", " drop").one("PMDac", 2, "u", " drop")
	minva.one("PUDac", 0, "u", " drop").one("PML4c", 0, "u", " drop")
	g.checkModes(t, names, child, map[ExitDetect]string{
		ExitDetectNone:        exitAll("c", func(string, int) string { return "" }),
		ExitDetectMinVA:       minva.S(),
		ExitDetectConsecutive: exitConsecutive("c"),
		ExitDetectBoth:        minva.S(),
	})
	for i, s := range g.sets {
		if ts := only(g.log[i], parent); len(ts) != 0 {
			t.Errorf("exit-detect=%s: %d parent transitions during the child's exit, want 0", allModes[i], len(ts))
		}
		after := s.Tables(parent)
		if len(after) != len(before) {
			t.Errorf("exit-detect=%s: parent has %d shadow tables after the child's exit, want %d", allModes[i], len(after), len(before))
		}
		if info, ok := s.Space(parent); !ok || info.Exiting || info.Dropped != 0 {
			t.Errorf("exit-detect=%s: parent Space = %+v, %v; want tracked, not exiting", allModes[i], info, ok)
		}
	}
}

func countKind(ts []Transition, k TransitionKind) int {
	n := 0
	for _, t := range ts {
		if t.Kind == k {
			n++
		}
	}
	return n
}

func TestShadowForkParentWriteProtect(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	parent := g.process()
	g.resetLogs()
	g.fork(parent)
	for i := range g.sets {
		ts := only(g.log[i], parent)
		if len(ts) != 164 {
			t.Errorf("exit-detect=%s: %d parent transitions during fork, want 164 (one write-protect per PTE)", allModes[i], len(ts))
		}
		for _, tr := range ts {
			if tr.Kind != FlagsChanged || tr.Dropped {
				t.Errorf("exit-detect=%s: parent transition %+v during fork, want flags, kept", allModes[i], tr)
				break
			}
		}
	}
}

func TestShadowMalformed(t *testing.T) {
	g := newSGGuest(t, 4<<20)
	root, x, y, z := g.alloc(), g.alloc(), g.alloc(), g.alloc()
	const rw = present | write
	for gpa, v := range map[uint64]uint64{
		root: x | rw, root + 8: root | rw, root + 16: x | rw | large, root + 24: 1<<40 | rw, root + 32: x | rw,
		x: y | rw, x + 8: 1<<30 | 1<<13 | rw | large, x + 16: root | rw,
		y: z | rw, y + 8: z | rw, y + 16: y | rw, y + 24: 1<<21 | rw | large | pteA,
		z: 0x5000 | rw | pteA, z + 8: 0x6000 | rw,
	} {
		g.put(gpa, v)
	}
	s := NewShadowSet(ShadowConfig{Detect: ExitDetectBoth})
	if err := s.Track(g.m, root); err != nil {
		t.Fatalf("Track = %v", err)
	}
	st := s.Stats()
	if st.Pages != 4 || st.Loops != 3 || st.BadTables != 2 || st.BadLeaves != 1 || st.Shared != 2 {
		t.Errorf("Track of malformed tables: %+v; want 4 pages, 3 loops, 2 bad tables, 1 bad leaf, 2 shared", st)
	}
	if info, _ := s.Space(root); info.MinVA != 0 || !info.MinVAValid {
		t.Errorf("MinVA = %#x, %v; want 0 (z[0])", info.MinVA, info.MinVAValid)
	}
	g.takeDirty()
	step := func(gpa, v uint64) []Transition {
		g.put(gpa, v)
		ts := s.Update(g.m, g.takeDirty())
		checkShadows(t, s, g.m)
		return ts
	}
	step(y, 0) // z still referenced by y[1]
	if s.Stats().Pages != 4 {
		t.Errorf("after clearing one of two pointers to z: %d pages, want 4", s.Stats().Pages)
	}
	step(y+8, 0)
	if st := s.Stats(); st.Pages != 3 || st.Unlinked != 1 {
		t.Errorf("after clearing both pointers to z: %+v; want 3 pages, 1 unlinked", st)
	}
	step(y+32, y|rw)        // a new self-pointer: loop
	step(root+8, 0)         // the old self-map goes: it held no reference
	step(root+40, z|rw)     // z as a PDPT now: its leaves become pointers
	step(root+48, 1<<45|rw) // a pointer far outside RAM
	ts := s.Update(g.m, nil)
	if len(ts) != 0 {
		t.Errorf("Update with nothing written = %d transitions", len(ts))
	}
	if s.Stats().Pages > 6 {
		t.Errorf("shadow pages %d, want at most 6", s.Stats().Pages)
	}
	if err := s.Track(g.m, 1<<45); err == nil {
		t.Errorf("Track of a CR3 outside RAM = nil, want an error")
	}
	lim := NewShadowSet(ShadowConfig{TableLimit: 2})
	if err := lim.Track(g.m, root); err != nil || lim.Stats().Pages != 2 || lim.Stats().Truncated == 0 {
		t.Errorf("Track with TableLimit 2 = %v, %+v; want 2 pages, truncated", err, lim.Stats())
	}
}

func TestParseExitDetect(t *testing.T) {
	for _, d := range allModes {
		got, err := ParseExitDetect(d.String())
		if err != nil || got != d {
			t.Errorf("ParseExitDetect(%q) = %v, %v; want %v", d.String(), got, err, d)
		}
	}
	_, err := ParseExitDetect("fast")
	if err == nil || err.Error() != `exit-detect="fast": want none, min-va, consecutive or both` {
		t.Errorf("ParseExitDetect(fast) = %v", err)
	}
}

// TestShadowMinVA follows the accessed minimum VA: a lower accessed page
// lowers it at once, the VMM clearing A bits does not move it (sticky), and
// unmapping it (in mode none) recomputes it from the shadows at the end of
// the Update.
func TestShadowMinVA(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	g.attach()
	cr3 := g.process()
	s := g.sets[0]
	minVA := func() uint64 {
		info, _ := s.Space(cr3)
		return info.MinVA
	}
	if got := minVA(); got != textVA+PageSize {
		t.Fatalf("MinVA = %#x, want %#x", got, textVA+PageSize)
	}
	first := g.entry(cr3, textVA, 1)
	g.put(first, g.get(first)|pteA) // the CPU sets A on the first text page
	if got := minVA(); got != textVA {
		t.Errorf("after A set at %#x: MinVA = %#x", textVA, got)
	}
	g.put(first, g.get(first)&^pteA) // CountAccessed clears it
	if got := minVA(); got != textVA {
		t.Errorf("after the A bit is cleared: MinVA = %#x, want %#x (sticky)", got, textVA)
	}
	g.zap(cr3, textVA, textVA+2*PageSize)
	if got := minVA(); got != textVA+2*PageSize {
		t.Errorf("after unmapping the two lowest pages: MinVA = %#x, want %#x", got, textVA+2*PageSize)
	}
	g.zap(cr3, 0, stackVA)
	g.freeTables(cr3, 0, stackVA&^(1<<39-1))
	if got := minVA(); got != stackVA {
		t.Errorf("with only the stack left: MinVA = %#x, want %#x", got, stackVA)
	}
	tables := s.Tables(cr3)
	levels := map[int]int{}
	for _, tb := range tables {
		levels[tb.Level]++
		if tb.Level == 1 && tb.GPA == g.table(cr3, stackVA, 1) && (tb.VA != stackVA&^(2<<20-1) || tb.Span != 2<<20) {
			t.Errorf("stack PT: %+v, want VA %#x, span 2 MiB", tb, stackVA&^(2<<20-1))
		}
	}
	// root; kernel PDPT and stack PUD; kernel PD and stack PMD; stack PT.
	if levels[4] != 1 || levels[3] != 2 || levels[2] != 2 || levels[1] != 1 {
		t.Errorf("tables by level = %v, want 4:1 3:2 2:2 1:1", levels)
	}
	if !s.Forget(cr3) || s.Stats().Pages != 0 || s.Forget(cr3) {
		t.Errorf("Forget: %+v", s.Stats())
	}
}

func TestDirtyBitmap(t *testing.T) {
	layout := Layout(5 << 30) // RAM split around the MMIO hole
	bits := make([]uint64, (5<<30)/PageSize/64)
	off, _ := LayoutOffset(layout, HoleEnd+3*PageSize, PageSize)
	bits[off/PageSize/64] |= 1 << (off / PageSize % 64)
	d := DirtyBitmap{Layout: layout, Bits: bits}
	for gpa, want := range map[uint64]bool{HoleEnd + 3*PageSize: true, HoleEnd + 3*PageSize + 8: true, HoleEnd + 2*PageSize: false, off: false, HoleStart + PageSize: false, 1 << 50: false} {
		if got := d.Dirty(gpa); got != want {
			t.Errorf("Dirty(%#x) = %v, want %v", gpa, got, want)
		}
	}
}

func TestShadowSkipKernelHalf(t *testing.T) {
	g := newSGGuest(t, 8<<20)
	cr3 := g.process()
	s := NewShadowSet(ShadowConfig{SkipKernelHalf: true})
	if err := s.Track(g.m, cr3); err != nil {
		t.Fatal(err)
	}
	if info, _ := s.Space(cr3); info.Pages != 11 {
		t.Errorf("SkipKernelHalf: %d shadow pages, want 11 (13 less the kernel PDPT and PD)", info.Pages)
	}
	g.takeDirty()
	g.put(cr3+8*257, g.kernel|present|write) // a second kernel PML4 entry
	ts := s.Update(g.m, g.takeDirty())
	if len(ts) != 1 || ts[0].Kind != Mapped || ts[0].Index != 257 || s.Stats().Pages != 11 {
		t.Errorf("kernel PML4 entry written: %+v, %d pages; want one mapped transition, 11 pages", ts, s.Stats().Pages)
	}
}
