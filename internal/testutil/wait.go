package testutil

import (
	"testing"
	"time"
)

// Patience is how long WaitFor waits. It only tells a hang from progress,
// so it is generous: a loaded host stretches every step, and a test never
// asserts how long something took.
const Patience = time.Minute

// WaitFor polls cond every millisecond until it holds. After Patience it
// fails the test, saying what it waited for and, if given, the state each
// of state describes.
func WaitFor(t testing.TB, what string, cond func() bool, state ...func() string) {
	t.Helper()
	deadline := time.Now().Add(Patience)
	for !cond() {
		if time.Now().After(deadline) {
			msg := ""
			for _, f := range state {
				msg += "; " + f()
			}
			t.Fatalf("timed out after %v waiting for %s%s", Patience, what, msg)
		}
		time.Sleep(time.Millisecond)
	}
}
