package vmm

import (
	"errors"
	"fmt"
)

// ErrStopped is returned by Pause, Resume and OnVCPU once the machine has stopped.
var ErrStopped = errors.New("machine stopped")

// ErrNotPaused is returned by OnVCPU and Resume when the machine is not paused.
var ErrNotPaused = errors.New("machine is not paused")

// ErrPaused is returned by Pause when the machine is already paused.
var ErrPaused = errors.New("machine is already paused")

// ExitError stops a machine on an exit it cannot continue from: an
// unexpected exit reason, a triple fault, an internal or entry error. It names
// the exit, the guest RIP and the instruction there.
type ExitError struct {
	CPU    int
	Exit   string // KVM exit name, e.g. "KVM_EXIT_SHUTDOWN"
	RIP    uint64
	Inst   string // decoded instruction at RIP, or why it could not be read
	Detail string // what happened, in words
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("vCPU %d: %s: %s at RIP %#x: %s", e.CPU, e.Exit, e.Detail, e.RIP, e.Inst)
}

// exceptionNames are the x86 exception mnemonics by vector.
var exceptionNames = [32]string{
	0: "#DE divide error", 1: "#DB debug", 2: "NMI", 3: "#BP breakpoint", 4: "#OF overflow",
	5: "#BR bound range", 6: "#UD invalid opcode", 7: "#NM device not available", 8: "#DF double fault",
	10: "#TS invalid TSS", 11: "#NP segment not present", 12: "#SS stack fault",
	13: "#GP general protection", 14: "#PF page fault", 16: "#MF x87 error", 17: "#AC alignment check",
	18: "#MC machine check", 19: "#XM SIMD error", 20: "#VE virtualization", 21: "#CP control protection",
}

func exceptionName(v uint8) string {
	if int(v) < len(exceptionNames) && exceptionNames[v] != "" {
		return exceptionNames[v]
	}
	return fmt.Sprintf("exception %d", v)
}
