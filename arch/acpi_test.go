package arch

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
)

func testACPIConfig() ACPIConfig {
	return ACPIConfig{
		Base: 0xe0000, CPUs: 3, IOAPICID: 0, SCI: 9,
		PM1EventPort: 0x600, PM1ControlPort: 0x604, ResetPort: 0x606, ResetValue: 1, S5Type: 5,
	}
}

// table returns the table at guest-physical address gpa inside t, checking
// its signature, length and checksum.
func table(t *testing.T, tb *ACPITables, gpa uint64, sig string) []byte {
	t.Helper()
	off := int(gpa - tb.RSDP)
	if gpa < tb.RSDP || off+acpiHeaderLen > len(tb.Bytes) {
		t.Fatalf("%s at %#x lies outside the tables", sig, gpa)
	}
	n := int(binary.LittleEndian.Uint32(tb.Bytes[off+4:]))
	if off+n > len(tb.Bytes) {
		t.Fatalf("%s at %#x is %d bytes, past the tables' end", sig, gpa, n)
	}
	b := tb.Bytes[off : off+n]
	if string(b[:4]) != sig {
		t.Fatalf("table at %#x is %q, want %q", gpa, b[:4], sig)
	}
	if sig != "FACS" && checksum(b) != 0 {
		t.Errorf("%s checksum: bytes sum to %#x, want 0", sig, -checksum(b))
	}
	return b
}

