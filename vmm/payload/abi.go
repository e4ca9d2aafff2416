// Package payload holds Understudy's payload guests: tiny long-mode programs
// whose hot loops run at CPL3, talk to the VMM through debug I/O ports, and
// take their parameters from a params block. The sources are in src/ (GNU as,
// Intel syntax); the flat binaries in bin/ are generated from them by
// `make payloads` and embedded here. TestBinariesMatchSources rebuilds them.
//
// This package knows the ABI and each payload's options. It does not run
// anything; package vmm loads and runs payloads.
package payload

// Debug I/O ports (see src/abi.inc).
const (
	PortConsole = 0x500 // out8: a console byte
	PortExit    = 0x504 // out32: stop with exit code
	PortRecLo   = 0x508 // out32: emits an output record (hi<<32 | lo)
	PortRecHi   = 0x50c // out32: sets this vCPU's high half for later records
	PortMark    = 0x514 // out32: phase marker
	PortFirst   = PortConsole
	PortLast    = PortMark + 3
)

// Params block field offsets (see src/abi.inc).
const (
	ParamMagic    = 0x00
	ParamMemSize  = 0x08
	ParamDataBase = 0x10
	ParamDataSize = 0x18
	ParamNCPUs    = 0x20
	ParamArgs     = 0x40
	NumArgs       = 16

	// Magic is the params block's first u64 ("USPARAM1").
	Magic = 0x314d415241505355
)
