package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
)

// Setup header offsets (internal/linuxtest), as the tests check them.
const (
	tSetupSects = linuxtest.SetupSects
	tSysSize    = linuxtest.SysSize
	tBootFlag   = linuxtest.BootFlag
	tJump       = linuxtest.Jump
	tMagic      = linuxtest.Magic
	tVersion    = linuxtest.Version
	tLoader     = linuxtest.Loader
	tLoadFlags  = linuxtest.LoadFlags
	tRamdisk    = linuxtest.Ramdisk
	tRamdiskLen = linuxtest.RamdiskLen
	tCmdline    = linuxtest.Cmdline
	tInitrdMax  = linuxtest.InitrdMax
	tAlign      = linuxtest.Align
	tXLoadFlags = linuxtest.XLoadFlags
	tCmdlineMax = linuxtest.CmdlineMax
	tPref       = linuxtest.Pref
	tInitSize   = linuxtest.InitSize
)

// testKernel builds the stand-in bzImage (linuxtest.Kernel).
var testKernel = linuxtest.Kernel

// Guest code fragments (64-bit, CPL0).
var (
	// out8 port, imm: mov dx, port; mov al, imm; out dx, al
	codeCOM1 = func(s string) []byte {
		b := []byte{0x66, 0xba, 0xf8, 0x03}
		for _, c := range []byte(s) {
			b = append(b, 0xb0, c, 0xee)
		}
		return b
	}
	// mov al, [rsi+0x210] (type_of_loader); out dx, al (dx = COM1)
	codeLoaderType = []byte{0x66, 0xba, 0xf8, 0x03, 0x8a, 0x86, 0x10, 0x02, 0x00, 0x00, 0xee}
	// mov dx, 0x604; mov ax, SLP_TYP 5 | SLP_EN; out dx, ax
	codePowerOff = []byte{0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef}
	// mov al, 0xfe; out 0x64, al
	codeKbdReset = []byte{0xb0, 0xfe, 0xe6, 0x64}
	// ud2 (no IDT: a triple fault)
	codeUD2 = []byte{0x0f, 0x0b}
	// wait for a received byte and echo it: poll LSR.DR, in RBR, out THR
	codeEcho = testutil.SerialEcho()
	// hlt; jmp back to hlt
	codeHalt = []byte{0xf4, 0xeb, 0xfd}
	// cli; hlt; jmp back to hlt: how Linux's stop_this_cpu ends
	codeCLIHalt = []byte{0xfa, 0xf4, 0xeb, 0xfd}
	// sti; hlt; jmp back to hlt: an idle loop waiting for interrupts
	codeIdle = []byte{0xfb, 0xf4, 0xeb, 0xfd}
)

func concat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// writeTemp writes b to a new file in dir.
func writeTemp(t *testing.T, dir, name string, b []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// linuxConfig is a Linux machine with the test kernel running code.
func linuxConfig(t *testing.T, code []byte) Config {
	dir := t.TempDir()
	return Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: writeTemp(t, dir, "bzImage", testKernel(code, 0x100000))}}
}

