package arch

import (
	"slices"
	"testing"
)

func TestCPUIDForVCPU(t *testing.T) {
	in := []CPUIDEntry{
		{Function: 0, EAX: 0x1f, EBX: 0x756e6547},
		{Function: 1, EAX: 0x806f8, EBX: 0xab12_3456, ECX: 0x7ffa_3203, EDX: 0x178b_fbff},
		{Function: 7, Flags: CPUIDFlagSignificantIndex, EBX: 0x1234},
		{Function: 0xb, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: 1, EBX: 2, ECX: 0x100, EDX: 99},
		{Function: 0xb, Index: 1, Flags: CPUIDFlagSignificantIndex, EAX: 4, EBX: 8, ECX: 0x201, EDX: 99},
		{Function: 0x1f, Index: 0, Flags: CPUIDFlagSignificantIndex, EDX: 77},
		{Function: KVMCPUIDSignature, EAX: KVMCPUIDFeatures, EBX: 0x4b4d564b, EDX: 5},
	}
	orig := slices.Clone(in)
	tests := []struct {
		id, ncpus int
		leaf1EBX  uint32
		x2apic    uint32
	}{
		{0, 1, 0x0001_3456, 0},
		{5, 8, 0x0508_3456, 5},
		{255, 255, 0xffff_3456, 255},
		// Leaf 1 holds only 8 bits of each; the topology leaves hold the full id.
		{300, 256, 0x2c00_3456, 300},
	}
	for _, tt := range tests {
		out := CPUIDForVCPU(in, tt.id, tt.ncpus)
		if len(out) != len(in) {
			t.Fatalf("CPUIDForVCPU(%d, %d) = %d entries, want %d", tt.id, tt.ncpus, len(out), len(in))
		}
		for i, e := range out {
			want := orig[i]
			switch e.Function {
			case 1:
				want.EBX = tt.leaf1EBX
				want.ECX |= CPUIDHypervisorBit
				if got := e.EBX >> 24; got != uint32(tt.id&0xff) {
					t.Errorf("CPUIDForVCPU(%d, %d) leaf 1 APIC id = %d, want %d", tt.id, tt.ncpus, got, tt.id&0xff)
				}
				if got := e.EBX >> 16 & 0xff; got != uint32(tt.ncpus&0xff) {
					t.Errorf("CPUIDForVCPU(%d, %d) leaf 1 CPU count = %d, want %d", tt.id, tt.ncpus, got, tt.ncpus&0xff)
				}
				if e.ECX&CPUIDHypervisorBit == 0 {
					t.Errorf("CPUIDForVCPU(%d, %d) leaf 1 ECX = %#x, want the hypervisor bit", tt.id, tt.ncpus, e.ECX)
				}
			case 0xb, 0x1f:
				want.EDX = tt.x2apic
			}
			if e != want {
				t.Errorf("CPUIDForVCPU(%d, %d)[%d] = %+v, want %+v", tt.id, tt.ncpus, i, e, want)
			}
		}
		if !slices.Equal(in, orig) {
			t.Fatalf("CPUIDForVCPU(%d, %d) modified its input: %+v, want %+v", tt.id, tt.ncpus, in, orig)
		}
		// The result does not alias the input.
		out[1].EAX = 0xdead
		if in[1].EAX != orig[1].EAX {
			t.Fatalf("CPUIDForVCPU(%d, %d) result aliases its input", tt.id, tt.ncpus)
		}
	}
	if got := CPUIDForVCPU(nil, 0, 1); len(got) != 0 {
		t.Errorf("CPUIDForVCPU(nil, 0, 1) = %+v, want empty", got)
	}
}
