package arch

import "testing"

func TestDisassemble(t *testing.T) {
	tests := []struct {
		code []byte
		rip  uint64
		want string
	}{
		{[]byte{0x0f, 0x0b}, 0, "ud2 (0f 0b)"},
		{[]byte{0x0f, 0x0b, 0x90, 0x90}, 0, "ud2 (0f 0b)"}, // only the first instruction
		{[]byte{0xf4}, 0x1000, "hlt (f4)"},
		{[]byte{0x90}, 0, "nop (90)"},
		{[]byte{0xb8, 0x01, 0x00, 0x00, 0x00}, 0, "mov eax, 0x1 (b8 01 00 00 00)"},
		{[]byte{0x48, 0x89, 0xd8}, 0, "mov rax, rbx (48 89 d8)"},
		{[]byte{0xe6, 0x80}, 0, "out 0x80, al (e6 80)"},
		{[]byte{0x66, 0x90}, 0, "data16 nop (66 90)"},
		// Relative branches are shown at their target, computed from rip.
		{[]byte{0xeb, 0xfe}, 0x1000, "jmp 0x1000 (eb fe)"},
		{[]byte{0xeb, 0x10}, 0xffff_ffff_8000_0000, "jmp 0xffffffff80000012 (eb 10)"},
		{nil, 0, "<no code bytes>"},
		{[]byte{}, 0x1000, "<no code bytes>"},
		// Invalid in 64-bit mode.
		{[]byte{0x06}, 0, "<undecodable: 06>"},
		{[]byte{0xd6, 0x01, 0x02}, 0, "<undecodable: d6 01 02>"},
		// At most 8 bytes are shown.
		{[]byte{0x06, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 0, "<undecodable: 06 01 02 03 04 05 06 07>"},
		{[]byte{0x06, 1, 2, 3, 4, 5, 6, 7, 8}, 0, "<undecodable: 06 01 02 03 04 05 06 07>"},
		// Truncated instructions are undecodable, not a made-up prefix.
		{[]byte{0x0f}, 0, "<undecodable: 0f>"},
		{[]byte{0xb8, 0x01}, 0, "<undecodable: b8 01>"},
		// Longer than the architectural 15 bytes.
		{[]byte{0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x90}, 0,
			"<undecodable: 66 66 66 66 66 66 66 66>"},
	}
	for _, tt := range tests {
		if got := Disassemble(tt.code, tt.rip); got != tt.want {
			t.Errorf("Disassemble(% x, %#x) = %q, want %q", tt.code, tt.rip, got, tt.want)
		}
	}
}

// FuzzDisassemble checks that arbitrary bytes never panic and always give a
// non-empty description that shows at most the instruction's bytes.
func FuzzDisassemble(f *testing.F) {
	f.Add([]byte{0x0f, 0x0b}, uint64(0))
	f.Add([]byte{0xeb, 0xfe}, uint64(0xffff_ffff_ffff_fff0))
	f.Add([]byte{0x66, 0x66, 0x0f}, uint64(0x1000))
	f.Fuzz(func(t *testing.T, code []byte, rip uint64) {
		if got := Disassemble(code, rip); got == "" || got[0] == ' ' {
			t.Fatalf("Disassemble(% x, %#x) = %q", code, rip, got)
		}
	})
}