func TestLinuxMachineSetup(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	initrd := bytes.Repeat([]byte("initrd!\n"), 40000) // 320000 bytes
	cfg := Config{
		MemSize: 64 << 20, CPUs: 2,
		Linux: &LinuxConfig{
			Kernel:  writeTemp(t, dir, "bzImage", testKernel(codeHalt, 0x100000)),
			Initrd:  writeTemp(t, dir, "initrd", initrd),
			Cmdline: "console=ttyS0 hello=world",
		},
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	mem := m.Memory()
	read := func(gpa, n uint64) []byte {
		b, err := mem.Slice(gpa, n)
		if err != nil {
			t.Fatalf("read %#x+%d: %v", gpa, n, err)
		}
		return b
	}
	le := binary.LittleEndian
	bp := read(linuxBootParamsAddr, arch.BootParamsSize)
	if got := le.Uint32(bp[tMagic:]); got != arch.SetupHeaderMagic {
		t.Errorf("zero page header magic %#x", got)
	}
	if bp[tLoader] != 0xff {
		t.Errorf("type_of_loader = %#x, want 0xff", bp[tLoader])
	}
	cmdAddr := uint64(le.Uint32(bp[tCmdline:]))
	cmd := read(cmdAddr, uint64(len(cfg.Linux.Cmdline)+1))
	if string(cmd) != cfg.Linux.Cmdline+"\x00" {
		t.Errorf("command line at %#x = %q, want %q", cmdAddr, cmd, cfg.Linux.Cmdline)
	}
	rdAddr, rdLen := uint64(le.Uint32(bp[tRamdisk:])), uint64(le.Uint32(bp[tRamdiskLen:]))
	if rdLen != uint64(len(initrd)) || rdAddr%arch.PageSize != 0 || rdAddr+rdLen > 64<<20 || rdAddr < 0x1000000+0x100000 {
		t.Errorf("initrd at %#x, %d bytes: want page-aligned, %d bytes, above the kernel, inside RAM", rdAddr, rdLen, len(initrd))
	} else if !bytes.Equal(read(rdAddr, rdLen), initrd) {
		t.Errorf("initrd bytes in guest memory differ from the file")
	}
	e820, err := arch.ParseE820(bp)
	if err != nil {
		t.Fatal(err)
	}
	wantE820 := []arch.E820Entry{
		{Addr: 0, Size: 0x9fc00, Type: arch.E820RAM},
		{Addr: 0x9fc00, Size: 0x400, Type: arch.E820Reserved},
		{Addr: 0xe0000, Size: 0x20000, Type: arch.E820Reserved},
		{Addr: 0x100000, Size: 63 << 20, Type: arch.E820RAM},
	}
	if !reflect.DeepEqual(e820, wantE820) {
		t.Errorf("e820 = %+v, want %+v", e820, wantE820)
	}
	rsdp := le.Uint64(bp[0x70:])
	if rsdp != linuxACPIAddr || string(read(rsdp, 8)) != "RSD PTR " {
		t.Errorf("acpi_rsdp_addr = %#x (%q), want the RSDP at %#x", rsdp, read(rsdp, 8), linuxACPIAddr)
	}
	k, _ := arch.ParseBzImage(testKernel(codeHalt, 0x100000))
	if !bytes.Equal(read(linuxKernelAddr, uint64(len(k.Kernel))), k.Kernel) {
		t.Errorf("kernel not at 1 MiB")
	}

	// vCPU 0 at the 64-bit entry in long mode, RSI = zero page.
	c0 := m.vcpus[0].cpu
	regs, _ := c0.Regs()
	sregs, _ := c0.Sregs()
	if regs.RIP != linuxKernelAddr+0x200 || regs.RSI != linuxBootParamsAddr || regs.RFLAGS&arch.RFLAGSIF != 0 {
		t.Errorf("vCPU 0 RIP %#x RSI %#x RFLAGS %#x; want 0x100200, %#x, interrupts off", regs.RIP, regs.RSI, regs.RFLAGS, linuxBootParamsAddr)
	}
	if sregs.CS.Selector != 0x10 || sregs.CS.L != 1 || sregs.DS.Selector != 0x18 || sregs.SS.Selector != 0x18 {
		t.Errorf("segments CS %#x (L=%d) DS %#x SS %#x; want __BOOT_CS 0x10 64-bit, __BOOT_DS 0x18", sregs.CS.Selector, sregs.CS.L, sregs.DS.Selector, sregs.SS.Selector)
	}
	if sregs.CR0&(arch.CR0PE|arch.CR0PG) != arch.CR0PE|arch.CR0PG || sregs.CR4&arch.CR4PAE == 0 || sregs.EFER&(arch.EFERLME|arch.EFERLMA) != arch.EFERLME|arch.EFERLMA {
		t.Errorf("CR0 %#x CR4 %#x EFER %#x: not long mode", sregs.CR0, sregs.CR4, sregs.EFER)
	}
	for _, gva := range []uint64{0, linuxKernelAddr + 0x200, rdAddr, 3<<30 - 1, 4<<30 - 1} {
		if gpa, err := mem.Translate(sregs.CR3, gva); err != nil || gpa != gva {
			t.Errorf("page tables map %#x to %#x, %v; want identity", gva, gpa, err)
		}
	}
	// The GDT descriptors are what the segment registers say.
	gdt := read(sregs.GDT.Base, uint64(sregs.GDT.Limit)+1)
	if got, want := le.Uint64(gdt[0x10:]), arch.Descriptor(sregs.CS); got != want {
		t.Errorf("GDT[0x10] = %#x, want %#x", got, want)
	}
	for i, v := range m.vcpus {
		mp, _ := v.cpu.MPState()
		want := uint32(arch.MPStateRunnable)
		if i > 0 {
			want = arch.MPStateUninitialized
		}
		if mp.State != want {
			t.Errorf("vCPU %d MP state %d, want %d", i, mp.State, want)
		}
		l, _ := v.cpu.LAPIC()
		if l.DeliveryMode(arch.LAPICRegLINT0) != arch.LVTDeliveryExtINT || l.DeliveryMode(arch.LAPICRegLINT1) != arch.LVTDeliveryNMI {
			t.Errorf("vCPU %d LINT0 %#x LINT1 %#x: want ExtINT and NMI", i, l.Reg(arch.LAPICRegLINT0), l.Reg(arch.LAPICRegLINT1))
		}
		msrs, err := v.cpu.MSRs([]uint32{msrMiscEnable, msrMTRRDefType})
		if err != nil || msrs[0].Data&miscEnableFastStr == 0 || msrs[1].Data != mtrrDefEnable|mtrrTypeWriteBack {
			t.Errorf("vCPU %d MSRs %+v, %v: want fast strings and MTRR default write-back", i, msrs, err)
		}
		cpuid, err := v.cpu.CPUID()
		if err != nil {
			t.Fatal(err)
		}
		var sawKVM bool
		for _, e := range cpuid {
			switch e.Function {
			case 1:
				if id := e.EBX >> 24; id != uint32(i) {
					t.Errorf("vCPU %d CPUID.1 APIC id %d", i, id)
				}
			case arch.KVMCPUIDSignature:
				var sig [12]byte
				le.PutUint32(sig[0:], e.EBX)
				le.PutUint32(sig[4:], e.ECX)
				le.PutUint32(sig[8:], e.EDX)
				sawKVM = string(sig[:9]) == "KVMKVMKVM"
			}
		}
		if !sawKVM {
			t.Errorf("vCPU %d CPUID lacks the KVM signature leaf", i)
		}
	}
}

// runLinux runs cfg until it ends (20 s at most).
func runLinux(t *testing.T, cfg Config) (Result, error) {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return m.Run(ctx)
}

// TestLinuxEntryPowerOff runs a stand-in kernel through the real entry path
// (long mode at the 64-bit entry, zero page in RSI): it prints to COM1,
// reports type_of_loader from the zero page and powers off through ACPI.
func TestLinuxEntryPowerOff(t *testing.T) {
	requireKVM(t)
	var out testutil.Buffer
	cfg := linuxConfig(t, concat(codeCOM1("hi "), codeLoaderType, codePowerOff, codeHalt))
	cfg.Console = &out
	cfg.CPUs = 2 // vCPU 1 waits for a SIPI that never comes; Run must still end
	res, err := runLinux(t, cfg)
	if err != nil {
		t.Fatalf("Run = %v", err)
	}
	if res.End != EndPowerOff || !strings.Contains(res.Detail, "S5") {
		t.Errorf("Run = %+v, want powered off by ACPI S5", res)
	}
	if got := out.String(); got != "hi \xff" {
		t.Errorf("console %q, want %q", got, "hi \xff")
	}
}

func TestLinuxKeyboardReset(t *testing.T) {
	requireKVM(t)
	res, err := runLinux(t, linuxConfig(t, concat(codeKbdReset, codeHalt)))
	if err != nil || res.End != EndReboot || !strings.Contains(res.Detail, "keyboard controller") {
		t.Errorf("Run = %+v, %v; want rebooted by the keyboard controller", res, err)
	}
}

func TestLinuxTripleFault(t *testing.T) {
	requireKVM(t)
	res, err := runLinux(t, linuxConfig(t, concat(codeUD2)))
	if err != nil || res.End != EndTripleFault || !strings.Contains(res.Detail, "#UD") {
		t.Errorf("Run = %+v, %v; want a triple fault after #UD", res, err)
	}
}

// TestLinuxHalt: a guest whose every vCPU halts with interrupts disabled
// (Linux's `halt`) ends the run with EndHalt after two checks in a row, with
// one vCPU and with an application processor that was never started.
func TestLinuxHalt(t *testing.T) {
	requireKVM(t)
	for _, cpus := range []int{1, 2} {
		var out testutil.Buffer
		cfg := linuxConfig(t, concat(codeCOM1("bye"), codeCLIHalt))
		cfg.Console, cfg.CPUs = &out, cpus
		m, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		m.haltEvery = 100 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		start := time.Now()
		res, err := m.Run(ctx)
		took := time.Since(start)
		cancel()
		m.Close()
		want := "the vCPU halted with interrupts disabled (vCPU 0 at RIP 0x"
		if cpus == 2 {
			want = "1 of 2 vCPUs halted with interrupts disabled, 1 never started (vCPU 0 at RIP 0x"
		}
		if err != nil || res.End != EndHalt || !strings.Contains(res.Detail, want) {
			t.Errorf("%d vCPUs: Run = %+v, %v; want EndHalt with %q", cpus, res, err, want)
		}
		if out.String() != "bye" {
			t.Errorf("%d vCPUs: console %q, want %q", cpus, out.String(), "bye")
		}
		// Two checks 100 ms apart (a loaded host stretches them; had the
		// halt gone unseen, the context would have ended the run).
		if took < 2*m.haltEvery {
			t.Errorf("%d vCPUs: the halt ended the run after %v, before two checks %v apart", cpus, took, m.haltEvery)
		}
	}
}

// TestLinuxIdleIsNotHalt: a guest halted with interrupts enabled is idle,
// not halted: the run goes on until its context ends. So does a guest with
// one vCPU halted for good and another idle.
func TestLinuxIdleIsNotHalt(t *testing.T) {
	requireKVM(t)
	for _, tt := range []struct {
		name string
		code []byte
		cpus int
	}{
		{"idle", codeIdle, 1},
		// vCPU 0 starts vCPU 1 (INIT, SIPI to a real-mode sti; hlt loop) and
		// halts with interrupts disabled; vCPU 1 stays idle.
		{"one halted, one idle", concat(
			[]byte{0xbb, 0x10, 0x03, 0xe0, 0xfe, 0xc7, 0x03, 0, 0, 0, 1},
			[]byte{0xbb, 0x00, 0x03, 0xe0, 0xfe, 0xc7, 0x03, 0x00, 0x45, 0, 0},
			[]byte{0xc7, 0x03, 0x08, 0x46, 0, 0},
			codeCLIHalt), 2},
	} {
		cfg := linuxConfig(t, tt.code)
		cfg.CPUs = tt.cpus
		m, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Memory().Write(0x8000, codeIdle); err != nil {
			t.Fatal(err)
		}
		m.haltEvery = 50 * time.Millisecond
		ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
		res, err := m.Run(ctx)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) || res.End != EndNone {
			t.Errorf("%s: Run = %+v, %v; want it to run until the context ends", tt.name, res, err)
		}
		if tt.cpus == 2 {
			// vCPU 1 did start: its state is readable now that Run is over.
			var mp arch.MPState
			if err := m.OnVCPU(1, func(c *arch.VCPU) (err error) { mp, err = c.MPState(); return }); err != nil || mp.State == arch.MPStateUninitialized {
				t.Errorf("%s: vCPU 1 state %d, %v; want it started", tt.name, mp.State, err)
			}
		}
		m.Close()
	}
}

