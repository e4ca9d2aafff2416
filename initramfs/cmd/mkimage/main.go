// Command mkimage builds the Understudy appliance image; `make image` runs
// it. See package initramfs.
//
//	go run ./initramfs/cmd/mkimage -understudy build/understudy -out build/image -cache build/cache
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"

	"github.com/understudy-vmm/understudy/initramfs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := initramfs.Options{Log: stdout}
	fs.StringVar(&o.OutDir, "out", "build/image", "output directory (appliance.cpio, guest.cpio, vmlinuz, VERSION)")
	fs.StringVar(&o.CacheDir, "cache", "build/cache", "cache directory for the kernel package")
	fs.StringVar(&o.Understudy, "understudy", "build/understudy", "the static understudy binary (the uinit)")
	fs.StringVar(&o.RepoDir, "repo", ".", "the Go module root to build guestinit and the u-root commands in")
	fs.StringVar(&o.MetaPackage, "meta", initramfs.DefaultMetaPackage, "Debian kernel metapackage")
	fs.StringVar(&o.Suite, "suite", "", "take the kernel from this Debian suite alone (e.g. bookworm-backports) instead of the host's apt sources")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "mkimage: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	// The builders run tools in other directories: make every path absolute.
	for _, p := range []*string{&o.OutDir, &o.CacheDir, &o.Understudy, &o.RepoDir} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			fmt.Fprintf(stderr, "mkimage: %v\n", err)
			return 2
		}
		*p = abs
	}
	o.MkUimage = moduleVersion("github.com/u-root/mkuimage")
	if _, err := initramfs.Build(ctx, o); err != nil {
		fmt.Fprintf(stderr, "mkimage: %v\n", err)
		return 1
	}
	return 0
}

// moduleVersion returns the version of module path linked into this program.
func moduleVersion(path string) string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	for _, d := range bi.Deps {
		if d.Path == path {
			return d.Version
		}
	}
	return "unknown"
}
