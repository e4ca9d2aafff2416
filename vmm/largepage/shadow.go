package largepage

// The guest's view through shadow page tables (--large-pages ...,exit-detect=M):
// the accessed bits are read from an mmu.ShadowSet kept current by diffing,
// and address spaces found exiting are no longer counted.

import (
	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
)

// ForgetAfter is how many guest views an address space may go unsampled
// (no vCPU had its CR3 loaded when the machine was paused) before its
// shadows are forgotten: 16 windows, 3.2 s at the default period and up to
// 26 s once the period has backed off. A process that sleeps for a few
// windows keeps its shadows (its exit is still detected when it comes,
// since every tracked space is diffed each window); one gone longer costs
// nothing past that, so the shadows cover the recently running processes,
// within mmu.DefaultShadowPageLimit in all.
const ForgetAfter = 16

// shadowView keeps the shadow set of a Pager. It is used only by the
// Pager's goroutine.
type shadowView struct {
	set      *mmu.ShadowSet
	lastSeen map[uint64]int // address space root -> view it was last sampled in
	views    int
}

// newShadowView returns an empty view. Its set diffs leaf tables first
// (mmu.ShadowConfig.LeavesFirst): one Update per window sees whatever the
// guest wrote since the previous one, often a whole teardown at once, and
// in that case the leaf-first order lets embodiment 1 see the exit
// (BenchmarkExitDetect at 64 writes per Update: min-va detects 40 of 40
// exits leaves first, 9 of 40 by GPA order).
func newShadowView(d mmu.ExitDetect) *shadowView {
	return &shadowView{set: mmu.NewShadowSet(mmu.ShadowConfig{Detect: d, LeavesFirst: true}), lastSeen: map[uint64]int{}}
}

// count is what mmu.Memory.CountAccessed(cr3s, clear) gives, read from the
// shadows: it brings the tracked address spaces up to date (Update: no dirty
// log is at hand, so every traced page is diffed), starts tracking the new
// CR3s, counts (skipping spaces found exiting) and forgets the address
// spaces found exiting and those not sampled for ForgetAfter views. The
// vCPUs must be paused.
//
// An address space found exiting is forgotten at once, whatever of its
// tables the detector had not dropped yet: the rest of its teardown costs
// nothing, and its CR3 page, which Linux frees after the teardown and may
// soon give to a new process, is tracked afresh if a vCPU has it loaded at
// a later pause. So is a live process the detector mistook for an exiting
// one (embodiment 2 on a big munmap), which is thus counted again from its
// next sampling on, instead of staying untraced where its traces were
// dropped. A process sampled again in the middle of its teardown is tracked
// again too, with what is left of its tables (Linux clears every leaf entry
// before any table pointer, so that is little).
func (v *shadowView) count(mem *mmu.Memory, cr3s []uint64, clear bool) (mmu.RegionAccess, error) {
	v.update(mem, cr3s)
	ra, _, err := v.set.CountAccessed(mem, cr3s, clear)
	v.forget()
	return ra, err
}

// update brings the tracked address spaces up to date and starts tracking
// the new CR3s; it returns the transitions the Update saw. The caller
// forgets (forget) once it has read what it needs.
func (v *shadowView) update(mem *mmu.Memory, cr3s []uint64) []mmu.Transition {
	v.views++
	before := v.set.Spaces()
	ts := v.set.Update(mem, nil)
	// Spaces the detector removed in this Update (their root table was
	// dropped) are not tracked again before the next view: they are
	// exiting, and a vCPU may still have their CR3 loaded.
	gone := map[uint64]bool{}
	for _, root := range before {
		if _, ok := v.set.Space(root); !ok {
			gone[root] = true
		}
	}
	for _, cr3 := range cr3s {
		if gone[cr3&arch.PTEAddrMask] {
			continue
		}
		// A root outside RAM is not tracked (the walk counts nothing there
		// either).
		if err := v.set.Track(mem, cr3); err == nil {
			v.lastSeen[cr3&arch.PTEAddrMask] = v.views
		}
	}
	return ts
}

// forget drops the address spaces found exiting or not sampled for
// ForgetAfter views, and the bookkeeping of those the exit detector already
// removed.
func (v *shadowView) forget() {
	tracked := map[uint64]bool{}
	for _, root := range v.set.Spaces() {
		tracked[root] = true
		if info, _ := v.set.Space(root); info.Exiting || v.views-v.lastSeen[root] >= ForgetAfter {
			v.set.Forget(root)
			delete(v.lastSeen, root)
		}
	}
	for root := range v.lastSeen {
		if !tracked[root] {
			delete(v.lastSeen, root)
		}
	}
}

// reset forgets every address space.
func (v *shadowView) reset() {
	for _, root := range v.set.Spaces() {
		v.set.Forget(root)
	}
	clear(v.lastSeen)
}