// TestLinuxHaltCheckAndPause: halt checks run under the pause lock, so a
// controller's Pause never finds the machine paused by one (ErrPaused) and
// a check never resumes a machine the controller paused.
func TestLinuxHaltCheckAndPause(t *testing.T) {
	requireKVM(t)
	m, err := New(linuxConfig(t, codeIdle))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.haltEvery = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	for i := 0; i < 200; i++ {
		if _, err := m.Pause(); err != nil {
			t.Fatalf("Pause %d: %v", i, err)
		}
		time.Sleep(2 * time.Millisecond) // checks come and must leave it paused
		var rflags uint64
		if err := m.OnVCPU(0, func(c *arch.VCPU) error { r, err := c.Regs(); rflags = r.RFLAGS; return err }); err != nil {
			t.Fatalf("OnVCPU %d: %v", i, err)
		}
		if _, err := m.Resume(); err != nil {
			t.Fatalf("Resume %d: %v", i, err)
		}
		if i == 199 && rflags&arch.RFLAGSIF == 0 {
			t.Errorf("RFLAGS %#x: the idle guest should have interrupts enabled", rflags)
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want it to run until cancelled", err)
	}
}

func TestGuestHalted(t *testing.T) {
	halted := vcpuStop{state: arch.MPStateHalted, rflags: arch.RFLAGSReserved, rip: 0x1234}
	idle := vcpuStop{state: arch.MPStateHalted, rflags: arch.RFLAGSReserved | arch.RFLAGSIF}
	running := vcpuStop{state: arch.MPStateRunnable, rflags: arch.RFLAGSReserved}
	unstarted := vcpuStop{state: arch.MPStateUninitialized}
	nmi := halted
	nmi.pending = true
	for _, tt := range []struct {
		name string
		vs   []vcpuStop
		want string // "" : not halted
	}{
		{"halted", []vcpuStop{halted}, "the vCPU halted with interrupts disabled (vCPU 0 at RIP 0x1234)"},
		{"all halted", []vcpuStop{halted, halted}, "2 of 2 vCPUs halted with interrupts disabled (vCPU 0 at RIP 0x1234)"},
		{"AP never started", []vcpuStop{halted, unstarted, unstarted}, "1 of 3 vCPUs halted with interrupts disabled, 2 never started (vCPU 0 at RIP 0x1234)"},
		{"AP halted", []vcpuStop{unstarted, halted}, "1 of 2 vCPUs halted with interrupts disabled, 1 never started (vCPU 1 at RIP 0x1234)"},
		{"idle", []vcpuStop{idle}, ""},
		{"one idle", []vcpuStop{halted, idle}, ""},
		{"one running", []vcpuStop{running, halted}, ""},
		{"NMI pending", []vcpuStop{nmi}, ""},
		{"none halted", []vcpuStop{unstarted, unstarted}, ""},
		{"no vCPUs", nil, ""},
	} {
		ok, detail := guestHalted(tt.vs)
		if ok != (tt.want != "") || detail != tt.want {
			t.Errorf("%s: guestHalted = %v, %q; want %q", tt.name, ok, detail, tt.want)
		}
	}
}

// TestLinuxSerialInput feeds a byte through ConsoleIn: the guest polls the
// line status, reads it and echoes it.
func TestLinuxSerialInput(t *testing.T) {
	requireKVM(t)
	var out testutil.Buffer
	cfg := linuxConfig(t, concat(codeEcho, codeEcho, codePowerOff, codeHalt))
	cfg.Console = &out
	pr, pw := io.Pipe()
	defer pw.Close()
	cfg.Linux.ConsoleIn = pr
	go func() {
		time.Sleep(50 * time.Millisecond)
		pw.Write([]byte("ab"))
	}()
	res, err := runLinux(t, cfg)
	if err != nil || res.End != EndPowerOff {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	if out.String() != "ab" {
		t.Errorf("echo %q, want %q", out.String(), "ab")
	}
}

// TestLinuxWideCOM1Access: a guest's 4- and 2-byte accesses to COM1 do not
// stop the machine: they work byte by byte, as on an ISA bus.
func TestLinuxWideCOM1Access(t *testing.T) {
	requireKVM(t)
	var out testutil.Buffer
	code := concat(
		[]byte{0x66, 0xba, 0xff, 0x03},   // mov dx, 0x3ff (SCR)
		[]byte{0xb8, '!', 'B', 'C', 'D'}, // mov eax, "!BCD"
		[]byte{0xef},                     // out dx, eax: SCR = '!', the rest past COM1
		[]byte{0xed},                     // in eax, dx: '!', then all ones
		[]byte{0x66, 0xba, 0xf8, 0x03},   // mov dx, 0x3f8
		[]byte{0xee},                     // out dx, al
		[]byte{0xc1, 0xe8, 0x08},         // shr eax, 8
		[]byte{0xee},                     // out dx, al
		[]byte{0x66, 0xb8, 'B', 0x00},    // mov ax, "B\0"
		[]byte{0x66, 0xef},               // out dx, ax: THR 'B', IER 0
		codePowerOff, codeHalt)
	cfg := linuxConfig(t, code)
	cfg.Console = &out
	res, err := runLinux(t, cfg)
	if err != nil || res.End != EndPowerOff {
		t.Fatalf("Run = %+v, %v; want the guest to power off", res, err)
	}
	if got := out.String(); got != "!\xffB" {
		t.Errorf("console %q, want %q", got, "!\xffB")
	}
}

// TestLinuxUnknownPorts checks that a Linux machine's unknown ports read as
// all ones and that writes to them are ignored (a payload machine stops).
func TestLinuxUnknownPorts(t *testing.T) {
	requireKVM(t)
	var out testutil.Buffer
	code := concat(
		[]byte{0xe6, 0x80},                   // out 0x80, al (POST code)
		[]byte{0x66, 0xba, 0xf8, 0x02, 0xec}, // mov dx, 0x2f8; in al, dx (COM2: absent)
		[]byte{0x66, 0xba, 0xf8, 0x03, 0xee}, // mov dx, 0x3f8; out dx, al
		codePowerOff, codeHalt)
	cfg := linuxConfig(t, code)
	cfg.Console = &out
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	res, err := m.Run(context.Background())
	if err != nil || res.End != EndPowerOff {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	if out.String() != "\xff" {
		t.Errorf("COM2 read %q, want 0xff", out.String())
	}
	if n := m.linux.unknown.count(0x80); n != 1 {
		t.Errorf("port 0x80 counted %d accesses, want 1", n)
	}
}

func TestLinuxConfigErrors(t *testing.T) {
	dir := t.TempDir()
	good := writeTemp(t, dir, "bzImage", testKernel(codeHalt, 0x100000))
	bad := testKernel(codeHalt, 0x100000)
	copy(bad[tMagic:], "NOPE")
	badMagic := writeTemp(t, dir, "badmagic", bad)
	trunc := writeTemp(t, dir, "truncated", testKernel(codeHalt, 0x100000)[:0x1000])
	old := testKernel(codeHalt, 0x100000)
	binary.LittleEndian.PutUint16(old[tVersion:], 0x020a)
	tooOld := writeTemp(t, dir, "old", old)
	no64 := testKernel(codeHalt, 0x100000)
	binary.LittleEndian.PutUint16(no64[tXLoadFlags:], 0)
	no64Path := writeTemp(t, dir, "no64", no64)
	bigInitrd := filepath.Join(dir, "big-initrd")
	f, err := os.Create(bigInitrd)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(64 << 20)
	f.Close()
	midInitrd := filepath.Join(dir, "mid-initrd")
	f, _ = os.Create(midInitrd)
	f.Truncate(40 << 20)
	f.Close()
	hugeKernel := writeTemp(t, dir, "huge", testKernel(codeHalt, 200<<20))
	ro := writeTemp(t, dir, "disk.img", make([]byte, 1<<20))
	os.Chmod(ro, 0o444)
	absent := filepath.Join(dir, "absent-kvm")
	tests := []struct {
		name   string
		cfg    Config
		errSub string
	}{
		{"payload and kernel", Config{MemSize: 64 << 20, Payload: &PayloadConfig{Name: "hello"}, Linux: &LinuxConfig{Kernel: good}}, "both a payload"},
		{"neither", Config{MemSize: 64 << 20}, "no payload given and no Linux kernel"},
		{"initrd without kernel", Config{MemSize: 64 << 20, Payload: &PayloadConfig{Name: "hello"}, Linux: &LinuxConfig{Initrd: good}}, "no kernel given"},
		{"options for Linux", Config{MemSize: 64 << 20, Payload: &PayloadConfig{Options: map[string]string{"a": "1"}}, Linux: &LinuxConfig{Kernel: good}}, "payload options"},
		{"missing kernel", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: filepath.Join(dir, "nope")}}, "no such file"},
		{"bad magic", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: badMagic}}, `no setup header signature "HdrS"`},
		{"truncated", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: trunc}}, "truncated"},
		{"protocol too old", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: tooOld}}, "too old"},
		{"no 64-bit entry", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: no64Path}}, "no 64-bit entry point"},
		{"memory too small", Config{MemSize: 32 << 20, Linux: &LinuxConfig{Kernel: hugeKernel}}, "too small for kernel"},
		{"initrd larger than memory", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Initrd: bigInitrd}}, "larger than guest memory"},
		{"initrd does not fit", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Initrd: midInitrd}}, "does not fit"},
		{"missing initrd", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Initrd: filepath.Join(dir, "nope")}}, "initrd"},
		{"command line too long", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Cmdline: strings.Repeat("x", 3000)}}, "at most 2047"},
		{"command line with newline", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Cmdline: "a\nb"}}, "newline"},
		{"read-only disk for writing", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Disks: []DiskConfig{{Path: ro}}}}, "cannot be opened for writing"},
		{"missing disk", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Disks: []DiskConfig{{Path: filepath.Join(dir, "nodisk")}}}}, "no such file"},
		{"missing tap", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Nets: []NetConfig{{Tap: "ustest-none0"}}}}, "ustest-none0"},
		{"too many devices", Config{MemSize: 64 << 20, Linux: &LinuxConfig{Kernel: good, Disks: make([]DiskConfig, 5)}}, "room for 4 virtio devices"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			cfg.KVMDevice = absent // configuration errors come before KVM
			m, err := New(cfg)
			if err == nil {
				m.Close()
				t.Fatalf("New succeeded, want an error containing %q", tc.errSub)
			}
			if !strings.Contains(err.Error(), tc.errSub) || errors.Is(err, arch.ErrNoKVM) {
				t.Errorf("New = %q, want it to contain %q (and not be about KVM)", err, tc.errSub)
			}
		})
	}
}

