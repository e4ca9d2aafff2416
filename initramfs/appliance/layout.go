package appliance

// Paths inside the appliance image, relative to its root: package
// initramfs writes them, the uinit reads them, and the roles and tests
// name them (the nested guests boot /boot/vmlinuz and /boot/guest.cpio).
const (
	Binary      = "bin/understudy"         // the uinit, run as `understudy appliance`
	KVLoad      = "bin/kvload"             // the key-value service's client (internal/cmd/kvload)
	NodeFile    = "bin/nodefile"           // moves files between nodes (initramfs/cmd/nodefile)
	GuestKernel = "boot/vmlinuz"           // the kernel nested guests boot
	GuestInitrd = "boot/guest.cpio"        // their initramfs
	Marker      = "etc/understudy/image"   // says "this is the appliance" and what built it
	ModuleList  = "etc/understudy/modules" // modules the uinit loads, one per line
)

// The files of a built image directory (build/image): `make image` writes
// them, QEMU boots them.
const (
	ImageKernel    = "vmlinuz"        // the kernel, for QEMU's -kernel (and GuestKernel inside)
	ImageAppliance = "appliance.cpio" // the appliance's initramfs (newc cpio, uncompressed)
	ImageGuest     = "guest.cpio"     // the nested guests' initramfs (GuestInitrd inside)
	ImageVersion   = "VERSION"        // what went into the image
)

// Tag starts every line the uinit prints, so that a harness reading the
// serial console can find them among the kernel's.
const Tag = "understudy-appliance: "
