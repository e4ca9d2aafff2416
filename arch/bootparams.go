package arch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"sort"
)

// The Linux x86 boot protocol (Documentation/arch/x86/boot.rst): a bzImage
// starts with the real-mode setup code, whose setup header at offset 0x1f1
// describes the image; the protected-mode kernel follows the setup sectors.
// Understudy enters it through the 64-bit entry point (protocol 2.12 and
// XLF_KERNEL_64) with a filled-in "zero page" (struct boot_params).

// Offsets of setup header fields in a bzImage and in struct boot_params
// (the header sits at the same offset in both).
const (
	hdrSetupSects      = 0x1f1
	hdrSysSize         = 0x1f4
	hdrBootFlag        = 0x1fe
	hdrJump            = 0x200 // 2-byte short jump; its second byte is the header length past 0x202
	hdrMagic           = 0x202
	hdrVersion         = 0x206
	hdrTypeOfLoader    = 0x210
	hdrLoadFlags       = 0x211
	hdrRamdiskImage    = 0x218
	hdrRamdiskSize     = 0x21c
	hdrCmdLinePtr      = 0x228
	hdrInitrdAddrMax   = 0x22c
	hdrKernelAlignment = 0x230
	hdrRelocatable     = 0x234
	hdrXLoadFlags      = 0x236
	hdrCmdlineSize     = 0x238
	hdrPrefAddress     = 0x258
	hdrInitSize        = 0x260
	hdrEnd             = 0x290 // end of the space struct boot_params gives the header

	bpACPIRSDPAddr     = 0x070
	bpExtRamdiskImage  = 0x0c0
	bpExtRamdiskSize   = 0x0c4
	bpExtCmdLinePtr    = 0x0c8
	bpE820Entries      = 0x1e8
	bpSentinel         = 0x1ef
	bpE820Table        = 0x2d0
	e820EntrySize      = 20
	defaultSetupSects  = 4
	sectorSize         = 512
	minProtocolVersion = 0x020c
)

// BootParamsSize is the size of struct boot_params (the zero page).
const BootParamsSize = 4096

// MaxE820Entries is the number of entries struct boot_params holds.
const MaxE820Entries = 128

// SetupHeaderMagic is "HdrS", the setup header signature.
const SetupHeaderMagic = 0x53726448

// BootFlag is the 0xAA55 signature at offset 0x1fe of every bzImage.
const BootFlag = 0xaa55

// Load flags (setup header loadflags).
const (
	LoadedHigh = 1 << 0 // the protected-mode code is loaded at 1 MiB
)

// Extended load flags (setup header xloadflags).
const (
	XLFKernel64            = 1 << 0 // the kernel has the 64-bit entry point at load address + 0x200
	XLFCanBeLoadedAbove4G  = 1 << 1 // the initrd may lie above 4 GiB
	entry64Offset          = 0x200
	loaderTypeUndefined    = 0xff
	maxKernelInitSize      = 1 << 30
	maxKernelAlignmentBits = 30
)

// E820 memory types.
const (
	E820RAM      = 1
	E820Reserved = 2
	E820ACPI     = 3
	E820NVS      = 4
)

// ErrBadKernel is wrapped by every error about a kernel image that is not a
// bzImage Understudy can boot.
var ErrBadKernel = errors.New("not a bootable bzImage")

// SetupHeader holds the setup header fields Understudy reads.
type SetupHeader struct {
	SetupSects      uint8  // 512-byte setup sectors after the boot sector (0 means 4)
	SysSize         uint32 // protected-mode code size in 16-byte paragraphs
	Version         uint16 // boot protocol version, e.g. 0x020f for 2.15
	LoadFlags       uint8
	InitrdAddrMax   uint32 // highest address the initrd may occupy
	KernelAlignment uint32 // physical alignment the kernel needs
	Relocatable     bool
	XLoadFlags      uint16
	CmdlineSize     uint32 // longest command line, without its terminating NUL
	PrefAddress     uint64 // preferred load address (where it decompresses to)
	InitSize        uint32 // memory the kernel needs from its load address while it starts
}

// BzImage is a parsed kernel image.
type BzImage struct {
	Header SetupHeader
	// Setup is the real-mode part: boot sector and setup sectors.
	Setup []byte
	// Kernel is the protected-mode part, to be loaded at 1 MiB.
	Kernel []byte
}

