package mmu

import "fmt"

// ExitDetect selects how a ShadowSet recognises an address space being torn
// down (seed idea 2), so that it stops following the teardown write by write.
// It is consulted on every present→not-present PTE transition.
type ExitDetect uint8

const (
	// ExitDetectNone never drops a trace: the teardown is followed to its end.
	ExitDetectNone ExitDetect = 0
	// ExitDetectMinVA is embodiment 1: when the leaf entry mapping the
	// address space's accessed minimum virtual address goes present→not-present,
	// the address space is exiting; that transition and every later
	// present→not-present transition in it drop the trace and shadow page of
	// their page table.
	ExitDetectMinVA ExitDetect = 1
	// ExitDetectConsecutive is embodiment 2: per address space, consecutive
	// present→not-present transitions are counted per page table (any other
	// transition in a table resets its count); once at least two tables each
	// have at least four, the next present→not-present transition drops its
	// table's trace and shadow page.
	ExitDetectConsecutive ExitDetect = 2
	// ExitDetectBoth drops a trace when either embodiment says so.
	ExitDetectBoth = ExitDetectMinVA | ExitDetectConsecutive
)

// Thresholds of embodiment 2.
const (
	consecutiveRun    = 4 // present→not-present transitions in a row in one table
	consecutiveTables = 2 // tables with such a run before the next transition drops
)

var exitDetectNames = [...]string{"none", "min-va", "consecutive", "both"}

// String returns the name ParseExitDetect accepts.
func (d ExitDetect) String() string {
	if int(d) < len(exitDetectNames) {
		return exitDetectNames[d]
	}
	return fmt.Sprintf("ExitDetect(%d)", uint8(d))
}

// ParseExitDetect parses none, min-va, consecutive or both.
func ParseExitDetect(s string) (ExitDetect, error) {
	for i, n := range exitDetectNames {
		if s == n {
			return ExitDetect(i), nil
		}
	}
	return 0, fmt.Errorf("exit-detect=%q: want none, min-va, consecutive or both", s)
}

func (d ExitDetect) minVA() bool       { return d&ExitDetectMinVA != 0 }
func (d ExitDetect) consecutive() bool { return d&ExitDetectConsecutive != 0 }
