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
