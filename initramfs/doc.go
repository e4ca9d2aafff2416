// Package initramfs builds the Understudy appliance (`make image`): one
// Debian kernel plus a u-root initramfs whose init starts `understudy
// appliance` as its uinit, with the kernel modules the appliance needs and,
// inside it, the kernel and initramfs of the nested guests that the QEMU
// tests boot.
//
// Build does it all into build/image (appliance.cpio, guest.cpio, vmlinuz,
// VERSION), caching the downloaded and unpacked kernel under build/cache:
//
//   - FetchKernel resolves the versioned package of linux-image-amd64 with
//     apt-cache, fetches it with `apt-get download` and unpacks it with
//     `dpkg-deb -x`; nothing is installed on the host.
//   - IndexModules and ModuleTree.Resolve pick modules and their
//     dependencies from the unpacked tree (Debian's package has no
//     modules.dep: dependencies come from each module's .modinfo, see
//     ParseModinfo); StageModules writes them uncompressed with a
//     modules.dep of their own, which the inits read (package boot).
//   - The appliance is made through u-root's mkuimage Go API (uimage), which
//     builds the u-root commands from the module cache: go.mod pins u-root
//     and mkuimage, and tools.go keeps the command packages required.
//
// The inits themselves live in the packages below this one:
// initramfs/appliance (the appliance's uinit as a library, which `understudy
// appliance` runs; it also declares the image's layout, the paths Build
// writes), initramfs/guestinit (the nested guest's /init) and
// initramfs/boot (what both inits share). This package is build-time only;
// the understudy binary must not import it.
package initramfs
