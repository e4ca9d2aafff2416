package arch

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Minimal ACPI tables for a Linux guest (ACPI 6.x layouts): RSDP, XSDT,
// FADT, FACS, DSDT and MADT. They describe the local APICs, the IOAPIC and
// the SCI, and give the guest a way to power off: a PM1a control register
// on an I/O port of the VMM and a DSDT whose \_S5 package names the sleep
// type to write there. The FADT also names a reset register. The DSDT also
// lists the virtio-mmio devices (_HID "LNRO0005", a memory window and an
// edge-triggered interrupt): kernels built without
// VIRTIO_MMIO_CMDLINE_DEVICES, Debian's among them, find them only there. The tables are
// full-hardware ACPI (not HW_REDUCED_ACPI): that keeps the legacy PIC, the
// PIT timer and the identity mapping of ISA IRQs 0-15 to IOAPIC pins, which
// the serial port and the command-line virtio-mmio devices rely on.

// PM1 control register bits (ACPI 6.x, 4.8.3.2.1).
const (
	PM1CntSCIEnable   = 1 << 0
	PM1CntSleepEnable = 1 << 13
	pm1CntSleepShift  = 10
	pm1CntSleepMask   = 7
)

// PM1SleepType returns SLP_TYP from a PM1 control register value.
func PM1SleepType(v uint16) uint8 { return uint8(v>>pm1CntSleepShift) & pm1CntSleepMask }

// Register block lengths the FADT gives.
const (
	PM1EventLen   = 4 // status (2 bytes) and enable (2 bytes)
	PM1ControlLen = 2
)

// Addresses of the interrupt controllers.
const (
	LAPICAddr  = 0xfee00000
	IOAPICAddr = 0xfec00000
)

// ACPIConfig describes the machine the tables describe.
type ACPIConfig struct {
	// Base is the guest-physical address the tables are placed at; the
	// RSDP comes first and the FACS at Base+64, so Base must be 64-byte
	// aligned (and, for the kernel's own search, inside the BIOS area
	// 0xe0000-0xfffff).
	Base uint64
	// CPUs is the number of processors; their local APIC ids are 0..CPUs-1.
	CPUs int
	// IOAPICID is the IOAPIC's id (GSI base 0, at IOAPICAddr).
	IOAPICID uint8
	// SCI is the ISA IRQ (and GSI) of the ACPI system control interrupt.
	SCI uint8
	// PM1EventPort and PM1ControlPort are the I/O ports of the PM1a event
	// block (PM1EventLen bytes) and control block (PM1ControlLen bytes).
	PM1EventPort, PM1ControlPort uint16
	// ResetPort is the I/O port of the reset register; writing ResetValue
	// there resets the machine.
	ResetPort  uint16
	ResetValue uint8
	// S5Type is the SLP_TYP value \_S5 names: the guest writes it with
	// SLP_EN to PM1a control to power off.
	S5Type uint8
	// VirtioMMIO are the virtio-mmio devices to list in the DSDT.
	VirtioMMIO []VirtioMMIODevice
}

// VirtioMMIODevice is a virtio-mmio register window and its interrupt.
type VirtioMMIODevice struct {
	Base uint32 // guest-physical address, below 4 GiB
	Size uint32
	GSI  uint32 // edge-triggered, active high
}

// maxACPIVirtio bounds the devices one DSDT lists (their names are VR00..VR99).
const maxACPIVirtio = 100

// Table header and layout constants.
const (
	acpiHeaderLen = 36
	rsdpLen       = 36
	facsLen       = 64
	fadtLen       = 276
	fadtRevision  = 6
	fadtMinor     = 3
	madtRevision  = 5
	dsdtRevision  = 2
	gasLen        = 12
	gasSystemIO   = 1
	// FADT flags.
	fadtWBINVD      = 1 << 0
	fadtProcC1      = 1 << 2
	fadtPowerButton = 1 << 4 // no fixed-feature power button
	fadtSleepButton = 1 << 5 // no fixed-feature sleep button
	fadtResetReg    = 1 << 10
	// IA-PC boot architecture flags.
	iapcVGANotPresent = 1 << 2
	iapcNoMSI         = 1 << 3
	iapcNoCMOSRTC     = 1 << 5
	// MADT.
	madtPCATCompat     = 1
	madtLocalAPIC      = 0
	madtIOAPIC         = 1
	madtOverride       = 2
	madtLocalAPICNMI   = 4
	madtEnabled        = 1
	madtLevelHigh      = 0x1 | 0x3<<2 // active high, level triggered
	madtAllProcessors  = 0xff
	maxACPICPUs        = 255
	acpiPreferredPMOff = 45
)

