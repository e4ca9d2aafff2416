package largepage

// The exit-detect audit (--large-pages ...,exit-detect=M,exit-audit=VA):
// a measuring aid that runs the four exit-detection modes side by side on
// the same guest, at the same pauses, and scores each mode's decisions
// against what the guest's processes say of themselves.

import (
	"fmt"
	"slices"

	"github.com/understudy-vmm/understudy/mmu"
)

// LiveTag is what a long-lived process of an audited guest writes at the
// audit's tag VA (the first 16 bytes of a page it keeps mapped for its
// whole life). The audit takes an exit decision on an address space whose
// tag page says LiveTag for a false positive: such a process never exits
// while it is measured. Every other decided space is taken for a process
// that was exiting. The nested guests' init writes it in guest.mode=storm
// (initramfs/boot.LiveTag is the same text).
const LiveTag = "understudy-live\x00"

// AuditModes are the modes an audit compares, in this order.
var AuditModes = []mmu.ExitDetect{mmu.ExitDetectNone, mmu.ExitDetectMinVA, mmu.ExitDetectConsecutive, mmu.ExitDetectBoth}

// AuditResult is what one exit-detection mode made of the audited guest.
type AuditResult struct {
	Mode mmu.ExitDetect
	// Tracked counts the address spaces this mode's shadow set started
	// tracking (a CR3 seen at a pause and not tracked yet), Live those of
	// them whose tag page said LiveTag at some later pause.
	Tracked, Live int
	// Detected counts exit decisions on untagged spaces; FalsePositives
	// decisions on spaces tagged live (a live space can be decided on
	// again after it is tracked anew).
	Detected, FalsePositives int
	// LatencyP50 is the median, over the detected exits, of the
	// transitions of the space seen from the first present→not-present
	// transition of the Update that decided, up to the deciding one.
	LatencyP50 int
	// TraceEvents counts the transitions the mode's set turned the guest's
	// page-table writes into (the trace work; none is the baseline).
	TraceEvents uint64
	// ShortEvents counts those of spaces not tagged live: the trace work
	// of the short-lived processes, whose exits detection is for.
	ShortEvents uint64
	Shadow      mmu.ShadowStats
}

// String formats the result as one line.
func (r AuditResult) String() string {
	return fmt.Sprintf("mode=%s tracked=%d live=%d detected=%d false_positives=%d latency_transitions_p50=%d trace_events=%d short_trace_events=%d diffs=%d diffs_avoided=%d dropped=%d shadow_kib_freed=%d",
		r.Mode, r.Tracked, r.Live, r.Detected, r.FalsePositives, r.LatencyP50, r.TraceEvents, r.ShortEvents, r.Shadow.Diffs, r.Shadow.DiffsAvoided, r.Shadow.Dropped, r.Shadow.FreedBytes>>10)
}

// exitAudit runs one shadowView per mode. It is used only by the Pager's
// goroutine.
type exitAudit struct {
	tagVA uint64
	views []*shadowView
	res   []AuditResult
	lat   [][]int
	// live holds, per mode, the tracked spaces tagged live at this pause;
	// everLive those counted in Live (until the space is forgotten).
	live, everLive []map[uint64]bool
}

func newExitAudit(tagVA uint64) *exitAudit {
	a := &exitAudit{tagVA: tagVA}
	for _, d := range AuditModes {
		a.views = append(a.views, newShadowView(d))
		a.res = append(a.res, AuditResult{Mode: d})
		a.lat = append(a.lat, nil)
		a.live = append(a.live, map[uint64]bool{})
		a.everLive = append(a.everLive, map[uint64]bool{})
	}
	return a
}

// tagged reports whether the address space at root maps the tag VA, by
// the guest's tables now, to a page that starts with LiveTag. A process
// being torn down has lost the mapping or is about to (exit_mmap clears
// every leaf; a fork child zeroes its copy of the tag at once), so only
// the live ones say LiveTag.
func (a *exitAudit) tagged(mem *mmu.Memory, root uint64) bool {
	gpa, err := mem.Translate(root, a.tagVA)
	if err != nil {
		return false
	}
	b, err := mem.Slice(gpa, uint64(len(LiveTag)))
	return err == nil && string(b) == LiveTag
}

// observe runs every mode's view over one pause: it classifies the tracked
// spaces by their tags as the guest's tables are now (the Update's
// decisions are about the writes made before this pause), updates, tracks
// the new CR3s, scores the decisions, and forgets as the controller does.
// The vCPUs must be paused.
func (a *exitAudit) observe(mem *mmu.Memory, cr3s []uint64) {
	for i, v := range a.views {
		r := &a.res[i]
		clear(a.live[i])
		for _, root := range v.set.Spaces() {
			if a.tagged(mem, root) {
				a.live[i][root] = true
				if !a.everLive[i][root] {
					a.everLive[i][root] = true
					r.Live++
				}
			}
		}
		before := map[uint64]bool{}
		for _, root := range v.set.Spaces() {
			before[root] = true
		}
		ts := v.update(mem, cr3s)
		decided := map[uint64]bool{}
		run := map[uint64]int{}
		for _, t := range ts {
			if !a.live[i][t.Space] {
				r.ShortEvents++
			}
			if decided[t.Space] {
				continue
			}
			if run[t.Space] > 0 || t.Kind == mmu.Unmapped {
				run[t.Space]++
			}
			if !t.Exit && !t.Dropped {
				continue
			}
			decided[t.Space] = true
			if a.live[i][t.Space] {
				r.FalsePositives++
			} else {
				r.Detected++
				a.lat[i] = append(a.lat[i], run[t.Space])
			}
		}
		r.TraceEvents += uint64(len(ts))
		for _, root := range v.set.Spaces() {
			if !before[root] {
				r.Tracked++
			}
		}
		v.forget()
		for root := range a.everLive[i] {
			if _, ok := v.set.Space(root); !ok {
				delete(a.everLive[i], root)
			}
		}
		r.Shadow = v.set.Stats()
	}
}

// results returns each mode's result so far.
func (a *exitAudit) results() []AuditResult {
	out := slices.Clone(a.res)
	for i := range out {
		if l := a.lat[i]; len(l) > 0 {
			s := slices.Clone(l)
			slices.Sort(s)
			out[i].LatencyP50 = s[len(s)/2]
		}
	}
	return out
}

// CheckTagVA checks an audit tag VA: a page-aligned, canonical lower-half
// (user) address.
func CheckTagVA(va uint64) error {
	if va == 0 || va%mmu.PageSize != 0 || va >= 1<<47 {
		return fmt.Errorf("%#x: want a page-aligned user virtual address below 0x800000000000", va)
	}
	return nil
}