// LoadBzImage reads and parses the kernel image at path.
func LoadBzImage(path string) (*BzImage, error) {
	img, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("kernel image: %w", err)
	}
	k, err := ParseBzImage(img)
	if err != nil {
		return nil, fmt.Errorf("kernel image %s: %w", path, err)
	}
	return k, nil
}

// ParseBzImage validates img as a bzImage that supports the 64-bit boot
// protocol and returns its parts (which alias img). The image is untrusted:
// every field it relies on is checked.
func ParseBzImage(img []byte) (*BzImage, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadKernel, fmt.Sprintf(format, args...))
	}
	if len(img) < hdrEnd {
		return nil, bad("%d bytes is too short for a setup header (it ends at offset %#x)", len(img), hdrEnd)
	}
	le := binary.LittleEndian
	if m := le.Uint32(img[hdrMagic:]); m != SetupHeaderMagic {
		return nil, bad("no setup header signature \"HdrS\" at offset %#x (found %q)", hdrMagic, img[hdrMagic:hdrMagic+4])
	}
	if f := le.Uint16(img[hdrBootFlag:]); f != BootFlag {
		return nil, bad("boot flag at offset %#x is %#04x, want %#04x", hdrBootFlag, f, BootFlag)
	}
	h := SetupHeader{
		SetupSects:      img[hdrSetupSects],
		SysSize:         le.Uint32(img[hdrSysSize:]),
		Version:         le.Uint16(img[hdrVersion:]),
		LoadFlags:       img[hdrLoadFlags],
		InitrdAddrMax:   le.Uint32(img[hdrInitrdAddrMax:]),
		KernelAlignment: le.Uint32(img[hdrKernelAlignment:]),
		Relocatable:     img[hdrRelocatable] != 0,
		XLoadFlags:      le.Uint16(img[hdrXLoadFlags:]),
		CmdlineSize:     le.Uint32(img[hdrCmdlineSize:]),
		PrefAddress:     le.Uint64(img[hdrPrefAddress:]),
		InitSize:        le.Uint32(img[hdrInitSize:]),
	}
	if h.Version < minProtocolVersion {
		return nil, bad("boot protocol %d.%02d is too old: the 64-bit entry point needs 2.12 or later (Linux 3.8+)", h.Version>>8, h.Version&0xff)
	}
	if h.XLoadFlags&XLFKernel64 == 0 {
		return nil, bad("the kernel has no 64-bit entry point (XLF_KERNEL_64 is not set in xloadflags %#x): build it for x86-64", h.XLoadFlags)
	}
	if h.LoadFlags&LoadedHigh == 0 {
		return nil, bad("the kernel does not load at 1 MiB (LOADED_HIGH is not set): a zImage, not a bzImage")
	}
	if h.KernelAlignment == 0 || bits.OnesCount32(h.KernelAlignment) != 1 || bits.TrailingZeros32(h.KernelAlignment) > maxKernelAlignmentBits {
		return nil, bad("kernel alignment %#x is not a power of two up to 1 GiB", h.KernelAlignment)
	}
	if h.InitSize == 0 || h.InitSize > maxKernelInitSize {
		return nil, bad("init_size %#x: want 1 byte to 1 GiB", h.InitSize)
	}
	if h.PrefAddress >= 1<<40 {
		return nil, bad("preferred load address %#x is beyond 1 TiB", h.PrefAddress)
	}
	sects := int(h.SetupSects)
	if sects == 0 {
		sects = defaultSetupSects
	}
	setupSize := (sects + 1) * sectorSize
	hdrLen := hdrMagic + int(img[hdrJump+1])
	if hdrLen > hdrEnd {
		return nil, bad("setup header ends at offset %#x, past the space boot_params gives it (%#x)", hdrLen, hdrEnd)
	}
	kernelSize := uint64(h.SysSize) * 16
	if kernelSize == 0 {
		return nil, bad("syssize is 0: no protected-mode kernel")
	}
	if uint64(len(img)) < uint64(setupSize)+kernelSize {
		return nil, bad("truncated: %d bytes, but %d setup sectors and a %d-byte kernel need %d", len(img), sects, kernelSize, uint64(setupSize)+kernelSize)
	}
	return &BzImage{Header: h, Setup: img[:setupSize], Kernel: img[setupSize:]}, nil
}

