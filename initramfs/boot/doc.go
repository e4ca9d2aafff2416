// Package boot is what an init program needs on a freshly booted Linux
// kernel, without any user space around it: the kernel command line
// (ParseCmdline, Params), kernel modules in dependency order (modules.dep:
// ParseDepFile, WriteDepFile, DepFile.LoadOrder, LoadModule), network
// interfaces (CreateTap, SetAddr, LinkUp, WaitLink) and power-off.
//
// Two inits use it: the appliance's uinit (`understudy appliance`, in
// vmm/cmd/understudy) and the nested guest's /init (initramfs/guestinit).
// Everything they read at boot, the command line above all, is untrusted:
// parsers validate and return errors, never panic, and are fuzzed.
//
// The package must stay small and free of build-time dependencies (u-root,
// mkuimage): it is linked into the understudy binary. The image builder
// lives in package initramfs.
package boot
