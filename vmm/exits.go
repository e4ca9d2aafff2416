package vmm

import (
	"fmt"

	"github.com/understudy-vmm/understudy/arch"
)

// handleExit handles the exit vCPU v just took. It returns a non-nil error
// when the machine must stop. Every exit reason is listed: the ones Understudy
// does not enable are errors naming the exit, RIP and instruction.
func (m *Machine) handleExit(v *vcpu) error {
	reason := v.cpu.ExitReason()
	switch reason {
	case arch.ExitIO:
		io, err := v.cpu.IO()
		if err != nil {
			return m.exitError(v, "bad I/O exit", err.Error())
		}
		return m.io.handle(m, v, io)
	case arch.ExitMMIO:
		return m.mmio.handle(m, v, v.cpu.MMIO())
	case arch.ExitIntr:
		// A kick raced with an exit: the loop re-checks pause and stop.
		return nil
	case arch.ExitShutdown:
		if m.linux != nil {
			// A PC resets on a triple fault: Linux reboots this way with
			// reboot=t, and a kernel that crashes early ends here too.
			m.guestEnded(EndTripleFault, fmt.Sprintf("vCPU %d triple fault (a reset, or a crash): %s", v.id, m.faultDetail(v)))
			return nil
		}
		return m.exitError(v, "triple fault", m.faultDetail(v))
	case arch.ExitHLT:
		return m.exitError(v, "guest halted with interrupts it cannot receive", "HLT exit")
	case arch.ExitFailEntry:
		r, cpu := v.cpu.FailEntry()
		return m.exitError(v, "VM entry failed", fmt.Sprintf("hardware entry failure reason %#x on host CPU %d", r, cpu))
	case arch.ExitInternalError:
		sub, data := v.cpu.InternalError()
		return m.exitError(v, "KVM internal error", fmt.Sprintf("suberror %d, data %#x", sub, data))
	case arch.ExitSystemEvent:
		typ, flags := v.cpu.SystemEvent()
		switch typ {
		case arch.SystemEventShutdown:
			m.guestEnded(EndPowerOff, "KVM system event: shutdown")
			return nil
		case arch.SystemEventReset:
			if m.linux != nil {
				m.guestEnded(EndReboot, "KVM system event: reset")
				return nil
			}
			return m.exitError(v, "guest requested a reset", "reset is not supported for payload guests")
		case arch.SystemEventCrash:
			return m.exitError(v, "guest crashed", fmt.Sprintf("system event crash, flags %#x", flags))
		}
		return m.exitError(v, "unknown system event", fmt.Sprintf("type %d, flags %#x", typ, flags))
	case arch.ExitMemoryFault:
		flags, gpa, size := v.cpu.MemoryFault()
		if m.offerFault(v, []uint64{gpa}) {
			return nil
		}
		return m.exitError(v, "memory fault KVM could not resolve", fmt.Sprintf("GPA %#x, size %#x, flags %#x", gpa, size, flags))
	case arch.ExitUnknown, arch.ExitException, arch.ExitHypercall, arch.ExitDebug,
		arch.ExitIRQWindowOpen, arch.ExitSetTPR, arch.ExitTPRAccess, arch.ExitNMI,
		arch.ExitIOAPICEOI, arch.ExitHyperV, arch.ExitX86RDMSR, arch.ExitX86WRMSR,
		arch.ExitDirtyRingFull, arch.ExitAPResetHold, arch.ExitX86BusLock, arch.ExitNotify:
		// None of these is enabled for this machine, so KVM should never
		// report them.
		return m.exitError(v, "unexpected exit", "the VMM did not enable this exit")
	default:
		return m.exitError(v, "unknown exit reason", fmt.Sprintf("exit reason %d", reason))
	}
}