var (
	acpiOEMID      = [6]byte{'U', 'S', 'T', 'D', 'Y', ' '}
	acpiOEMTableID = [8]byte{'U', 'N', 'D', 'R', 'S', 'T', 'D', 'Y'}
	acpiCreatorID  = [4]byte{'U', 'S', 'T', 'D'}
)

// ACPITables is the result of BuildACPI.
type ACPITables struct {
	// Bytes are the tables, to be copied to ACPIConfig.Base.
	Bytes []byte
	// RSDP is the guest-physical address of the root pointer (= Base).
	RSDP uint64
	// Offsets of each table within Bytes, by signature ("RSD PTR ",
	// "XSDT", "FACP", "FACS", "DSDT", "APIC").
	Offsets map[string]int
}

// BuildACPI builds the tables for c.
func BuildACPI(c ACPIConfig) (*ACPITables, error) {
	if c.Base%64 != 0 {
		return nil, fmt.Errorf("ACPI tables at %#x: want 64-byte alignment (RSDP and FACS)", c.Base)
	}
	if c.CPUs < 1 || c.CPUs > maxACPICPUs {
		return nil, fmt.Errorf("ACPI tables for %d CPUs: want 1..%d", c.CPUs, maxACPICPUs)
	}
	if c.SCI == 0 || c.SCI == 2 || c.SCI >= 16 {
		return nil, fmt.Errorf("ACPI SCI on IRQ %d: want an ISA IRQ other than 0 and 2", c.SCI)
	}
	if c.PM1EventPort == 0 || c.PM1ControlPort == 0 || c.ResetPort == 0 {
		return nil, errors.New("ACPI tables: PM1 event, PM1 control and reset ports are all required")
	}
	if c.S5Type > pm1CntSleepMask {
		return nil, fmt.Errorf("ACPI S5 sleep type %d: want 0..%d", c.S5Type, pm1CntSleepMask)
	}
	if len(c.VirtioMMIO) > maxACPIVirtio {
		return nil, fmt.Errorf("ACPI tables for %d virtio devices: at most %d", len(c.VirtioMMIO), maxACPIVirtio)
	}
	for _, d := range c.VirtioMMIO {
		if d.Size == 0 || uint64(d.Base)+uint64(d.Size) > 1<<32 {
			return nil, fmt.Errorf("virtio-mmio window [%#x, +%#x): want a non-empty range below 4 GiB", d.Base, d.Size)
		}
	}
	t := &ACPITables{RSDP: c.Base, Offsets: map[string]int{}}
	// Layout: RSDP, FACS (64-byte aligned), XSDT, FADT, MADT, DSDT.
	const (
		offRSDP = 0
		offFACS = 64
		offXSDT = offFACS + facsLen
	)
	xsdtEntries := 2 // FADT, MADT
	offFADT := align(offXSDT+acpiHeaderLen+8*xsdtEntries, 16)
	offMADT := align(offFADT+fadtLen, 16)
	madt := buildMADT(c)
	offDSDT := align(offMADT+len(madt), 16)
	dsdt := buildDSDT(c)
	b := make([]byte, offDSDT+len(dsdt))
	addr := func(off int) uint64 { return c.Base + uint64(off) }
	le := binary.LittleEndian

	// FACS: no checksum; version 2, no global lock owner, no waking vector.
	copy(b[offFACS:], "FACS")
	le.PutUint32(b[offFACS+4:], facsLen)
	b[offFACS+32] = 2

	fadt := buildFADT(c, addr(offFACS), addr(offDSDT))
	copy(b[offFADT:], fadt)
	copy(b[offMADT:], madt)
	copy(b[offDSDT:], dsdt)

	xsdt := b[offXSDT : offXSDT+acpiHeaderLen+8*xsdtEntries]
	putHeader(xsdt, "XSDT", 1)
	le.PutUint64(xsdt[acpiHeaderLen:], addr(offFADT))
	le.PutUint64(xsdt[acpiHeaderLen+8:], addr(offMADT))
	setChecksum(xsdt, 9)

	r := b[offRSDP : offRSDP+rsdpLen]
	copy(r, "RSD PTR ")
	copy(r[9:], acpiOEMID[:])
	r[15] = 2 // ACPI 2.0+ RSDP
	le.PutUint32(r[20:], rsdpLen)
	le.PutUint64(r[24:], addr(offXSDT))
	r[8] = checksum(r[:20])
	r[32] = checksum(r)

	t.Bytes = b
	t.Offsets["RSD PTR "] = offRSDP
	t.Offsets["FACS"] = offFACS
	t.Offsets["XSDT"] = offXSDT
	t.Offsets["FACP"] = offFADT
	t.Offsets["APIC"] = offMADT
	t.Offsets["DSDT"] = offDSDT
	return t, nil
}

