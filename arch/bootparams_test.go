package arch

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// synthImage builds a minimal bzImage: 4 setup sectors, a setup header of
// protocol version, with xloadflags, and a protected-mode part of
// kernelSize bytes (a multiple of 16).
func synthImage(version uint16, xloadflags uint16, kernelSize int) []byte {
	const sects = 4
	img := make([]byte, (sects+1)*512+kernelSize)
	le := binary.LittleEndian
	img[hdrSetupSects] = sects
	le.PutUint32(img[hdrSysSize:], uint32(kernelSize/16))
	le.PutUint16(img[hdrBootFlag:], BootFlag)
	img[hdrJump] = 0xeb
	img[hdrJump+1] = 0x6a // header ends at 0x26c
	le.PutUint32(img[hdrMagic:], SetupHeaderMagic)
	le.PutUint16(img[hdrVersion:], version)
	img[hdrLoadFlags] = LoadedHigh
	le.PutUint32(img[hdrInitrdAddrMax:], 0x7fffffff)
	le.PutUint32(img[hdrKernelAlignment:], 0x200000)
	img[hdrRelocatable] = 1
	le.PutUint16(img[hdrXLoadFlags:], xloadflags)
	le.PutUint32(img[hdrCmdlineSize:], 0x7ff)
	le.PutUint64(img[hdrPrefAddress:], 0x1000000)
	le.PutUint32(img[hdrInitSize:], 0x800000)
	for i := (sects + 1) * 512; i < len(img); i++ {
		img[i] = byte(i)
	}
	return img
}

func goodImage() []byte { return synthImage(0x020f, XLFKernel64|XLFCanBeLoadedAbove4G, 4096) }

func TestParseBzImage(t *testing.T) {
	img := goodImage()
	k, err := ParseBzImage(img)
	if err != nil {
		t.Fatalf("ParseBzImage(good image) = %v", err)
	}
	want := SetupHeader{
		SetupSects: 4, SysSize: 256, Version: 0x020f, LoadFlags: LoadedHigh, InitrdAddrMax: 0x7fffffff,
		KernelAlignment: 0x200000, Relocatable: true, XLoadFlags: XLFKernel64 | XLFCanBeLoadedAbove4G,
		CmdlineSize: 0x7ff, PrefAddress: 0x1000000, InitSize: 0x800000,
	}
	if k.Header != want {
		t.Errorf("header = %+v, want %+v", k.Header, want)
	}
	if len(k.Setup) != 5*512 || len(k.Kernel) != 4096 || k.Kernel[0] != byte(5*512%256) {
		t.Errorf("setup %d bytes, kernel %d bytes (first %#x); want 2560, 4096, %#x", len(k.Setup), len(k.Kernel), k.Kernel[0], byte(5*512%256))
	}
	if got := k.Entry64(0x100000); got != 0x100200 {
		t.Errorf("Entry64(1 MiB) = %#x, want 0x100200", got)
	}
	// Relocates to max(align(1 MiB, 2 MiB), 16 MiB) = 16 MiB, needs 8 MiB.
	if got := k.MemoryEnd(0x100000); got != 0x1800000 {
		t.Errorf("MemoryEnd(1 MiB) = %#x, want 0x1800000", got)
	}
	// setup_sects 0 means 4.
	img[hdrSetupSects] = 0
	if k, err := ParseBzImage(img); err != nil || len(k.Setup) != 5*512 {
		t.Errorf("setup_sects 0: ParseBzImage = %v (setup %d bytes), want 4 sectors", err, len(k.Setup))
	}
}

