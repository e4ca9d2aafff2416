package arch

import "testing"

func TestDescriptor(t *testing.T) {
	tests := []struct {
		name string
		seg  Segment
		want uint64
	}{
		// The flat long-mode GDT entries Linux and every 64-bit loader use.
		{"kernel code", CodeSegment64(SelKernelCode, 0), 0x00af9b000000ffff},
		{"kernel data", DataSegment(SelKernelData, 0), 0x00cf93000000ffff},
		{"user code", CodeSegment64(SelUserCode, 3), 0x00affb000000ffff},
		{"user data", DataSegment(SelUserData, 3), 0x00cff3000000ffff},
		// Byte-granular limit, scattered base bits, AVL.
		{"byte granular", Segment{Base: 0x12345678, Limit: 0xabcde, Type: SegTypeDataRWA, S: 1, Present: 1, AVL: 1}, 0x121a9334_5678bcde},
		// 4 KiB granularity drops the limit's low 12 bits.
		{"page granular", Segment{Limit: 0x0001ffff, Type: SegTypeCodeXRA, S: 1, Present: 1, G: 1, DB: 1}, 0x00c09b00_0000001f},
		// Out-of-range fields are masked, never spill into neighbours.
		{"masked", Segment{Type: 0xff, S: 0xff, DPL: 0xff, Present: 0xfe, L: 0xfe, DB: 0xfe, G: 0xfe, AVL: 0xfe}, 0x00007f00_00000000},
		{"zero", Segment{}, 0},
	}
	for _, tt := range tests {
		if got := Descriptor(tt.seg); got != tt.want {
			t.Errorf("%s: Descriptor(%+v) = %#016x, want %#016x", tt.name, tt.seg, got, tt.want)
		}
	}
}

func TestSystemDescriptor(t *testing.T) {
	tests := []struct {
		name   string
		seg    Segment
		lo, hi uint64
	}{
		// A busy 64-bit TSS of 0x67 bytes at 0x1000.
		{"low TSS", TSSSegment(SelTSS, 0x1000, 0x67), 0x00008b00_10000067, 0},
		// Base above 4 GiB: bits 0-31 go in lo, 32-63 in hi.
		{"high TSS", TSSSegment(SelTSS, 0xffff_8880_1234_5000, 0x2067), 0x12008b34_50002067, 0xffff_8880},
		// S and L are ignored: system descriptors have S=0.
		{"S ignored", Segment{Base: 0x1_0000_0000, Limit: 0xfff, Type: 2, Present: 1, S: 1, L: 1, DPL: 3}, 0x0000e200_00000fff, 1},
		// Granularity is kept.
		{"granular", Segment{Limit: 0xffffffff, Type: SegTypeTSS64Busy, Present: 1, G: 1}, 0x008f8b00_0000ffff, 0},
	}
	for _, tt := range tests {
		lo, hi := SystemDescriptor(tt.seg)
		if lo != tt.lo || hi != tt.hi {
			t.Errorf("%s: SystemDescriptor(%+v) = %#016x, %#x, want %#016x, %#x", tt.name, tt.seg, lo, hi, tt.lo, tt.hi)
		}
	}
}

func TestSegmentConstructors(t *testing.T) {
	tests := []struct {
		name string
		got  Segment
		want Segment
	}{
		{"CodeSegment64", CodeSegment64(SelUserCode, 3), Segment{Limit: 0xffffffff, Selector: 0x1b, Type: 0xb, Present: 1, DPL: 3, S: 1, L: 1, G: 1}},
		{"DataSegment", DataSegment(SelKernelData, 0), Segment{Limit: 0xffffffff, Selector: 0x10, Type: 0x3, Present: 1, DB: 1, S: 1, G: 1}},
		{"TSSSegment", TSSSegment(SelTSS, 0x5000, 0x67), Segment{Base: 0x5000, Limit: 0x67, Selector: 0x28, Type: 0xb, Present: 1}},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %+v, want %+v", tt.name, tt.got, tt.want)
		}
	}
	// The selectors index GDT slots 1..5 with the documented RPLs.
	sels := []struct {
		sel       uint16
		index, pl uint16
	}{{SelKernelCode, 1, 0}, {SelKernelData, 2, 0}, {SelUserCode, 3, 3}, {SelUserData, 4, 3}, {SelTSS, 5, 0}}
	for _, s := range sels {
		if s.sel>>3 != s.index || s.sel&3 != s.pl {
			t.Errorf("selector %#x = index %d RPL %d, want index %d RPL %d", s.sel, s.sel>>3, s.sel&3, s.index, s.pl)
		}
	}
}
