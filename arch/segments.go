package arch

// Flat long-mode segments and their GDT encoding.

// GDT selectors used by Understudy's payload and Linux boot set-ups.
const (
	SelKernelCode = 0x08
	SelKernelData = 0x10
	SelUserCode   = 0x18 | 3
	SelUserData   = 0x20 | 3
	SelTSS        = 0x28
)

// Segment types (the 4-bit type field).
const (
	SegTypeDataRWA   = 0x3 // read/write, accessed
	SegTypeCodeXRA   = 0xb // execute/read, accessed
	SegTypeTSS64Busy = 0xb // with S=0
)

// CodeSegment64 returns a flat 64-bit code segment for privilege level dpl.
func CodeSegment64(sel uint16, dpl uint8) Segment {
	return Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Type: SegTypeCodeXRA, Present: 1, DPL: dpl, S: 1, L: 1, G: 1}
}

// DataSegment returns a flat data segment for privilege level dpl.
func DataSegment(sel uint16, dpl uint8) Segment {
	return Segment{Base: 0, Limit: 0xffffffff, Selector: sel, Type: SegTypeDataRWA, Present: 1, DPL: dpl, DB: 1, S: 1, G: 1}
}

// TSSSegment returns a busy 64-bit TSS at base with the given limit.
func TSSSegment(sel uint16, base uint64, limit uint32) Segment {
	return Segment{Base: base, Limit: limit, Selector: sel, Type: SegTypeTSS64Busy, Present: 1}
}

// Descriptor encodes a code or data segment as an 8-byte GDT entry.
func Descriptor(s Segment) uint64 {
	limit := uint64(s.Limit)
	if s.G != 0 {
		limit >>= 12
	}
	d := limit & 0xffff
	d |= (s.Base & 0xffffff) << 16
	d |= uint64(s.Type&0xf) << 40
	d |= uint64(s.S&1) << 44
	d |= uint64(s.DPL&3) << 45
	d |= uint64(s.Present&1) << 47
	d |= (limit >> 16 & 0xf) << 48
	d |= uint64(s.AVL&1) << 52
	d |= uint64(s.L&1) << 53
	d |= uint64(s.DB&1) << 54
	d |= uint64(s.G&1) << 55
	d |= (s.Base >> 24 & 0xff) << 56
	return d
}

// SystemDescriptor encodes a 16-byte long-mode system descriptor (TSS/LDT).
func SystemDescriptor(s Segment) (lo, hi uint64) {
	lo = Descriptor(Segment{Base: s.Base, Limit: s.Limit, Type: s.Type, Present: s.Present, DPL: s.DPL, G: s.G})
	return lo, s.Base >> 32
}
