// Package boot is what an init program needs on a freshly booted Linux
// kernel, without any user space around it: the kernel command line
// (ParseCmdline, Params), kernel modules in dependency order (modules.dep:
// ParseDepFile, WriteDepFile, DepFile.LoadOrder, LoadModule), network
// interfaces (CreateTap, SetAddr, LinkUp, WaitLink; names are checked by
// virtio.CheckIfName, the one check of an interface name), draining the
// console and power-off.
//
// Two inits use it: the appliance's uinit (initramfs/appliance, run as
// `understudy appliance`) and the nested guest's /init
// (initramfs/guestinit). What the two agree on is here too, once: the
// guest's echo prompt and the test disk's layout (guest.go).
//
// Everything they read at boot, the command line above all, is untrusted:
// parsers validate and return errors, never panic, and are fuzzed.
//
// The package must stay small and free of build-time dependencies (u-root,
// mkuimage): it is linked into the understudy binary and into guestinit.
// Of the project it imports only vmm/virtio (for CheckIfName), which
// imports nothing of it. The image builder lives in package initramfs.
package boot
