package arch

import (
	"fmt"

	"golang.org/x/arch/x86/x86asm"
)

// Disassemble decodes the instruction at the start of code (64-bit mode) and
// returns it in Intel syntax with its bytes, e.g. "ud2 (0f 0b)". It never
// fails: undecodable bytes are reported as such.
func Disassemble(code []byte, rip uint64) string {
	if len(code) == 0 {
		return "<no code bytes>"
	}
	inst, err := x86asm.Decode(code, 64)
	// For truncated or over-long input x86asm returns no error but a one-byte
	// pseudo-instruction with no opcode (printed as "prefix(0x..)").
	if err != nil || inst.Op == 0 {
		n := len(code)
		if n > 8 {
			n = 8
		}
		return fmt.Sprintf("<undecodable: % x>", code[:n])
	}
	return fmt.Sprintf("%s (% x)", x86asm.IntelSyntax(inst, rip, nil), code[:inst.Len])
}

// MemoryAccess is a guest-virtual range an instruction reads or writes.
type MemoryAccess struct {
	GVA  uint64
	Size uint64
}

// MemoryOperands decodes the instruction at the start of code, executed at
// rip with registers regs and segment bases from sregs, and returns the
// guest-virtual addresses it accesses: explicit memory operands, the implicit
// stack and string operands, and the instruction bytes themselves. It is used
// to find which page a faulting instruction touched. Addresses it cannot
// compute (e.g. gathers) are left out; the caller must treat the list as a
// hint, never as complete.
func MemoryOperands(code []byte, rip uint64, regs Regs, sregs Sregs) ([]MemoryAccess, error) {
	inst, err := x86asm.Decode(code, 64)
	if err != nil || inst.Op == 0 {
		return nil, fmt.Errorf("cannot decode instruction at %#x", rip)
	}
	acc := []MemoryAccess{{GVA: rip, Size: uint64(inst.Len)}}
	size := uint64(inst.MemBytes)
	if size == 0 {
		size = 8
	}
	next := rip + uint64(inst.Len)
	for _, a := range inst.Args {
		m, ok := a.(x86asm.Mem)
		if !ok {
			continue
		}
		ea, ok := effectiveAddress(m, next, regs, sregs)
		if ok {
			acc = append(acc, MemoryAccess{GVA: ea, Size: size})
		}
	}
	width := uint64(inst.DataSize / 8)
	if width == 0 {
		width = 8
	}
	switch inst.Op {
	case x86asm.PUSH, x86asm.CALL, x86asm.PUSHF, x86asm.PUSHFQ:
		acc = append(acc, MemoryAccess{GVA: regs.RSP - 8, Size: 8})
	case x86asm.POP, x86asm.RET, x86asm.POPF, x86asm.POPFQ, x86asm.LEAVE:
		acc = append(acc, MemoryAccess{GVA: regs.RSP, Size: 8}, MemoryAccess{GVA: regs.RBP, Size: 8})
	case x86asm.LODSB, x86asm.LODSW, x86asm.LODSD, x86asm.LODSQ, x86asm.OUTSB, x86asm.OUTSW, x86asm.OUTSD:
		acc = append(acc, MemoryAccess{GVA: regs.RSI, Size: width})
	case x86asm.STOSB, x86asm.STOSW, x86asm.STOSD, x86asm.STOSQ, x86asm.SCASB, x86asm.SCASW, x86asm.SCASD,
		x86asm.SCASQ, x86asm.INSB, x86asm.INSW, x86asm.INSD:
		acc = append(acc, MemoryAccess{GVA: regs.RDI, Size: width})
	case x86asm.MOVSB, x86asm.MOVSW, x86asm.MOVSD, x86asm.MOVSQ, x86asm.CMPSB, x86asm.CMPSW, x86asm.CMPSD, x86asm.CMPSQ:
		acc = append(acc, MemoryAccess{GVA: regs.RSI, Size: width}, MemoryAccess{GVA: regs.RDI, Size: width})
	}
	return acc, nil
}

// effectiveAddress computes Segment:[Base+Scale*Index+Disp] in 64-bit mode.
func effectiveAddress(m x86asm.Mem, next uint64, regs Regs, sregs Sregs) (uint64, bool) {
	ea := uint64(m.Disp)
	if m.Base != 0 {
		b, ok := regValue(m.Base, next, regs)
		if !ok {
			return 0, false
		}
		ea += b
	}
	if m.Index != 0 {
		i, ok := regValue(m.Index, next, regs)
		if !ok {
			return 0, false
		}
		ea += i * uint64(m.Scale)
	}
	switch m.Segment {
	case x86asm.FS:
		ea += sregs.FS.Base
	case x86asm.GS:
		ea += sregs.GS.Base
	}
	return ea, true
}

// regValue returns the value of a general-purpose register (any width) or
// RIP (the address of the next instruction).
func regValue(r x86asm.Reg, next uint64, regs Regs) (uint64, bool) {
	full := [16]uint64{regs.RAX, regs.RCX, regs.RDX, regs.RBX, regs.RSP, regs.RBP, regs.RSI, regs.RDI,
		regs.R8, regs.R9, regs.R10, regs.R11, regs.R12, regs.R13, regs.R14, regs.R15}
	switch {
	case r == x86asm.RIP:
		return next, true
	case r >= x86asm.RAX && r <= x86asm.R15:
		return full[r-x86asm.RAX], true
	case r >= x86asm.EAX && r <= x86asm.R15L:
		return full[r-x86asm.EAX] & 0xffffffff, true
	case r >= x86asm.AX && r <= x86asm.R15W:
		return full[r-x86asm.AX] & 0xffff, true
	}
	return 0, false
}
