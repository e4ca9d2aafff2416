package vmm

import (
	"testing"
	"time"
)

// waitFor polls cond; on timeout it fails the test, showing state if given.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool, state ...func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			msg := ""
			for _, f := range state {
				msg += "; " + f()
			}
			t.Fatalf("timed out after %v waiting for %s%s", timeout, what, msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
