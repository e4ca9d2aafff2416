package vmm

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// ProcessRSS returns this process's resident set size in bytes, from
// /proc/self/statm.
func ProcessRSS() (uint64, error) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/self/statm: unexpected %q", b)
	}
	pages, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/self/statm: %w", err)
	}
	return pages * uint64(os.Getpagesize()), nil
}

// Stats are counters of a machine, read after (or during) Run.
type Stats struct {
	Exits         uint64 // KVM exits handled, all vCPUs
	RSS           uint64 // process resident set size, bytes
	GuestResident uint64 // guest memory resident on the host, bytes
}

// Stats returns the machine's counters.
func (m *Machine) Stats() (Stats, error) {
	var s Stats
	for _, v := range m.vcpus {
		s.Exits += v.exits.Load()
	}
	var err error
	if s.GuestResident, err = m.mem.ResidentBytes(); err != nil {
		return s, err
	}
	if s.RSS, err = ProcessRSS(); err != nil {
		return s, err
	}
	return s, nil
}