// TestLinuxStateRoundTrip captures a Linux machine (serial port state
// included), encodes and decodes it, and restores it.
func TestLinuxStateRoundTrip(t *testing.T) {
	requireKVM(t)
	cfg := linuxConfig(t, concat(codeCOM1("x"), codeHalt))
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	u := m.linux.uart.Save()
	u.SCR = 0x5a
	u.RX = append(u.RX, 'q')
	if err := m.linux.uart.Restore(u); err != nil {
		t.Fatal(err)
	}
	// Power button and RTC enabled; SCI_EN.
	devices.RestorePlatform(m.linux.pm, m.linux.kbd, devices.PlatformState{ACPIEnable: 0x0120, ACPIControl: 0x0001, KbdWriteOutput: true})
	m.halted.Store(true) // never ran: state may be read directly
	st, err := m.CaptureState()
	if err != nil {
		t.Fatal(err)
	}
	if st.Devices.UART == nil || st.Devices.UART.SCR != 0x5a || string(st.Devices.UART.RX) != "q" {
		t.Fatalf("captured UART state %+v", st.Devices.UART)
	}
	b, err := st.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var back MachineState
	if err := back.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back.Devices.UART, st.Devices.UART) {
		t.Errorf("UART state after encoding %+v, want %+v", back.Devices.UART, st.Devices.UART)
	}
	wantPlatform := devices.PlatformState{ACPIEnable: 0x0120, ACPIControl: 0x0001, KbdWriteOutput: true}
	if back.Devices.Platform == nil || *back.Devices.Platform != wantPlatform {
		t.Errorf("platform state after encoding %+v, want %+v", back.Devices.Platform, wantPlatform)
	}
	r, err := Restore(RestoreConfig{}, &back, bytes.NewReader(m.Memory().Backing()))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.linux == nil {
		t.Fatalf("restored machine is not a Linux machine")
	}
	if u := r.linux.uart.Save(); u.SCR != 0x5a || string(u.RX) != "q" {
		t.Errorf("restored machine's serial port: %+v", u)
	}
	if p := devices.SavePlatform(r.linux.pm, r.linux.kbd); p.ACPIEnable != 0x0120 || p.ACPIControl != 0x0001 || !p.KbdWriteOutput {
		t.Errorf("restored ACPI PM enable %#x control %#x, keyboard write-output %v; want 0x120, 0x1, true",
			p.ACPIEnable, p.ACPIControl, p.KbdWriteOutput)
	}
	if _, err := r.mem.Slice(0, mmu.PageSize); err != nil {
		t.Error(err)
	}
}