// TestParseBzImageBad covers every refused image: each error names what is
// wrong and wraps ErrBadKernel.
func TestParseBzImageBad(t *testing.T) {
	le := binary.LittleEndian
	tests := []struct {
		name   string
		mutate func([]byte) []byte
		errSub string
	}{
		{"empty", func([]byte) []byte { return nil }, "too short"},
		{"bad magic", func(b []byte) []byte { copy(b[hdrMagic:], "ELF!"); return b }, `no setup header signature "HdrS"`},
		{"no boot flag", func(b []byte) []byte { le.PutUint16(b[hdrBootFlag:], 0); return b }, "boot flag"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-16] }, "truncated"},
		{"truncated in setup", func(b []byte) []byte { return b[:0x400] }, "truncated"},
		{"protocol 2.11", func(b []byte) []byte { le.PutUint16(b[hdrVersion:], 0x020b); return b }, "boot protocol 2.11 is too old"},
		{"protocol 2.00", func(b []byte) []byte { le.PutUint16(b[hdrVersion:], 0x0200); return b }, "too old"},
		{"no 64-bit entry", func(b []byte) []byte { le.PutUint16(b[hdrXLoadFlags:], 0); return b }, "no 64-bit entry point"},
		{"zImage", func(b []byte) []byte { b[hdrLoadFlags] = 0; return b }, "LOADED_HIGH"},
		{"alignment 0", func(b []byte) []byte { le.PutUint32(b[hdrKernelAlignment:], 0); return b }, "alignment"},
		{"alignment 3", func(b []byte) []byte { le.PutUint32(b[hdrKernelAlignment:], 3); return b }, "alignment"},
		{"alignment 2G", func(b []byte) []byte { le.PutUint32(b[hdrKernelAlignment:], 1<<31); return b }, "alignment"},
		{"init size 0", func(b []byte) []byte { le.PutUint32(b[hdrInitSize:], 0); return b }, "init_size"},
		{"init size 2G", func(b []byte) []byte { le.PutUint32(b[hdrInitSize:], 1<<31); return b }, "init_size"},
		{"pref address", func(b []byte) []byte { le.PutUint64(b[hdrPrefAddress:], 1<<50); return b }, "preferred load address"},
		{"no kernel", func(b []byte) []byte { le.PutUint32(b[hdrSysSize:], 0); return b }, "syssize is 0"},
		{"huge syssize", func(b []byte) []byte { le.PutUint32(b[hdrSysSize:], 0xffffffff); return b }, "truncated"},
		{"header too long", func(b []byte) []byte { b[hdrJump+1] = 0xff; return b }, "setup header ends"},
	}
	for _, tt := range tests {
		img := tt.mutate(goodImage())
		_, err := ParseBzImage(img)
		if err == nil || !errors.Is(err, ErrBadKernel) || !strings.Contains(err.Error(), tt.errSub) {
			t.Errorf("%s: ParseBzImage = %v, want an ErrBadKernel containing %q", tt.name, err, tt.errSub)
		}
	}
}

func TestLoadBzImage(t *testing.T) {
	dir := t.TempDir()
	if _, err := LoadBzImage(filepath.Join(dir, "missing")); err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "kernel image") {
		t.Errorf("LoadBzImage(missing) = %v, want a not-exist error naming the kernel image", err)
	}
	p := filepath.Join(dir, "bzImage")
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho not a kernel\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadBzImage(p); err == nil || !errors.Is(err, ErrBadKernel) || !strings.Contains(err.Error(), p) {
		t.Errorf("LoadBzImage(script) = %v, want ErrBadKernel naming %s", err, p)
	}
	if err := os.WriteFile(p, goodImage(), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadBzImage(p); err != nil {
		t.Errorf("LoadBzImage(good) = %v", err)
	}
}

func TestCheckCmdline(t *testing.T) {
	k, err := ParseBzImage(goodImage())
	if err != nil {
		t.Fatal(err)
	}
	if err := k.CheckCmdline(strings.Repeat("a", 0x7ff)); err != nil {
		t.Errorf("CheckCmdline(2047 bytes) = %v", err)
	}
	if err := k.CheckCmdline(strings.Repeat("a", 0x800)); err == nil || !strings.Contains(err.Error(), "at most 2047") {
		t.Errorf("CheckCmdline(2048 bytes) = %v, want a too-long error", err)
	}
	if err := k.CheckCmdline("console=ttyS0\x00evil"); err == nil || !strings.Contains(err.Error(), "NUL") {
		t.Errorf("CheckCmdline(with NUL) = %v, want a NUL error", err)
	}
	if got := k.InitrdMax(1 << 30); got != 1<<30 {
		t.Errorf("InitrdMax(1 GiB) = %#x", got)
	}
	if got := k.InitrdMax(3 << 30); got != 0x80000000 {
		t.Errorf("InitrdMax(3 GiB) = %#x, want initrd_addr_max+1", got)
	}
}

func TestLinuxE820(t *testing.T) {
	got, err := LinuxE820([]MemRange{{0, 3 << 30}, {4 << 30, 1 << 30}})
	if err != nil {
		t.Fatal(err)
	}
	want := []E820Entry{
		{0, 0x9fc00, E820RAM},
		{0x9fc00, 0x400, E820Reserved},
		{0xe0000, 0x20000, E820Reserved},
		{0x100000, 3<<30 - 0x100000, E820RAM},
		{4 << 30, 1 << 30, E820RAM},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("LinuxE820 = %+v, want %+v", got, want)
	}
	for _, bad := range [][]MemRange{nil, {{0x1000, 1 << 30}}, {{0, 1 << 20}}, {{0, 1 << 30}, {1 << 29, 1 << 20}}, {{0, 1 << 30}, {2 << 30, 0}}} {
		if _, err := LinuxE820(bad); err == nil {
			t.Errorf("LinuxE820(%v) = nil error", bad)
		}
	}
}

