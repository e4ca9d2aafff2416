// Package kvmtest holds helpers for tests that need the host's KVM.
package kvmtest

import (
	"errors"
	"os"
	"testing"
)

// Device is the KVM device node host-KVM tests use.
const Device = "/dev/kvm"

// Require skips tb when the host has no KVM device. It never skips for any
// other reason: a KVM that exists but fails must fail the test.
func Require(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat(Device); errors.Is(err, os.ErrNotExist) {
		tb.Skipf("no %s on this host: skipping host-KVM test", Device)
	}
}
