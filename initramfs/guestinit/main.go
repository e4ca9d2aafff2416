// Command guestinit is /init of the small initramfs that the appliance's
// nested guests boot (build/image/guest.cpio, built by `make image`). It is
// a static Go program and the only program in that initramfs.
//
// It mounts /proc, /sys and /dev, prints "understudy-guest: init reached"
// with the kernel's uptime, and then does what the kernel command line asks:
//
//	guest.mode=poweroff                    power off at once (the default)
//	guest.mode=net guest.addr=A/N [guest.port=P] [guest.iface=eth0]
//	                                       load the virtio modules, give the
//	                                       interface address A/N, answer one TCP
//	                                       connection on port P (default 7777)
//	                                       with a fixed line, power off
//	guest.mode=kv guest.addr=A/N [guest.port=P] [guest.iface=eth0] [guest.disk=/dev/vda]
//	                                       as net, then serve the key-value
//	                                       store of package kvstore on port P,
//	                                       its log on the disk; power off on
//	                                       the request POWEROFF
//	guest.mode=disk [guest.disk=/dev/vda]  load the virtio modules, print the
//	                                       text at offsets 0 and 512 KiB of the
//	                                       disk, power off
//	guest.mode=echo [guest.console=/dev/ttyS0]
//	                                       print boot.EchoPrompt, read one line from
//	                                       the serial console, print it back
//	                                       quoted ("echo: got ..."), power off
//	guest.mode=storm [guest.duration=30s] [guest.tag=0x7e0000000000] [guest.child_mib=4] [guest.child_ms=300]
//	                                       start two long-lived processes that
//	                                       map a page holding boot.LiveTag at
//	                                       guest.tag (one writes 16 MiB page by
//	                                       page, one maps, writes and unmaps
//	                                       64 MiB), then for guest.duration
//	                                       create short-lived processes one at a
//	                                       time, alternately an exec of /init and
//	                                       a fork, each busy writing
//	                                       guest.child_mib MiB for guest.child_ms
//	                                       milliseconds; print the counts of
//	                                       exits, power off (storm.go)
//	guest.mode=halt                        halt instead of powering off
//	                                       (reboot(LINUX_REBOOT_CMD_HALT): every
//	                                       CPU stops with interrupts disabled)
//	guest.timeout=60s                      how long to wait for a device, a
//	                                       connection or a line
//
// The storm's processes are this program again (/proc/self/exe), in a child
// role named by the environment variable UNDERSTUDY_STORM_ROLE, which only
// a process other than PID 1 obeys.
//
// Every line it prints starts with "understudy-guest: ". On success it
// powers the machine off (or halts it); on failure it prints
// "understudy-guest: FAIL: ..." and resets it, so that the VMM reports the
// difference.
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

const prefix = boot.GuestTag

func main() {
	if role := os.Getenv(stormRoleEnv); role != "" && os.Getpid() != 1 {
		os.Exit(roleMain(os.Stderr, role, os.Args[1:]))
	}
	out := os.Stdout
	mountErr := mountBasics()
	fmt.Fprintf(out, "%sinit reached (kernel uptime %s)\n", prefix, uptime())
	if mountErr != nil {
		fail(out, mountErr)
	}
	mode, err := run(out)
	if err != nil {
		fail(out, err)
	}
	if mode == modeHalt {
		fmt.Fprintf(out, "%sdone, halting\n", prefix)
		boot.DrainConsole(out)
		unix.Sync()
		err = unix.Reboot(unix.LINUX_REBOOT_CMD_HALT)
		fail(out, fmt.Errorf("halt: %w", err))
	}
	fmt.Fprintf(out, "%sdone, powering off\n", prefix)
	boot.DrainConsole(out)
	if err := boot.PowerOff(); err != nil {
		fail(out, err)
	}
}

// fail reports err and resets the machine.
func fail(out io.Writer, err error) {
	fmt.Fprintf(out, "%sFAIL: %v\n", prefix, err)
	boot.DrainConsole(out)
	if rerr := boot.Restart(); rerr != nil {
		fmt.Fprintf(out, "%s%v\n", prefix, rerr)
	}
	os.Exit(1) // the kernel panics; with panic=-1 it resets
}

func mountBasics() error {
	for _, m := range []struct{ src, dir, fstype string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
	} {
		if err := os.MkdirAll(m.dir, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, m.dir, m.fstype, unix.MS_NOSUID|unix.MS_NOEXEC, ""); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.dir, err)
		}
	}
	return nil
}

func uptime() string {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0] + " s"
}

// run does what the command line asks and returns the mode.
func run(out io.Writer) (string, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return "", err
	}
	params, err := boot.ParseCmdline(string(b))
	if err != nil {
		return "", err
	}
	cfg, err := parseConfig(params)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(out, "%smode %s\n", prefix, cfg.mode)
	if mods := cfg.modules(); len(mods) > 0 {
		if err := loadModules(out, mods, params); err != nil {
			return cfg.mode, err
		}
	}
	switch cfg.mode {
	case modeNet:
		return cfg.mode, serve(out, cfg)
	case modeDisk:
		return cfg.mode, readDisk(out, cfg)
	case modeEcho:
		return cfg.mode, echoConsole(out, cfg)
	case modeKV:
		return cfg.mode, serveKV(out, cfg)
	case modeStorm:
		return cfg.mode, stormMode(out, cfg)
	}
	return cfg.mode, nil
}

func loadModules(out io.Writer, names []string, params boot.Params) error {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return err
	}
	dir := "/lib/modules/" + unix.ByteSliceToString(u.Release[:])
	f, err := os.Open(dir + "/modules.dep")
	if err != nil {
		return err
	}
	dep, err := boot.ParseDepFile(f)
	f.Close()
	if err != nil {
		return err
	}
	var failed []string
	for _, r := range boot.LoadModules(dir, dep, names, params) {
		switch {
		case r.Err != nil:
			fmt.Fprintf(out, "%smodule %s: %v\n", prefix, r.Name, r.Err)
			failed = append(failed, r.Name)
		case r.Already:
			fmt.Fprintf(out, "%smodule %s: already loaded\n", prefix, r.Name)
		default:
			fmt.Fprintf(out, "%smodule %s: loaded in %v\n", prefix, r.Name, r.Took.Round(100_000))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("modules not loaded: %s", strings.Join(failed, ", "))
	}
	return nil
}
