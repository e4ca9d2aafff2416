package vmm

// A machine's configuration: what every machine has, and its guest (a
// payload or a Linux kernel), with the checks New makes before it touches
// KVM.

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/payload"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Config describes a machine: what every machine has (memory, vCPUs, the
// console, ...) and its guest, which is either a payload (Payload) or a
// Linux kernel (Linux), never both.
type Config struct {
	// KVMDevice is the KVM device node; empty means /dev/kvm.
	KVMDevice string
	// MemSize is guest RAM in bytes, a multiple of 2 MiB.
	MemSize uint64
	// CPUs is the number of vCPUs.
	CPUs int
	// Backing selects anonymous or memfd guest RAM.
	Backing mmu.Backing
	// Console receives the guest's console bytes (nil: discarded).
	Console io.Writer
	// Logger receives device diagnostics (nil: slog.Default()).
	Logger *slog.Logger
	// Affinity, if set, pins vCPU i's thread to host CPU Affinity[i].
	Affinity []int

	// Payload, if set, makes the guest a payload (boot_payload.go).
	Payload *PayloadConfig
	// Linux, if set, makes the guest a Linux kernel (boot_linux.go).
	Linux *LinuxConfig
}

// PayloadConfig is a payload guest: a small long-mode program from package
// vmm/payload (or a flat binary) that talks to the VMM through the debug
// port (vmm/devices).
type PayloadConfig struct {
	// Name is a built-in payload name or a path to a flat binary.
	Name string
	// Options are the payload's options (name → value).
	Options map[string]string
	// OnRecord, if set, is called on the emitting vCPU's thread for every
	// output record. It must not block for long.
	OnRecord func(Record)
	// OnMark, if set, is called for every phase marker.
	OnMark func(cpu int, phase uint32)
	// Guest4K lists guest-physical 2 MiB regions the payload's page tables
	// map with 4 KiB pages instead of one 2 MiB page.
	Guest4K []uint64
}

// LinuxConfig is a Linux guest: a bzImage booted through the 64-bit boot
// protocol (2.12 or later). A Linux machine has a serial port (COM1), a
// keyboard controller that can reset it, ACPI power-off, and the virtio
// devices of Disks and Nets.
type LinuxConfig struct {
	// Kernel is the path of the bzImage.
	Kernel string
	// Initrd is the path of the initial RAM disk (optional).
	Initrd string
	// Cmdline is the kernel command line; empty means DefaultCmdline. A
	// virtio_mmio.device= entry for each virtio device is appended.
	Cmdline string
	// ConsoleIn, if set, is the guest's serial input: its bytes arrive on
	// COM1 (nil: the guest receives nothing).
	ConsoleIn io.Reader
	// Disks are the guest's virtio-blk disks.
	Disks []DiskConfig
	// Nets are the guest's virtio-net interfaces.
	Nets []NetConfig
}

// DiskConfig is a virtio-blk disk backed by a file.
type DiskConfig struct {
	Path     string // the disk image (a regular file or block device)
	ReadOnly bool   // the guest sees a read-only disk; the file is opened read-only
	// Fingerprint, for Restore only, is the disk's fingerprint as the
	// caller knows it (ft/diskrep's replica keeps it up to date): the
	// restore checks the state's against it instead of reading the whole
	// disk (virtio.Block.SetFingerprint). Nil: the disk is read.
	Fingerprint *virtio.Fingerprint
}

// NetConfig is a virtio-net interface backed by an existing tap device.
type NetConfig struct {
	Tap string           // name of the tap device, which must exist
	MAC net.HardwareAddr // the guest's MAC address (nil: DefaultMAC of its index)
}

// checkGuest checks that cfg describes one guest, a payload or a Linux
// kernel, with only the settings that apply to it.
func checkGuest(cfg *Config) error {
	p, l := cfg.Payload, cfg.Linux
	switch {
	case l != nil && l.Kernel == "":
		return errors.New("an initrd, command line, serial input, disks and network interfaces are for Linux guests: no kernel given")
	case p != nil && l != nil && p.Name == "":
		return errors.New("payload options, callbacks and 4 KiB guest regions are for payload guests, not Linux guests")
	case p != nil && l != nil:
		return fmt.Errorf("both a payload (%s) and a Linux kernel (%s) given: a machine runs one guest", p.Name, l.Kernel)
	case l == nil && (p == nil || p.Name == ""):
		return fmt.Errorf("no payload given and no Linux kernel: a machine needs one (built-in payloads: %s)", strings.Join(payload.Names(), ", "))
	}
	return nil
}

// checkConfig validates the parts of cfg every machine needs, before KVM is
// touched, and fills defaults.
func checkConfig(cfg *Config) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.CPUs < 1 || cfg.CPUs > MaxCPUs {
		return fmt.Errorf("%d vCPUs: want 1..%d", cfg.CPUs, MaxCPUs)
	}
	if cfg.MemSize < MinMemSize {
		return fmt.Errorf("guest memory %s is too small: payload guests need at least %s", option.FormatSize(cfg.MemSize), option.FormatSize(MinMemSize))
	}
	if cfg.MemSize%mmu.RegionSize != 0 {
		return fmt.Errorf("guest memory %s: must be a multiple of 2 MiB", option.FormatSize(cfg.MemSize))
	}
	if cfg.Console == nil {
		cfg.Console = io.Discard
	}
	for _, c := range cfg.Affinity {
		if c < 0 || c >= runtime.NumCPU() {
			return fmt.Errorf("vCPU affinity: host CPU %d does not exist (this host has %d)", c, runtime.NumCPU())
		}
	}
	return nil
}