func align(n, to int) int { return (n + to - 1) / to * to }

// putHeader fills in a system description table header; the length is
// len(b) and the checksum is left for setChecksum.
func putHeader(b []byte, sig string, rev uint8) {
	copy(b, sig)
	binary.LittleEndian.PutUint32(b[4:], uint32(len(b)))
	b[8] = rev
	copy(b[10:], acpiOEMID[:])
	copy(b[16:], acpiOEMTableID[:])
	binary.LittleEndian.PutUint32(b[24:], 1)
	copy(b[28:], acpiCreatorID[:])
	binary.LittleEndian.PutUint32(b[32:], 1)
}

// checksum returns the byte that makes b (with a zero checksum byte) sum to 0.
func checksum(b []byte) byte {
	var s byte
	for _, x := range b {
		s += x
	}
	return -s
}

// setChecksum sets b[at] so that b sums to zero.
func setChecksum(b []byte, at int) {
	b[at] = 0
	b[at] = checksum(b)
}

// putGAS writes a generic address structure for an I/O port register of
// width bytes.
func putGAS(b []byte, port uint16, width int) {
	b[0] = gasSystemIO
	b[1] = uint8(8 * width)
	b[2] = 0
	switch width {
	case 1:
		b[3] = 1
	case 2:
		b[3] = 2
	default:
		b[3] = 3
	}
	binary.LittleEndian.PutUint64(b[4:], uint64(port))
}

func buildFADT(c ACPIConfig, facs, dsdt uint64) []byte {
	b := make([]byte, fadtLen)
	putHeader(b, "FACP", fadtRevision)
	le := binary.LittleEndian
	// FIRMWARE_CTRL stays 0: X_FIRMWARE_CTRL names the FACS (ACPI 6.x
	// allows only one of them). DSDT and X_DSDT may both be set.
	le.PutUint32(b[40:], uint32(dsdt))
	b[acpiPreferredPMOff] = 0 // unspecified
	le.PutUint16(b[46:], uint16(c.SCI))
	le.PutUint32(b[48:], 0) // no SMI_CMD: the machine is always in ACPI mode
	le.PutUint32(b[56:], uint32(c.PM1EventPort))
	le.PutUint32(b[64:], uint32(c.PM1ControlPort))
	b[88] = PM1EventLen
	b[89] = PM1ControlLen
	le.PutUint16(b[96:], 101)  // P_LVL2_LAT > 100: no C2
	le.PutUint16(b[98:], 1001) // P_LVL3_LAT > 1000: no C3
	le.PutUint16(b[109:], iapcVGANotPresent|iapcNoMSI|iapcNoCMOSRTC)
	le.PutUint32(b[112:], fadtWBINVD|fadtProcC1|fadtPowerButton|fadtSleepButton|fadtResetReg)
	putGAS(b[116:], c.ResetPort, 1)
	b[128] = c.ResetValue
	b[131] = fadtMinor
	le.PutUint64(b[132:], facs)
	le.PutUint64(b[140:], dsdt)
	putGAS(b[148:], c.PM1EventPort, PM1EventLen)
	putGAS(b[172:], c.PM1ControlPort, PM1ControlLen)
	copy(b[268:], "USTDYVMM")
	setChecksum(b, 9)
	return b
}

func buildMADT(c ACPIConfig) []byte {
	b := make([]byte, acpiHeaderLen+8)
	le := binary.LittleEndian
	le.PutUint32(b[36:], LAPICAddr)
	le.PutUint32(b[40:], madtPCATCompat)
	for i := 0; i < c.CPUs; i++ {
		e := make([]byte, 8)
		e[0], e[1], e[2], e[3] = madtLocalAPIC, 8, uint8(i), uint8(i)
		le.PutUint32(e[4:], madtEnabled)
		b = append(b, e...)
	}
	io := make([]byte, 12)
	io[0], io[1], io[2] = madtIOAPIC, 12, c.IOAPICID
	le.PutUint32(io[4:], IOAPICAddr)
	le.PutUint32(io[8:], 0)
	b = append(b, io...)
	// The SCI is level-triggered, active high (on its own GSI).
	ov := make([]byte, 10)
	ov[0], ov[1], ov[2], ov[3] = madtOverride, 10, 0, c.SCI
	le.PutUint32(ov[4:], uint32(c.SCI))
	le.PutUint16(ov[8:], madtLevelHigh)
	b = append(b, ov...)
	// LINT1 of every local APIC is the NMI input.
	nmi := []byte{madtLocalAPICNMI, 6, madtAllProcessors, 0, 0, 1}
	b = append(b, nmi...)
	putHeader(b, "APIC", madtRevision)
	setChecksum(b, 9)
	return b
}

