package main

import (
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// The modes of guest.mode.
const (
	modePoweroff = "poweroff"
	modeNet      = "net"
	modeDisk     = "disk"
	modeHalt     = "halt"
	modeEcho     = "echo"
)

// answer is what the guest sends on the TCP connection of guest.mode=net.
const answer = "hello from the nested guest over virtio-net\n"

// config is what the command line asks of the guest init.
type config struct {
	mode    string
	iface   string
	addr    netip.Prefix
	port    uint16
	disk    string
	console string
	timeout time.Duration

	// guest.mode=storm only (zero in the other modes): how long the storm
	// lasts, the tagged page's address, and the size and busy lifetime of
	// each short-lived child.
	duration time.Duration
	tag      uint64
	childMiB int
	childMs  int
}

// The defaults and limits of guest.mode=storm's parameters.
const (
	defaultStormDuration = 30 * time.Second
	defaultChildMiB      = 4
	defaultChildMs       = 300
	maxChildMiB          = 64
	minChildMs           = 10
	maxChildMs           = 10_000
	// minTagVA is Linux's default vm.mmap_min_addr; maxTagVA keeps the
	// tagged page below the mmap base and the stack (see boot.DefaultTagVA).
	minTagVA = 0x10000
	maxTagVA = 0x7f0000000000
)

// stormKeys are the parameters that only guest.mode=storm takes.
var stormKeys = map[string]bool{"duration": true, "tag": true, "child_mib": true, "child_ms": true}

// parseConfig reads the guest.* parameters. Other parameters are the
// kernel's and are ignored; an unknown guest.* parameter is an error.
func parseConfig(ps boot.Params) (config, error) {
	c := config{mode: modePoweroff, iface: "eth0", port: 7777, disk: "/dev/vda", console: "/dev/ttyS0", timeout: 60 * time.Second}
	seen := map[string]bool{}
	firstStormKey := ""
	for _, p := range ps.WithPrefix("guest.") {
		if seen[p.Key] {
			return c, fmt.Errorf("guest.%s given twice", p.Key)
		}
		seen[p.Key] = true
		if !p.HasValue || p.Value == "" {
			return c, fmt.Errorf("guest.%s needs a value", p.Key)
		}
		v := p.Value
		if stormKeys[p.Key] && firstStormKey == "" {
			firstStormKey = p.Key
		}
		switch p.Key {
		case "mode":
			switch v {
			case modePoweroff, modeNet, modeDisk, modeHalt, modeEcho, modeKV, modeStorm:
				c.mode = v
			default:
				return c, fmt.Errorf("guest.mode=%q: want %s, %s, %s, %s, %s, %s or %s", v, modePoweroff, modeHalt, modeNet, modeDisk, modeEcho, modeKV, modeStorm)
			}
		case "iface":
			if err := virtio.CheckIfName(v); err != nil {
				return c, fmt.Errorf("guest.iface: %w", err)
			}
			c.iface = v
		case "addr":
			pf, err := netip.ParsePrefix(v)
			if err != nil || !pf.Addr().Is4() || pf.Bits() == 0 || pf.Bits() == 32 {
				return c, fmt.Errorf("guest.addr=%q: want an IPv4 address with a prefix length of 1..31, as 192.0.2.2/24", v)
			}
			c.addr = pf
		case "port":
			n, err := strconv.ParseUint(v, 10, 16)
			if err != nil || n == 0 {
				return c, fmt.Errorf("guest.port=%q: want 1..65535", v)
			}
			c.port = uint16(n)
		case "disk":
			if !strings.HasPrefix(v, "/dev/") || path.Clean(v) != v || len(v) > 64 {
				return c, fmt.Errorf("guest.disk=%q: want a device under /dev, as /dev/vda", v)
			}
			c.disk = v
		case "console":
			if !strings.HasPrefix(v, "/dev/") || path.Clean(v) != v || len(v) > 64 {
				return c, fmt.Errorf("guest.console=%q: want a device under /dev, as /dev/ttyS0", v)
			}
			c.console = v
		case "timeout":
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 || d > time.Hour {
				return c, fmt.Errorf("guest.timeout=%q: want a duration up to 1h, as 60s", v)
			}
			c.timeout = d
		case "duration":
			d, err := time.ParseDuration(v)
			if err != nil || d < time.Second || d > time.Hour {
				return c, fmt.Errorf("guest.duration=%q: want a duration of 1s..1h, as 30s", v)
			}
			c.duration = d
		case "tag":
			va, err := strconv.ParseUint(v, 0, 64)
			if err != nil || va%pageSize != 0 || va < minTagVA || va >= maxTagVA {
				return c, fmt.Errorf("guest.tag=%q: want a page-aligned user address in [%#x, %#x), as %#x", v, minTagVA, maxTagVA, boot.DefaultTagVA)
			}
			c.tag = va
		case "child_mib":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxChildMiB {
				return c, fmt.Errorf("guest.child_mib=%q: want 1..%d (MiB)", v, maxChildMiB)
			}
			c.childMiB = n
		case "child_ms":
			n, err := strconv.Atoi(v)
			if err != nil || n < minChildMs || n > maxChildMs {
				return c, fmt.Errorf("guest.child_ms=%q: want %d..%d (milliseconds)", v, minChildMs, maxChildMs)
			}
			c.childMs = n
		default:
			return c, fmt.Errorf("unknown parameter guest.%s (known: mode, iface, addr, port, disk, console, timeout, duration, tag, child_mib, child_ms)", p.Key)
		}
	}
	if c.mode == modeStorm {
		if c.duration == 0 {
			c.duration = defaultStormDuration
		}
		if c.tag == 0 {
			c.tag = boot.DefaultTagVA
		}
		if c.childMiB == 0 {
			c.childMiB = defaultChildMiB
		}
		if c.childMs == 0 {
			c.childMs = defaultChildMs
		}
	} else if firstStormKey != "" {
		return c, fmt.Errorf("guest.%s applies only to guest.mode=%s", firstStormKey, modeStorm)
	}
	if (c.mode == modeNet || c.mode == modeKV) && !c.addr.IsValid() {
		return c, fmt.Errorf("guest.mode=%s needs guest.addr=A/N", c.mode)
	}
	return c, nil
}

// modules returns the modules the mode needs. virtio_pci is there too so
// that the same initramfs works whether the VMM offers virtio over MMIO or
// PCI; without devices, either driver just loads.
func (c config) modules() []string {
	switch c.mode {
	case modeNet:
		return []string{"virtio_mmio", "virtio_pci", "virtio_net"}
	case modeDisk:
		return []string{"virtio_mmio", "virtio_pci", "virtio_blk"}
	case modeKV:
		return []string{"virtio_mmio", "virtio_pci", "virtio_net", "virtio_blk"}
	}
	return nil
}