// headerBytes returns the setup header as the image has it, from 0x1f1 to
// its end, for copying into boot_params.
func (k *BzImage) headerBytes() []byte {
	end := hdrMagic + int(k.Setup[hdrJump+1])
	return k.Setup[hdrSetupSects:end]
}

// Entry64 returns the 64-bit entry point of a kernel loaded at loadAddr.
func (k *BzImage) Entry64(loadAddr uint64) uint64 { return loadAddr + entry64Offset }

// MemoryEnd returns the end of the memory the kernel occupies while it
// starts when loaded at loadAddr: its image, and the init_size bytes from
// where it relocates itself to (its load address rounded up to its
// alignment, at least its preferred address). Nothing else (an initrd) may
// be placed below it.
func (k *BzImage) MemoryEnd(loadAddr uint64) uint64 {
	end := loadAddr + uint64(len(k.Kernel))
	align := uint64(k.Header.KernelAlignment)
	run := (loadAddr + align - 1) &^ (align - 1)
	if run < k.Header.PrefAddress {
		run = k.Header.PrefAddress
	}
	if e := run + uint64(k.Header.InitSize); e > end {
		end = e
	}
	return end
}

// CheckCmdline checks that the kernel accepts cmdline.
func (k *BzImage) CheckCmdline(cmdline string) error {
	if i := bytes.IndexByte([]byte(cmdline), 0); i >= 0 {
		return fmt.Errorf("kernel command line has a NUL byte at offset %d", i)
	}
	if uint64(len(cmdline)) > uint64(k.Header.CmdlineSize) {
		return fmt.Errorf("kernel command line is %d bytes, this kernel takes at most %d", len(cmdline), k.Header.CmdlineSize)
	}
	return nil
}

// InitrdMax returns the highest address (exclusive) an initrd may end at:
// the lower of the kernel's initrd_addr_max and ramEnd.
func (k *BzImage) InitrdMax(ramEnd uint64) uint64 {
	max := uint64(k.Header.InitrdAddrMax) + 1
	if ramEnd < max {
		max = ramEnd
	}
	return max
}

// E820Entry is one entry of the BIOS memory map.
type E820Entry struct {
	Addr uint64
	Size uint64
	Type uint32
}

// MemRange is a range of guest-physical addresses.
type MemRange struct {
	GPA  uint64
	Size uint64
}

// Legacy PC low-memory layout the E820 map reserves.
const (
	// EBDAStart is where the reserved extended BIOS data area begins; RAM
	// below it is usable.
	EBDAStart = 0x9fc00
	// BIOSAreaStart..BIOSAreaEnd is the BIOS ROM area, where ACPI's RSDP is
	// searched for.
	BIOSAreaStart = 0xe0000
	BIOSAreaEnd   = 0x100000
)

// LinuxE820 builds the memory map of a PC whose RAM is ram (ascending,
// non-overlapping; the first range starts at 0 and extends past 1 MiB): RAM
// below the EBDA, the EBDA and the BIOS area reserved (the video hole in
// between is left out), RAM from 1 MiB, and every further range as RAM.
func LinuxE820(ram []MemRange) ([]E820Entry, error) {
	if len(ram) == 0 || ram[0].GPA != 0 || ram[0].Size <= BIOSAreaEnd {
		return nil, fmt.Errorf("e820: RAM must start at 0 and extend past 1 MiB, got %v", ram)
	}
	if len(ram)+3 > MaxE820Entries {
		return nil, fmt.Errorf("e820: %d RAM ranges, at most %d fit", len(ram), MaxE820Entries-3)
	}
	out := []E820Entry{
		{Addr: 0, Size: EBDAStart, Type: E820RAM},
		{Addr: EBDAStart, Size: 0xa0000 - EBDAStart, Type: E820Reserved},
		{Addr: BIOSAreaStart, Size: BIOSAreaEnd - BIOSAreaStart, Type: E820Reserved},
		{Addr: BIOSAreaEnd, Size: ram[0].Size - BIOSAreaEnd, Type: E820RAM},
	}
	prevEnd := ram[0].Size
	for _, r := range ram[1:] {
		if r.Size == 0 || r.GPA < prevEnd || r.GPA+r.Size < r.GPA {
			return nil, fmt.Errorf("e820: RAM range [%#x, +%#x) is empty, overlaps or is out of order", r.GPA, r.Size)
		}
		out = append(out, E820Entry{Addr: r.GPA, Size: r.Size, Type: E820RAM})
		prevEnd = r.GPA + r.Size
	}
	return out, nil
}

