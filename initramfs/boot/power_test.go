package boot

import (
	"os"
	"strings"
	"testing"
)

// TestDrainConsoleNotATerminal: DrainConsole returns at once for what is not
// a terminal (a pipe, a buffer), as the inits' tests and tools give it.
func TestDrainConsoleNotATerminal(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if _, err := w.WriteString("unread\n"); err != nil {
		t.Fatal(err)
	}
	DrainConsole(w)
	DrainConsole(&strings.Builder{})
}
