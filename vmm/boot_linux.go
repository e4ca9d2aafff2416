package vmm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Guest-physical layout of a Linux machine:
//
//	0x1000     GDT (null, null, 64-bit code 0x10, data 0x18, TSS 0x20)
//	0x7000     boot_params (the zero page); the boot stack grows down below it
//	0x9000     page tables identity-mapping the first 4 GiB with 2 MiB pages
//	0x20000    kernel command line (NUL-terminated)
//	0x9fc00    EBDA (reserved in the e820 map, left empty)
//	0xe0000    ACPI tables, RSDP first (reserved in the e820 map)
//	0x100000   protected-mode kernel; 64-bit entry at 0x100200
//	top        initrd, at the end of RAM below 3 GiB and initrd_addr_max
//	0xd0000000 virtio-mmio devices, 4 KiB each (in the MMIO hole)
//
// The guest finds the virtio-mmio devices in two ways: the ACPI DSDT lists
// each (_HID LNRO0005), which is how Debian's kernel finds them (it is built
// without VIRTIO_MMIO_CMDLINE_DEVICES), and the command line names each
// (virtio_mmio.device=4K@ADDR:GSI) for kernels without ACPI. A kernel with
// both would see each device twice; the second registration fails on the
// busy memory range and the device works once.
const (
	linuxGDTAddr        = 0x1000
	linuxBootParamsAddr = 0x7000
	linuxPageTablesAddr = 0x9000
	linuxPageTablesEnd  = 0x20000
	linuxCmdlineAddr    = 0x20000
	linuxCmdlineMax     = 0x10000 // bytes, NUL included
	linuxACPIAddr       = arch.BIOSAreaStart
	linuxKernelAddr     = 0x100000
	linuxIdentityMap    = 4 << 30
	linuxSelCode        = 0x10 // __BOOT_CS
	linuxSelData        = 0x18 // __BOOT_DS
	linuxSelTSS         = 0x20

	// VirtioMMIOBase is the guest-physical address of the first virtio-mmio
	// device; device i is at VirtioMMIOBase + i*virtio.MMIOSize.
	VirtioMMIOBase = 0xd0000000
	// VirtioFirstGSI is the interrupt line of the first virtio device;
	// device i uses VirtioFirstGSI + i.
	VirtioFirstGSI = 5
	// MaxVirtioDevices bounds the virtio devices of a Linux machine: their
	// GSIs 5..8 are ISA IRQs Linux maps one to one; 9 is the ACPI SCI.
	MaxVirtioDevices = devices.ACPISCI - VirtioFirstGSI

	ioapicID = 0
)

// DefaultCmdline is a Linux guest's kernel command line when the Config
// gives none: the console on COM1, reboots through the keyboard controller
// (which ends the run), a panic reboots at once, and no PCI probing (the
// machine has no PCI bus; virtio devices are virtio-mmio).
const DefaultCmdline = "console=ttyS0 reboot=k panic=-1 pci=off"

// MSRs set for Linux guests.
const (
	msrMiscEnable       = 0x1a0
	miscEnableFastStr   = 1 << 0
	msrMTRRDefType      = 0x2ff
	mtrrDefEnable       = 1 << 11
	mtrrTypeWriteBack   = 6
	linuxMinFreeForBoot = 16 << 20 // RAM the kernel needs beyond its own image and the initrd
)

// linuxGuest is what a Linux machine has beyond a payload machine: the
// kernel, initrd and command line to load, and the devices.
type linuxGuest struct {
	kernel     *arch.BzImage
	cmdline    string
	initrdPath string
	initrdSize uint64
	initrdAddr uint64
	consoleIn  io.Reader // the serial port's input (LinuxConfig.ConsoleIn)

	uart    *devices.UART
	kbd     *devices.I8042
	pm      *devices.ACPIPM
	unknown *unknownPorts
	virtio  []*virtioSlot
	// announcing counts the goroutine announcing the NICs after a
	// restore (Machine.announce); close waits for it.
	announcing sync.WaitGroup
}