// AML opcodes and resource descriptors used by the DSDT.
const (
	amlNameOp    = 0x08
	amlScopeOp   = 0x10
	amlBufferOp  = 0x11
	amlPackageOp = 0x12
	amlBytePfx   = 0x0a
	amlStringPfx = 0x0d
	amlZeroOp    = 0x00
	amlExtOp     = 0x5b
	amlDeviceOp  = 0x82

	resMemory32Fixed = 0x86
	resExtendedIRQ   = 0x89
	resEndTag        = 0x79
	extIRQConsumer   = 1 << 0
	extIRQEdge       = 1 << 1

	// VirtioMMIOHID is the ACPI hardware id of a virtio-mmio device.
	VirtioMMIOHID = "LNRO0005"
)

// amlPkgLength encodes an AML PkgLength for a body of n bytes; the encoded
// length counts its own bytes too.
func amlPkgLength(n int) []byte {
	for extra := 0; extra < 4; extra++ {
		total := n + 1 + extra
		switch {
		case extra == 0 && total < 1<<6:
			return []byte{byte(total)}
		case extra > 0 && total < 1<<(4+8*extra):
			b := []byte{byte(extra<<6) | byte(total&0x0f)}
			for i := 0; i < extra; i++ {
				b = append(b, byte(total>>(4+8*i)))
			}
			return b
		}
	}
	panic("arch: AML package longer than 256 MiB")
}

// amlPkg returns op, the PkgLength of body, and body.
func amlPkg(op []byte, body []byte) []byte {
	out := append(append([]byte(nil), op...), amlPkgLength(len(body))...)
	return append(out, body...)
}

// amlName returns Name (seg, value) for a 4-character name and an encoded value.
func amlName(seg string, value []byte) []byte {
	return append(append([]byte{amlNameOp}, seg...), value...)
}

// amlVirtioDevice returns Device (VRnn) with _HID "LNRO0005", _UID n and a
// _CRS of a fixed memory window and one extended interrupt.
func amlVirtioDevice(n int, d VirtioMMIODevice) []byte {
	le := binary.LittleEndian
	res := []byte{resMemory32Fixed, 9, 0, 1} // read/write
	res = le.AppendUint32(res, d.Base)
	res = le.AppendUint32(res, d.Size)
	res = append(res, resExtendedIRQ, 6, 0, extIRQConsumer|extIRQEdge, 1)
	res = le.AppendUint32(res, d.GSI)
	res = append(res, resEndTag, 0)
	crs := amlPkg([]byte{amlBufferOp}, append([]byte{amlBytePfx, byte(len(res))}, res...))
	body := []byte(fmt.Sprintf("VR%02d", n))
	body = append(body, amlName("_HID", append(append([]byte{amlStringPfx}, VirtioMMIOHID...), 0))...)
	body = append(body, amlName("_UID", []byte{amlBytePfx, byte(n)})...)
	body = append(body, amlName("_CRS", crs)...)
	return amlPkg([]byte{amlExtOp, amlDeviceOp}, body)
}

// buildDSDT returns a DSDT holding Name (_S5, Package () {t, t, 0, 0}) and,
// in Scope (\_SB), one device per virtio-mmio window.
func buildDSDT(c ACPIConfig) []byte {
	pkg := []byte{4, amlBytePfx, c.S5Type, amlBytePfx, c.S5Type, amlZeroOp, amlZeroOp}
	aml := amlName("_S5_", amlPkg([]byte{amlPackageOp}, pkg))
	if len(c.VirtioMMIO) > 0 {
		sb := []byte("_SB_")
		for i, d := range c.VirtioMMIO {
			sb = append(sb, amlVirtioDevice(i, d)...)
		}
		aml = append(aml, amlPkg([]byte{amlScopeOp}, sb)...)
	}
	b := make([]byte, acpiHeaderLen, acpiHeaderLen+len(aml))
	b = append(b, aml...)
	putHeader(b, "DSDT", dsdtRevision)
	setChecksum(b, 9)
	return b
}