// TestLinuxVirtioMMIO attaches a virtio-blk disk: the command line names it,
// and the stand-in kernel reads its magic value ("virt") through the MMIO
// bus, then the first word past the last device (nothing there: all ones).
func TestLinuxVirtioMMIO(t *testing.T) {
	requireKVM(t)
	read := func(addr uint32) []byte { // mov ebx, addr; mov eax, [rbx]; four bytes to COM1
		b := []byte{0xbb, byte(addr), byte(addr >> 8), byte(addr >> 16), byte(addr >> 24), 0x8b, 0x03, 0x66, 0xba, 0xf8, 0x03, 0xee}
		for i := 0; i < 3; i++ {
			b = append(b, 0xc1, 0xe8, 0x08, 0xee)
		}
		return b
	}
	var out testutil.Buffer
	cfg := linuxConfig(t, concat(read(VirtioMMIOBase), read(VirtioMMIOBase+0x1000), codePowerOff, codeHalt))
	cfg.Console = &out
	disk := writeTemp(t, t.TempDir(), "disk.img", make([]byte, 1<<20))
	cfg.Linux.Disks = []DiskConfig{{Path: disk, ReadOnly: true}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	cmd, _ := m.Memory().Slice(linuxCmdlineAddr, 200)
	want := DefaultCmdline + " virtio_mmio.device=4K@0xd0000000:5\x00"
	if !bytes.HasPrefix(cmd, []byte(want)) {
		t.Errorf("command line %q, want %q", cmd[:bytes.IndexByte(cmd, 0)+1], want)
	}
	res, err := m.Run(context.Background())
	if err != nil || res.End != EndPowerOff {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	if got := out.String(); got != "virt\xff\xff\xff\xff" {
		t.Errorf("MMIO reads %q, want %q", got, "virt\xff\xff\xff\xff")
	}
	// The device's state is part of the machine's (the guest never set it
	// up: a reset transport).
	st, err := m.CaptureState()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Devices.Virtio) != 1 {
		t.Errorf("captured %d virtio device states, want 1", len(st.Devices.Virtio))
	}
}

// TestLinuxSecondaryCPUStart starts vCPU 1 the way Linux does: INIT and
// SIPI through the boot processor's local APIC. The started processor runs
// real-mode code at the SIPI vector's page, which prints "A" and powers off.
func TestLinuxSecondaryCPUStart(t *testing.T) {
	requireKVM(t)
	const trampoline = 0x8000 // SIPI vector 0x08
	// mov ebx, 0xfee00310; mov dword [rbx], 1<<24 (ICR high: APIC id 1)
	// mov ebx, 0xfee00300; mov dword [rbx], 0x4500 (INIT); mov dword [rbx], 0x4608 (SIPI 0x08)
	bsp := concat(
		[]byte{0xbb, 0x10, 0x03, 0xe0, 0xfe, 0xc7, 0x03, 0, 0, 0, 1},
		[]byte{0xbb, 0x00, 0x03, 0xe0, 0xfe, 0xc7, 0x03, 0x00, 0x45, 0, 0},
		[]byte{0xc7, 0x03, 0x08, 0x46, 0, 0},
		codeHalt)
	// Real mode: mov dx, 0x3f8; mov al, 'A'; out dx, al; mov dx, 0x604; mov ax, 0x3400; out dx, ax; hlt
	ap := []byte{0xba, 0xf8, 0x03, 0xb0, 'A', 0xee, 0xba, 0x04, 0x06, 0xb8, 0x00, 0x34, 0xef, 0xf4, 0xeb, 0xfd}
	var out testutil.Buffer
	cfg := linuxConfig(t, bsp)
	cfg.CPUs, cfg.Console = 2, &out
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Memory().Write(trampoline, ap); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := m.Run(ctx)
	if err != nil || res.End != EndPowerOff || out.String() != "A" {
		t.Errorf("Run = %+v, %v, console %q; want the second vCPU to print A and power off", res, err, out.String())
	}
}

// TestLinuxVirtioInDSDT checks that each virtio device is listed in the
// DSDT the guest finds through the zero page's RSDP.
func TestLinuxVirtioInDSDT(t *testing.T) {
	requireKVM(t)
	cfg := linuxConfig(t, codeHalt)
	dir := t.TempDir()
	cfg.Linux.Disks = []DiskConfig{{Path: writeTemp(t, dir, "a.img", make([]byte, 4096)), ReadOnly: true}, {Path: writeTemp(t, dir, "b.img", make([]byte, 4096))}}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	mem := m.Memory()
	le := binary.LittleEndian
	bp, _ := mem.Slice(linuxBootParamsAddr, arch.BootParamsSize)
	rsdp, _ := mem.Slice(le.Uint64(bp[0x70:]), 36)
	xsdtAddr := le.Uint64(rsdp[24:])
	xsdt, _ := mem.Slice(xsdtAddr, 52)
	fadt, _ := mem.Slice(le.Uint64(xsdt[36:]), 276)
	dsdtHdr, _ := mem.Slice(le.Uint64(fadt[140:]), 36)
	dsdt, _ := mem.Slice(le.Uint64(fadt[140:]), uint64(le.Uint32(dsdtHdr[4:])))
	for i, want := range []struct {
		base uint32
		gsi  byte
	}{{0xd0000000, 5}, {0xd0001000, 6}} {
		name := []byte("VR0" + string(rune('0'+i)))
		at := bytes.Index(dsdt, name)
		if at < 0 {
			t.Fatalf("DSDT lacks device %s", name)
		}
		dev := dsdt[at:min(len(dsdt), at+60)]
		var base [4]byte
		le.PutUint32(base[:], want.base)
		if !bytes.Contains(dev, []byte(arch.VirtioMMIOHID)) || !bytes.Contains(dev, base[:]) || !bytes.Contains(dev, []byte{0x89, 6, 0, 3, 1, want.gsi, 0, 0, 0}) {
			t.Errorf("device %s: % x lacks _HID, base %#x or GSI %d", name, dev, want.base, want.gsi)
		}
	}
}