func TestBootParams(t *testing.T) {
	k, err := ParseBzImage(goodImage())
	if err != nil {
		t.Fatal(err)
	}
	e820, _ := LinuxE820([]MemRange{{0, 256 << 20}})
	bp, err := k.BootParams(BootConfig{CmdlineAddr: 0x20000, InitrdAddr: 0x5000000, InitrdSize: 12345, E820: e820, RSDPAddr: 0xe0000})
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	checks := []struct {
		name      string
		got, want uint64
	}{
		{"size", uint64(len(bp)), BootParamsSize},
		{"magic", uint64(le.Uint32(bp[hdrMagic:])), SetupHeaderMagic},
		{"boot flag", uint64(le.Uint16(bp[hdrBootFlag:])), BootFlag},
		{"version", uint64(le.Uint16(bp[hdrVersion:])), 0x020f},
		{"type_of_loader", uint64(bp[hdrTypeOfLoader]), 0xff},
		{"cmd_line_ptr", uint64(le.Uint32(bp[hdrCmdLinePtr:])), 0x20000},
		{"ext_cmd_line_ptr", uint64(le.Uint32(bp[bpExtCmdLinePtr:])), 0},
		{"ramdisk_image", uint64(le.Uint32(bp[hdrRamdiskImage:])), 0x5000000},
		{"ramdisk_size", uint64(le.Uint32(bp[hdrRamdiskSize:])), 12345},
		{"acpi_rsdp_addr", le.Uint64(bp[bpACPIRSDPAddr:]), 0xe0000},
		{"e820_entries", uint64(bp[bpE820Entries]), uint64(len(e820))},
		{"beyond header", uint64(bp[0x26c]), 0},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("zero page %s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
	back, err := ParseE820(bp)
	if err != nil || !reflect.DeepEqual(back, e820) {
		t.Errorf("ParseE820 = %+v, %v; want %+v", back, err, e820)
	}
	// A high command line and initrd use the ext_ fields.
	bp, err = k.BootParams(BootConfig{CmdlineAddr: 0x1_2000_0000, InitrdAddr: 0x1_4000_0000, InitrdSize: 1 << 20, E820: e820})
	if err != nil {
		t.Fatal(err)
	}
	if le.Uint32(bp[bpExtCmdLinePtr:]) != 1 || le.Uint32(bp[hdrCmdLinePtr:]) != 0x2000_0000 || le.Uint32(bp[bpExtRamdiskImage:]) != 1 {
		t.Errorf("high addresses not split into ext_ fields")
	}
	bad := []BootConfig{
		{CmdlineAddr: 0x20000},
		{E820: e820},
		{CmdlineAddr: 0x20000, E820: e820, InitrdSize: 5},
		{CmdlineAddr: 0x20000, E820: append(e820, E820Entry{0x1000, 0x1000, E820RAM})},
		{CmdlineAddr: 0x20000, E820: make([]E820Entry, MaxE820Entries+1)},
	}
	for i, c := range bad {
		if _, err := k.BootParams(c); err == nil {
			t.Errorf("BootParams(bad config %d) = nil error", i)
		}
	}
	k.Header.XLoadFlags &^= XLFCanBeLoadedAbove4G
	if _, err := k.BootParams(BootConfig{CmdlineAddr: 0x20000, InitrdAddr: 0x1_4000_0000, InitrdSize: 1, E820: e820}); err == nil {
		t.Errorf("initrd above 4 GiB accepted for a kernel without XLF_CAN_BE_LOADED_ABOVE_4G")
	}
}

// FuzzParseBzImage feeds arbitrary images to the parser: it must never panic,
// and what it accepts must be self-consistent and produce a zero page.
func FuzzParseBzImage(f *testing.F) {
	f.Add(goodImage())
	f.Add(synthImage(0x020c, XLFKernel64, 16))
	f.Add(synthImage(0x0200, 0, 16))
	f.Add([]byte("HdrS"))
	e820, _ := LinuxE820([]MemRange{{0, 64 << 20}})
	f.Fuzz(func(t *testing.T, img []byte) {
		k, err := ParseBzImage(img)
		if err != nil {
			if !errors.Is(err, ErrBadKernel) {
				t.Fatalf("error %v does not wrap ErrBadKernel", err)
			}
			return
		}
		if len(k.Setup)+len(k.Kernel) != len(img) || uint64(len(k.Kernel)) < uint64(k.Header.SysSize)*16 {
			t.Fatalf("accepted image splits into %d+%d bytes of %d, syssize %d", len(k.Setup), len(k.Kernel), len(img), k.Header.SysSize)
		}
		if k.MemoryEnd(0x100000) < 0x100000+uint64(len(k.Kernel)) {
			t.Fatalf("MemoryEnd below the image's end")
		}
		bp, err := k.BootParams(BootConfig{CmdlineAddr: 0x20000, E820: e820})
		if err != nil || len(bp) != BootParamsSize {
			t.Fatalf("BootParams of an accepted image = %d bytes, %v", len(bp), err)
		}
	})
}