// TestBuildACPI walks the tables the way a guest does: RSDP, XSDT, then each
// table, and checks every field Linux relies on.
func TestBuildACPI(t *testing.T) {
	c := testACPIConfig()
	tb, err := BuildACPI(c)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	r := tb.Bytes[:rsdpLen]
	if string(r[:8]) != "RSD PTR " || r[15] != 2 || checksum(r[:20]) != 0 || checksum(r) != 0 {
		t.Fatalf("RSDP %x: bad signature, revision or checksums", r)
	}
	if tb.RSDP != c.Base || tb.RSDP%16 != 0 {
		t.Errorf("RSDP at %#x", tb.RSDP)
	}
	xsdt := table(t, tb, le.Uint64(r[24:]), "XSDT")
	if len(xsdt) != acpiHeaderLen+16 {
		t.Fatalf("XSDT is %d bytes, want 2 entries", len(xsdt))
	}
	fadt := table(t, tb, le.Uint64(xsdt[36:]), "FACP")
	madt := table(t, tb, le.Uint64(xsdt[44:]), "APIC")
	if len(fadt) != fadtLen || fadt[8] != 6 {
		t.Errorf("FADT is %d bytes revision %d, want %d revision 6", len(fadt), fadt[8], fadtLen)
	}
	facsAddr := le.Uint64(fadt[132:])
	if le.Uint32(fadt[36:]) != 0 || facsAddr%64 != 0 {
		t.Errorf("FACS at %#x (FIRMWARE_CTRL %#x): want 64-byte aligned and FIRMWARE_CTRL 0", facsAddr, le.Uint32(fadt[36:]))
	}
	if facs := table(t, tb, facsAddr, "FACS"); len(facs) != 64 {
		t.Errorf("FACS is %d bytes", len(facs))
	}
	dsdtAddr := le.Uint64(fadt[140:])
	if uint64(le.Uint32(fadt[40:])) != dsdtAddr {
		t.Errorf("DSDT and X_DSDT differ")
	}
	dsdt := table(t, tb, dsdtAddr, "DSDT")
	flags := le.Uint32(fadt[112:])
	if flags&(1<<20) != 0 {
		t.Errorf("FADT flags %#x: HW_REDUCED_ACPI set; these tables are full-hardware", flags)
	}
	if flags&fadtResetReg == 0 {
		t.Errorf("FADT flags %#x: RESET_REG_SUP clear", flags)
	}
	ints := []struct {
		name      string
		got, want uint64
	}{
		{"SCI_INT", uint64(le.Uint16(fadt[46:])), 9},
		{"SMI_CMD", uint64(le.Uint32(fadt[48:])), 0},
		{"PM1a_EVT_BLK", uint64(le.Uint32(fadt[56:])), 0x600},
		{"PM1a_CNT_BLK", uint64(le.Uint32(fadt[64:])), 0x604},
		{"PM_TMR_BLK", uint64(le.Uint32(fadt[76:])), 0},
		{"PM1_EVT_LEN", uint64(fadt[88]), 4},
		{"PM1_CNT_LEN", uint64(fadt[89]), 2},
		{"X_PM1a_EVT_BLK space", uint64(fadt[148]), gasSystemIO},
		{"X_PM1a_EVT_BLK width", uint64(fadt[149]), 32},
		{"X_PM1a_EVT_BLK address", le.Uint64(fadt[152:]), 0x600},
		{"X_PM1a_CNT_BLK width", uint64(fadt[173]), 16},
		{"X_PM1a_CNT_BLK address", le.Uint64(fadt[176:]), 0x604},
		{"RESET_REG space", uint64(fadt[116]), gasSystemIO},
		{"RESET_REG address", le.Uint64(fadt[120:]), 0x606},
		{"RESET_VALUE", uint64(fadt[128]), 1},
		{"IAPC_BOOT_ARCH 8042", uint64(le.Uint16(fadt[109:]) & 2), 0},
	}
	for _, i := range ints {
		if i.got != i.want {
			t.Errorf("FADT %s = %#x, want %#x", i.name, i.got, i.want)
		}
	}
	// DSDT: exactly Name (_S5, Package () {5, 5, 0, 0}).
	wantAML := []byte{0x08, '_', 'S', '5', '_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0x00, 0x00}
	if !bytes.Equal(dsdt[acpiHeaderLen:], wantAML) {
		t.Errorf("DSDT AML = % x, want % x", dsdt[acpiHeaderLen:], wantAML)
	}
	// MADT: 3 local APICs, the IOAPIC, the SCI override, the LINT1 NMI.
	if le.Uint32(madt[36:]) != LAPICAddr || le.Uint32(madt[40:])&1 == 0 {
		t.Errorf("MADT local APIC address %#x flags %#x", le.Uint32(madt[36:]), le.Uint32(madt[40:]))
	}
	var lapics []uint8
	var ioapic, override, nmi int
	for p := madt[44:]; len(p) > 0; {
		if len(p) < 2 || int(p[1]) < 2 || int(p[1]) > len(p) {
			t.Fatalf("MADT entry with bad length: % x", p)
		}
		e := p[:p[1]]
		switch e[0] {
		case madtLocalAPIC:
			if e[2] != e[3] || le.Uint32(e[4:])&1 == 0 {
				t.Errorf("local APIC entry % x: want uid = id and enabled", e)
			}
			lapics = append(lapics, e[3])
		case madtIOAPIC:
			ioapic++
			if le.Uint32(e[4:]) != IOAPICAddr || le.Uint32(e[8:]) != 0 {
				t.Errorf("IOAPIC entry % x", e)
			}
		case madtOverride:
			override++
			if e[3] != 9 || le.Uint32(e[4:]) != 9 || le.Uint16(e[8:]) != 0xd {
				t.Errorf("override entry % x: want IRQ 9 -> GSI 9, level, active high", e)
			}
		case madtLocalAPICNMI:
			nmi++
			if e[2] != 0xff || e[5] != 1 {
				t.Errorf("local APIC NMI entry % x: want all processors, LINT1", e)
			}
		default:
			t.Errorf("unexpected MADT entry type %d", e[0])
		}
		p = p[len(e):]
	}
	if !bytes.Equal(lapics, []byte{0, 1, 2}) || ioapic != 1 || override != 1 || nmi != 1 {
		t.Errorf("MADT has local APICs %v, %d IOAPICs, %d overrides, %d NMI entries", lapics, ioapic, override, nmi)
	}
	if end := len(tb.Bytes); uint64(end)+c.Base > BIOSAreaEnd {
		t.Errorf("tables end at %#x, past the BIOS area", uint64(end)+c.Base)
	}
}

func TestBuildACPIBad(t *testing.T) {
	for _, tt := range []struct {
		mutate func(*ACPIConfig)
		errSub string
	}{
		{func(c *ACPIConfig) { c.Base = 0xe0010 }, "64-byte"},
		{func(c *ACPIConfig) { c.CPUs = 0 }, "CPUs"},
		{func(c *ACPIConfig) { c.CPUs = 256 }, "CPUs"},
		{func(c *ACPIConfig) { c.SCI = 0 }, "SCI"},
		{func(c *ACPIConfig) { c.SCI = 16 }, "SCI"},
		{func(c *ACPIConfig) { c.PM1ControlPort = 0 }, "ports"},
		{func(c *ACPIConfig) { c.S5Type = 8 }, "sleep type"},
	} {
		c := testACPIConfig()
		tt.mutate(&c)
		if _, err := BuildACPI(c); err == nil || !strings.Contains(err.Error(), tt.errSub) {
			t.Errorf("BuildACPI(%+v) = %v, want an error about %s", c, err, tt.errSub)
		}
	}
}

func TestPM1SleepType(t *testing.T) {
	if got := PM1SleepType(5<<10 | PM1CntSleepEnable | PM1CntSCIEnable); got != 5 {
		t.Errorf("PM1SleepType = %d, want 5", got)
	}
}

func TestLAPICDeliveryMode(t *testing.T) {
	var l LAPICState
	l.SetReg(LAPICRegLINT0, 0x10000|0x30) // masked, vector 0x30
	l.SetDeliveryMode(LAPICRegLINT0, LVTDeliveryExtINT)
	if got := l.Reg(LAPICRegLINT0); got != 0x10730 {
		t.Errorf("LINT0 = %#x, want 0x10730", got)
	}
	if l.DeliveryMode(LAPICRegLINT0) != LVTDeliveryExtINT {
		t.Errorf("DeliveryMode = %d", l.DeliveryMode(LAPICRegLINT0))
	}
}

// TestBuildACPIVirtioDevices checks the DSDT's virtio-mmio devices against
// AML that ACPICA's disassembler (iasl -d, 20200925) decodes to
//
//	Name (_S5, Package (0x04) {0x05, 0x05, Zero, Zero})
//	Scope (_SB) {
//	    Device (VR00) {
//	        Name (_HID, "LNRO0005")
//	        Name (_UID, 0x00)
//	        Name (_CRS, ResourceTemplate () {
//	            Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )
//	            Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {0x00000005}
//	        })
//	    }
//	    Device (VR01) { ... 0xD0001000 ... {0x00000006} }
//	}
func TestBuildACPIVirtioDevices(t *testing.T) {
	c := testACPIConfig()
	c.VirtioMMIO = []VirtioMMIODevice{{0xd0000000, 0x1000, 5}, {0xd0001000, 0x1000, 6}}
	tb, err := BuildACPI(c)
	if err != nil {
		t.Fatal(err)
	}
	want := "085f53355f1208040a050a0500001040085f53425f" +
		"5b823b56523030085f4849440d4c4e524f3030303500085f5549440a00085f435253111a0a17" +
		"8609000100" + "0000d0" + "00100000" + "890600030105000000" + "7900" +
		"5b823b56523031085f4849440d4c4e524f3030303500085f5549440a01085f435253111a0a17" +
		"8609000100" + "1000d0" + "00100000" + "890600030106000000" + "7900"
	dsdt := table(t, tb, uint64(tb.Offsets["DSDT"])+tb.RSDP, "DSDT")
	if got := hex.EncodeToString(dsdt[acpiHeaderLen:]); got != want {
		t.Errorf("DSDT AML\n got %s\nwant %s", got, want)
	}
	c.VirtioMMIO = []VirtioMMIODevice{{0xfffff800, 0x1000, 5}}
	if _, err := BuildACPI(c); err == nil {
		t.Errorf("a window crossing 4 GiB was accepted")
	}
}

func TestAMLPkgLength(t *testing.T) {
	for _, tc := range []struct {
		body int
		want []byte
	}{
		{0, []byte{0x01}},
		{62, []byte{0x3f}},
		{63, []byte{0x41, 0x04}},   // 65 = 0x41: low nibble 1, next byte 4
		{4093, []byte{0x4f, 0xff}}, // 4095
		{4094, nil},                // 4097 needs three bytes: checked by decoding only
		{1 << 20, nil},
	} {
		got := amlPkgLength(tc.body)
		n := int(got[0] & 0x3f)
		if extra := int(got[0] >> 6); extra > 0 {
			n = int(got[0] & 0x0f)
			for i := 1; i <= extra; i++ {
				n |= int(got[i]) << (4 + 8*(i-1))
			}
		}
		if n != tc.body+len(got) {
			t.Errorf("amlPkgLength(%d) = % x decodes to %d, want %d", tc.body, got, n, tc.body+len(got))
		}
		if tc.want != nil && !bytes.Equal(got, tc.want) {
			t.Errorf("amlPkgLength(%d) = % x, want % x", tc.body, got, tc.want)
		}
	}
}