// virtioSlot is one virtio device: its backend and, once the machine
// exists, its transport.
type virtioSlot struct {
	name string
	base uint64
	gsi  uint32
	dev  virtio.Device
	t    *virtio.Transport
}

// transportDevice adapts a virtio transport to the MMIO bus.
type transportDevice struct{ t *virtio.Transport }

func (d transportDevice) read(off uint64, data []byte) error  { return d.t.Read(off, data) }
func (d transportDevice) write(off uint64, data []byte) error { return d.t.Write(off, data) }

// close stops the devices: the virtio transports (and their backends and
// goroutines) and the serial reader.
func (g *linuxGuest) close() error {
	g.announcing.Wait() // the machine has stopped: it returns soon
	var errs []error
	for _, s := range g.virtio {
		switch {
		case s.t != nil:
			errs = append(errs, s.t.Close())
		case s.dev != nil:
			errs = append(errs, s.dev.Close())
		}
		s.t, s.dev = nil, nil
	}
	if g.uart != nil {
		g.uart.Stop()
	}
	return errors.Join(errs...)
}

// prepareLinux checks everything about a Linux guest that needs no KVM: the
// kernel image, the initrd's size against guest memory, the command line,
// and the virtio backends (which it opens).
func prepareLinux(cfg Config) (*linuxGuest, error) {
	lc := cfg.Linux
	k, err := arch.LoadBzImage(lc.Kernel)
	if err != nil {
		return nil, err
	}
	g := &linuxGuest{kernel: k, initrdPath: lc.Initrd, consoleIn: lc.ConsoleIn}
	lowEnd := min(cfg.MemSize, uint64(mmu.HoleStart))
	kernelEnd := k.MemoryEnd(linuxKernelAddr)
	if need := roundUp(kernelEnd+linuxMinFreeForBoot, mmu.RegionSize); lowEnd < need {
		return nil, fmt.Errorf("guest memory %s is too small for kernel %s: it needs at least %s (it occupies up to %#x while it starts)",
			option.FormatSize(cfg.MemSize), lc.Kernel, option.FormatSize(need), kernelEnd)
	}
	if lc.Initrd != "" {
		fi, err := os.Stat(lc.Initrd)
		if err != nil {
			return nil, fmt.Errorf("initrd: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("initrd %s is not a regular file", lc.Initrd)
		}
		size := uint64(fi.Size())
		if size == 0 {
			return nil, fmt.Errorf("initrd %s is empty", lc.Initrd)
		}
		if size >= cfg.MemSize {
			return nil, fmt.Errorf("initrd %s (%s) is larger than guest memory (%s)", lc.Initrd, option.FormatSize(size), option.FormatSize(cfg.MemSize))
		}
		top := k.InitrdMax(lowEnd) &^ (arch.PageSize - 1)
		addr := (top - min(top, size)) &^ (arch.PageSize - 1)
		if size > top || addr < kernelEnd+linuxMinFreeForBoot {
			return nil, fmt.Errorf("initrd %s (%s) does not fit in %s of guest memory next to the kernel: it must end below %#x and the kernel needs up to %#x; give the guest at least %s",
				lc.Initrd, option.FormatSize(size), option.FormatSize(cfg.MemSize), top, kernelEnd, option.FormatSize(roundUp(kernelEnd+linuxMinFreeForBoot+size, mmu.RegionSize)))
		}
		g.initrdSize, g.initrdAddr = size, addr
	}
	if len(lc.Disks)+len(lc.Nets) > MaxVirtioDevices {
		return nil, fmt.Errorf("%d disks and %d network interfaces: a Linux machine has room for %d virtio devices", len(lc.Disks), len(lc.Nets), MaxVirtioDevices)
	}
	cmdline := lc.Cmdline
	if cmdline == "" {
		cmdline = DefaultCmdline
	}
	if strings.ContainsAny(cmdline, "\x00\n") {
		return nil, errors.New("kernel command line contains a NUL byte or a newline")
	}
	ok := false
	defer func() {
		if !ok {
			g.close()
		}
	}()
	for i, d := range lc.Disks {
		b, err := virtio.NewBlock(d.Path, d.ReadOnly)
		if err != nil {
			return nil, fmt.Errorf("disk %d: %w", i, err)
		}
		g.addVirtio(fmt.Sprintf("virtio-blk %s", d.Path), b)
	}
	for i, n := range lc.Nets {
		mac := n.MAC
		if mac == nil {
			mac = DefaultMAC(i)
		}
		nd, err := virtio.NewNet(n.Tap, mac)
		if err != nil {
			return nil, fmt.Errorf("network interface %d: %w", i, err)
		}
		g.addVirtio(fmt.Sprintf("virtio-net %s", n.Tap), nd)
	}
	for _, s := range g.virtio {
		cmdline += fmt.Sprintf(" virtio_mmio.device=4K@%#x:%d", s.base, s.gsi)
	}
	if len(cmdline)+1 > linuxCmdlineMax {
		return nil, fmt.Errorf("kernel command line is %d bytes, at most %d fit", len(cmdline), linuxCmdlineMax-1)
	}
	if err := k.CheckCmdline(cmdline); err != nil {
		return nil, fmt.Errorf("kernel %s: %w", lc.Kernel, err)
	}
	g.cmdline = cmdline
	ok = true
	return g, nil
}

// addVirtio adds a virtio backend as the next device.
func (g *linuxGuest) addVirtio(name string, dev virtio.Device) {
	i := len(g.virtio)
	g.virtio = append(g.virtio, &virtioSlot{name: name, base: VirtioMMIOBase + uint64(i)*virtio.MMIOSize, gsi: uint32(VirtioFirstGSI + i), dev: dev})
}

// DefaultMAC is the MAC address of network interface i when the Config
// gives none: locally administered, 02:55:53:00:00:i.
func DefaultMAC(i int) net.HardwareAddr {
	return net.HardwareAddr{0x02, 0x55, 0x53, 0x00, 0x00, byte(i)}
}

// newLinux builds a Linux machine (cfg has passed checkConfig).
func newLinux(cfg Config) (*Machine, error) {
	g, err := prepareLinux(cfg)
	if err != nil {
		return nil, err
	}
	m, err := build(cfg, nil, true)
	if err != nil {
		g.close()
		return nil, err
	}
	m.linux = g
	m.payload = &loadedPayload{}
	if err := m.setDefaultCPUID(); err != nil {
		m.Close()
		return nil, err
	}
	if err := m.setupLinux(); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// irqLine returns a function that sets the level of interrupt line gsi.
func (m *Machine) irqLine(gsi uint32) func(bool) error {
	vm := m.vm
	return func(level bool) error { return vm.IRQLine(gsi, level) }
}

// setupLinux adds the devices, fills guest memory and sets up the vCPUs.
func (m *Machine) setupLinux() error {
	if err := m.addLinuxDevices(); err != nil {
		return err
	}
	if err := m.loadLinux(); err != nil {
		return err
	}
	return m.setupLinuxVCPUs()
}

// addLinuxDevices puts the serial port, keyboard controller, ACPI fixed
// hardware and virtio devices on the buses, and makes both buses lenient.
func (m *Machine) addLinuxDevices() error {
	g := m.linux
	g.unknown = newUnknownPorts()
	m.io.lenient = g.unknown
	m.mmio.lenient = newUnknownMMIO()
	g.uart = devices.NewUART(devices.COM1Port, m.cfg.Console, m.irqLine(devices.COM1IRQ))
	g.kbd = &devices.I8042{OnReset: func(d string) { m.guestEnded(EndReboot, d) }}
	g.pm = &devices.ACPIPM{
		OnPowerOff: func(d string) { m.guestEnded(EndPowerOff, d) },
		OnReset:    func(d string) { m.guestEnded(EndReboot, d) },
	}
	for _, d := range []devices.PortDevice{g.uart, g.kbd, g.pm} {
		if err := m.io.add(d); err != nil {
			return err
		}
	}
	for _, s := range g.virtio {
		line := m.irqLine(s.gsi)
		// virtio-mmio interrupts are edges on ISA lines: pulse the line.
		irq := func() error {
			if err := line(true); err != nil {
				return err
			}
			return line(false)
		}
		s.t = virtio.NewMMIO(s.dev, m.mem, irq)
		if err := m.mmio.add(s.name, s.base, virtio.MMIOSize, transportDevice{s.t}); err != nil {
			return err
		}
	}
	return nil
}

// loadLinux writes the GDT, page tables, command line, ACPI tables, zero
// page, kernel and initrd into guest memory.
func (m *Machine) loadLinux() error {
	g, mem := m.linux, m.mem
	gdt := linuxGDT()
	if err := mem.Write(linuxGDTAddr, gdt); err != nil {
		return err
	}
	tables, _, err := arch.IdentityPageTables(arch.IdentityMapSpec{TablesGPA: linuxPageTablesAddr, MemSize: linuxIdentityMap})
	if err != nil {
		return err
	}
	if linuxPageTablesAddr+len(tables) > linuxPageTablesEnd {
		return fmt.Errorf("page tables of %d bytes do not fit below %#x", len(tables), linuxPageTablesEnd)
	}
	if err := mem.Write(linuxPageTablesAddr, tables); err != nil {
		return err
	}
	if err := mem.Write(linuxCmdlineAddr, append([]byte(g.cmdline), 0)); err != nil {
		return err
	}
	ac := arch.ACPIConfig{
		Base: linuxACPIAddr, CPUs: len(m.vcpus), IOAPICID: ioapicID, SCI: devices.ACPISCI,
		PM1EventPort: devices.ACPIPM1EventPort, PM1ControlPort: devices.ACPIPM1ControlPort,
		ResetPort: devices.ACPIResetPort, ResetValue: devices.ACPIResetValue, S5Type: devices.ACPIS5Type,
	}
	for _, s := range g.virtio {
		ac.VirtioMMIO = append(ac.VirtioMMIO, arch.VirtioMMIODevice{Base: uint32(s.base), Size: virtio.MMIOSize, GSI: s.gsi})
	}
	acpi, err := arch.BuildACPI(ac)
	if err != nil {
		return err
	}
	if uint64(len(acpi.Bytes)) > arch.BIOSAreaEnd-linuxACPIAddr {
		return fmt.Errorf("ACPI tables of %d bytes do not fit in the BIOS area", len(acpi.Bytes))
	}
	if err := mem.Write(linuxACPIAddr, acpi.Bytes); err != nil {
		return err
	}
	var ram []arch.MemRange
	for _, r := range mem.Regions() {
		ram = append(ram, arch.MemRange{GPA: r.GPA, Size: r.Size})
	}
	e820, err := arch.LinuxE820(ram)
	if err != nil {
		return err
	}
	bp, err := g.kernel.BootParams(arch.BootConfig{
		CmdlineAddr: linuxCmdlineAddr, InitrdAddr: g.initrdAddr, InitrdSize: g.initrdSize,
		E820: e820, RSDPAddr: acpi.RSDP,
	})
	if err != nil {
		return err
	}
	if err := mem.Write(linuxBootParamsAddr, bp); err != nil {
		return err
	}
	if err := mem.Write(linuxKernelAddr, g.kernel.Kernel); err != nil {
		return fmt.Errorf("load kernel (%s) at %#x: %w", option.FormatSize(uint64(len(g.kernel.Kernel))), linuxKernelAddr, err)
	}
	if g.initrdPath != "" {
		if err := m.loadInitrd(); err != nil {
			return err
		}
	}
	return nil
}

// loadInitrd reads the initrd straight into guest memory. The file must
// still have the size prepareLinux planned for.
func (m *Machine) loadInitrd() error {
	g := m.linux
	f, err := os.Open(g.initrdPath)
	if err != nil {
		return fmt.Errorf("initrd: %w", err)
	}
	defer f.Close()
	dst, err := m.mem.Slice(g.initrdAddr, g.initrdSize)
	if err != nil {
		return fmt.Errorf("initrd at %#x: %w", g.initrdAddr, err)
	}
	if _, err := io.ReadFull(f, dst); err != nil {
		return fmt.Errorf("read initrd %s: %w (did it change while loading?)", g.initrdPath, err)
	}
	if n, _ := f.Read(make([]byte, 1)); n != 0 {
		return fmt.Errorf("initrd %s grew while loading", g.initrdPath)
	}
	return m.mem.MarkDirty(g.initrdAddr, g.initrdSize)
}

// linuxGDT returns the boot GDT: the 64-bit boot protocol wants flat
// __BOOT_CS (0x10) and __BOOT_DS (0x18) descriptors; a TSS follows so TR
// is valid on VM entry.
func linuxGDT() []byte {
	gdt := []uint64{
		0, 0,
		arch.Descriptor(arch.CodeSegment64(linuxSelCode, 0)),
		arch.Descriptor(arch.DataSegment(linuxSelData, 0)),
	}
	lo, hi := arch.SystemDescriptor(linuxTSS())
	gdt = append(gdt, lo, hi)
	b := make([]byte, 8*len(gdt))
	for i, d := range gdt {
		binary.LittleEndian.PutUint64(b[8*i:], d)
	}
	return b
}

// linuxTSS is a minimal 64-bit TSS at address 0: the guest never switches
// stacks through it before it loads its own.
func linuxTSS() arch.Segment { return arch.TSSSegment(linuxSelTSS, 0, 0x67) }

// setupLinuxVCPUs puts vCPU 0 at the kernel's 64-bit entry and the others
// in wait-for-SIPI; all get MSRs and LAPIC LINT0/LINT1.
func (m *Machine) setupLinuxVCPUs() error {
	for _, v := range m.vcpus {
		if err := v.cpu.SetMSRs([]arch.MSREntry{
			{Index: msrMiscEnable, Data: miscEnableFastStr},
			{Index: msrMTRRDefType, Data: mtrrDefEnable | mtrrTypeWriteBack},
		}); err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
		l, err := v.cpu.LAPIC()
		if err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
		l.SetDeliveryMode(arch.LAPICRegLINT0, arch.LVTDeliveryExtINT)
		l.SetDeliveryMode(arch.LAPICRegLINT1, arch.LVTDeliveryNMI)
		if err := v.cpu.SetLAPIC(l); err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
		if v.id != 0 {
			// Application processors wait for INIT and SIPI from the
			// boot processor, as on a PC.
			if err := v.cpu.SetMPState(arch.MPState{State: arch.MPStateUninitialized}); err != nil {
				return fmt.Errorf("vCPU %d: %w", v.id, err)
			}
			continue
		}
		s, err := v.cpu.Sregs()
		if err != nil {
			return err
		}
		s.CS = arch.CodeSegment64(linuxSelCode, 0)
		ds := arch.DataSegment(linuxSelData, 0)
		s.DS, s.ES, s.FS, s.GS, s.SS = ds, ds, ds, ds, ds
		s.TR = linuxTSS()
		s.GDT = arch.DTable{Base: linuxGDTAddr, Limit: uint16(len(linuxGDT()) - 1)}
		s.IDT = arch.DTable{}
		s.CR0 = arch.CR0PE | arch.CR0MP | arch.CR0ET | arch.CR0NE | arch.CR0WP | arch.CR0PG
		s.CR3 = linuxPageTablesAddr
		s.CR4 = arch.CR4PAE
		s.EFER = arch.EFERLME | arch.EFERLMA | arch.EFERNXE
		if err := v.cpu.SetSregs(s); err != nil {
			return fmt.Errorf("vCPU 0: %w", err)
		}
		err = v.cpu.SetRegs(arch.Regs{
			RIP: m.linux.kernel.Entry64(linuxKernelAddr), RFLAGS: arch.RFLAGSReserved,
			RSI: linuxBootParamsAddr, RSP: linuxBootParamsAddr,
		})
		if err != nil {
			return fmt.Errorf("vCPU 0: %w", err)
		}
	}
	return nil
}
