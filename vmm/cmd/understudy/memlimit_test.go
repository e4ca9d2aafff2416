package main

import (
	"math"
	"runtime/debug"
	"testing"

	"golang.org/x/sys/unix"
)

// TestSetMemoryLimit: without GOMEMLIMIT the runtime's soft limit becomes
// three quarters of the host's RAM; with it, it is left alone.
func TestSetMemoryLimit(t *testing.T) {
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		t.Fatal(err)
	}
	want := int64(si.Totalram) * int64(si.Unit) / 4 * 3
	t.Setenv("GOMEMLIMIT", "")
	debug.SetMemoryLimit(math.MaxInt64)
	if got := setMemoryLimit(); got != want || debug.SetMemoryLimit(-1) != want {
		t.Errorf("setMemoryLimit() = %d, runtime limit %d; want %d (3/4 of RAM)", got, debug.SetMemoryLimit(-1), want)
	}
	if got := reserveGuest(uint64(want / 3)); got != want-want/3 {
		t.Errorf("reserveGuest(limit/3) = %d, want %d", got, want-want/3)
	}
	if got := reserveGuest(uint64(want)); got != want/4 {
		t.Errorf("reserveGuest(limit) = %d, want a quarter of the limit, %d", got, want/4)
	}
	autoLimit = 0
	t.Setenv("GOMEMLIMIT", "1GiB")
	debug.SetMemoryLimit(math.MaxInt64)
	if got := setMemoryLimit(); got != 0 || debug.SetMemoryLimit(-1) != math.MaxInt64 {
		t.Errorf("with GOMEMLIMIT set: setMemoryLimit() = %d, runtime limit %d; want both untouched", got, debug.SetMemoryLimit(-1))
	}
	if got := reserveGuest(1 << 30); got != 0 {
		t.Errorf("with GOMEMLIMIT set: reserveGuest() = %d, want 0", got)
	}
}