// exitError builds an *ExitError for vCPU v from its current state.
func (m *Machine) exitError(v *vcpu, what, detail string) error {
	e := &ExitError{CPU: v.id, Exit: arch.ExitName(v.cpu.ExitReason()), Detail: what}
	if detail != "" {
		e.Detail += " (" + detail + ")"
	}
	regs, err := v.cpu.Regs()
	if err != nil {
		e.Inst = "registers unreadable: " + err.Error()
		return e
	}
	e.RIP = regs.RIP
	e.Inst = m.instructionAt(v, regs.RIP)
	return e
}

// faultDetail describes the exception that led to a triple fault, from the
// vCPU events and CR2.
func (m *Machine) faultDetail(v *vcpu) string {
	ev, err := v.cpu.Events()
	if err != nil {
		return "exception unknown: " + err.Error()
	}
	x := ev.Exception
	s := "last exception " + exceptionName(x.Nr)
	if x.HasErrorCode != 0 {
		s += fmt.Sprintf(", error code %#x", x.ErrorCode)
	}
	if x.Nr == 14 {
		if sr, err := v.cpu.Sregs(); err == nil {
			s += fmt.Sprintf(", CR2 %#x", sr.CR2)
		}
	}
	return s + "; the guest has no handler for it"
}

// instructionAt decodes the instruction at guest virtual address rip.
func (m *Machine) instructionAt(v *vcpu, rip uint64) string {
	gpa, err := m.translate(v, rip)
	if err != nil {
		return "instruction unreadable: " + err.Error()
	}
	var code []byte
	for n := uint64(15); n > 0 && code == nil; n-- {
		code, _ = m.mem.Slice(gpa, n)
	}
	if code == nil {
		return fmt.Sprintf("instruction unreadable: GPA %#x is not RAM", gpa)
	}
	return arch.Disassemble(code, rip)
}

// translate maps a guest virtual address to a guest-physical one through
// vCPU v's page tables.
func (m *Machine) translate(v *vcpu, gva uint64) (uint64, error) {
	sr, err := v.cpu.Sregs()
	if err != nil {
		return 0, err
	}
	if sr.CR0&arch.CR0PG == 0 {
		return gva, nil
	}
	return m.mem.Translate(sr.CR3, gva)
}

// offerFault hands a guest access KVM could not fault in to the fault
// handler. Without known GPAs it derives them from the faulting instruction.
func (m *Machine) offerFault(v *vcpu, gpas []uint64) bool {
	h := m.faultHandler.Load()
	if h == nil || v.faults >= maxFaultRetries {
		return false
	}
	if gpas == nil {
		gpas = m.faultingGPAs(v)
	}
	if !(*h)(gpas) {
		return false
	}
	v.faults++
	return true
}

// faultingGPAs returns the guest-physical addresses of the pages the
// instruction at RIP accesses (first and last byte of each access).
func (m *Machine) faultingGPAs(v *vcpu) []uint64 {
	regs, err := v.cpu.Regs()
	if err != nil {
		return nil
	}
	sregs, err := v.cpu.Sregs()
	if err != nil {
		return nil
	}
	tr := func(gva uint64) (uint64, bool) {
		if sregs.CR0&arch.CR0PG == 0 {
			return gva, true
		}
		gpa, err := m.mem.Translate(sregs.CR3, gva)
		return gpa, err == nil
	}
	ripGPA, ok := tr(regs.RIP)
	if !ok {
		return nil
	}
	code, err := m.mem.Slice(ripGPA, 15)
	if err != nil {
		// Near the end of a page or of RAM: take what there is.
		code, _ = m.mem.Slice(ripGPA, arch.PageSize-ripGPA%arch.PageSize)
	}
	accs, err := arch.MemoryOperands(code, regs.RIP, regs, sregs)
	if err != nil {
		return []uint64{ripGPA}
	}
	var out []uint64
	for _, a := range accs {
		for _, gva := range []uint64{a.GVA, a.GVA + a.Size - 1} {
			if gpa, ok := tr(gva); ok {
				out = append(out, gpa)
			}
		}
	}
	return out
}
