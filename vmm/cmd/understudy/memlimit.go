package main

import (
	"os"
	"runtime/debug"

	"golang.org/x/sys/unix"
)

// setMemoryLimit gives the Go runtime a soft memory limit of three
// quarters of the host's RAM unless GOMEMLIMIT sets one. An intermediary
// holds the guest's image, a queue for a lagging backup (up to guest
// memory) and, while it re-seeds one, a copy of the image, all on the Go
// heap; without a limit the collector lets the heap grow to twice what is
// live before it runs, which on a small host (an appliance node of 1.5 GiB
// for a 256 MiB guest) is past the RAM there is, and the kernel's OOM
// killer ends the role. With the limit the collector runs as the heap
// nears it instead. Guest memory is mapped outside the Go heap and is not
// counted. It returns the limit set (0: none).
func setMemoryLimit() int64 {
	if os.Getenv("GOMEMLIMIT") != "" {
		return 0
	}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return 0
	}
	total := int64(si.Totalram) * int64(si.Unit)
	if total <= 0 {
		return 0
	}
	limit := total / 4 * 3
	debug.SetMemoryLimit(limit)
	autoLimit = limit
	return limit
}

// autoLimit is the limit setMemoryLimit set (0: none).
var autoLimit int64

// reserveGuest lowers the limit setMemoryLimit set by a guest's memory of
// size bytes, which is mapped outside the Go heap but takes the host's RAM
// all the same (to no less than a quarter of the limit). It returns the
// limit now in force (0: none of ours).
func reserveGuest(size uint64) int64 {
	if autoLimit == 0 {
		return 0
	}
	limit := max(autoLimit-int64(size), autoLimit/4)
	debug.SetMemoryLimit(limit)
	return limit
}
