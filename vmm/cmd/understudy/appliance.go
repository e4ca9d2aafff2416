package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// cmdAppliance is `understudy appliance`, the appliance image's uinit: u-root's
// init runs it once the kernel is up. It maps its flags to
// appliance.Options; package initramfs/appliance does the rest.
func cmdAppliance(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("appliance", "appliance [--cmdline FILE] [--root DIR] [--kvm DEV] [--poweroff=false]", stderr)
	o := appliance.Options{Out: stdout, Version: versionString()}
	fs.StringVar(&o.Cmdline, "cmdline", "/proc/cmdline", "the kernel command line to read")
	fs.StringVar(&o.Root, "root", "/", "the image's root directory")
	fs.StringVar(&o.KVM, "kvm", arch.DefaultDevice, "KVM device")
	fs.BoolVar(&o.PowerOff, "poweroff", true, "power the machine off when the role ends (only inside the appliance image)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: understudy appliance [flags]\n\nThe appliance image's uinit. %s\nFlags:\n", appliance.Help)
		fs.PrintDefaults()
	}
	if code, done := parseFlags(fs, args); done {
		return code
	}
	self, err := os.Executable()
	if err != nil {
		return fail(stderr, err)
	}
	o.Self = self
	return appliance.Run(ctx, o)
}