// BootConfig is what the zero page tells the kernel beyond its own header.
type BootConfig struct {
	CmdlineAddr uint64 // guest-physical address of the NUL-terminated command line
	InitrdAddr  uint64 // 0 if there is no initrd
	InitrdSize  uint64
	E820        []E820Entry
	RSDPAddr    uint64 // ACPI root pointer (0: the kernel searches the BIOS area)
}

// BootParams builds the zero page (struct boot_params) for booting k with c.
func (k *BzImage) BootParams(c BootConfig) ([]byte, error) {
	if len(c.E820) == 0 || len(c.E820) > MaxE820Entries {
		return nil, fmt.Errorf("boot params: %d e820 entries, want 1..%d", len(c.E820), MaxE820Entries)
	}
	if c.CmdlineAddr == 0 {
		return nil, errors.New("boot params: no command line address")
	}
	if c.InitrdSize > 0 && c.InitrdAddr == 0 {
		return nil, errors.New("boot params: initrd without an address")
	}
	if c.InitrdAddr+c.InitrdSize > 1<<32 && k.Header.XLoadFlags&XLFCanBeLoadedAbove4G == 0 {
		return nil, fmt.Errorf("boot params: initrd at %#x ends above 4 GiB, and this kernel cannot use that", c.InitrdAddr)
	}
	e := append([]E820Entry(nil), c.E820...)
	sort.Slice(e, func(i, j int) bool { return e[i].Addr < e[j].Addr })
	for i := 1; i < len(e); i++ {
		if e[i].Addr < e[i-1].Addr+e[i-1].Size {
			return nil, fmt.Errorf("boot params: e820 entries [%#x, +%#x) and [%#x, +%#x) overlap", e[i-1].Addr, e[i-1].Size, e[i].Addr, e[i].Size)
		}
	}
	bp := make([]byte, BootParamsSize)
	copy(bp[hdrSetupSects:], k.headerBytes())
	le := binary.LittleEndian
	bp[hdrTypeOfLoader] = loaderTypeUndefined
	le.PutUint32(bp[hdrCmdLinePtr:], uint32(c.CmdlineAddr))
	le.PutUint32(bp[bpExtCmdLinePtr:], uint32(c.CmdlineAddr>>32))
	le.PutUint32(bp[hdrRamdiskImage:], uint32(c.InitrdAddr))
	le.PutUint32(bp[bpExtRamdiskImage:], uint32(c.InitrdAddr>>32))
	le.PutUint32(bp[hdrRamdiskSize:], uint32(c.InitrdSize))
	le.PutUint32(bp[bpExtRamdiskSize:], uint32(c.InitrdSize>>32))
	le.PutUint64(bp[bpACPIRSDPAddr:], c.RSDPAddr)
	bp[bpSentinel] = 0
	bp[bpE820Entries] = uint8(len(e))
	for i, ent := range e {
		o := bpE820Table + i*e820EntrySize
		le.PutUint64(bp[o:], ent.Addr)
		le.PutUint64(bp[o+8:], ent.Size)
		le.PutUint32(bp[o+16:], ent.Type)
	}
	return bp, nil
}

// ParseE820 reads the e820 table of a zero page (for tests and diagnostics).
func ParseE820(bp []byte) ([]E820Entry, error) {
	if len(bp) < BootParamsSize {
		return nil, fmt.Errorf("zero page of %d bytes, want %d", len(bp), BootParamsSize)
	}
	n := int(bp[bpE820Entries])
	if n > MaxE820Entries {
		return nil, fmt.Errorf("zero page lists %d e820 entries, at most %d fit", n, MaxE820Entries)
	}
	out := make([]E820Entry, n)
	for i := range out {
		o := bpE820Table + i*e820EntrySize
		out[i] = E820Entry{Addr: binary.LittleEndian.Uint64(bp[o:]), Size: binary.LittleEndian.Uint64(bp[o+8:]), Type: binary.LittleEndian.Uint32(bp[o+16:])}
	}
	return out, nil
}
