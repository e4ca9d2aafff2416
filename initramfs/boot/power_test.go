package boot

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDrainConsoleNotATerminal: DrainConsole returns at once for what is not
// a terminal or a pipe (a file, a buffer), as the inits' tests and tools
// give it.
func TestDrainConsoleNotATerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	DrainConsole(f)
	DrainConsole(&strings.Builder{})
	if took := time.Since(start); took > time.Second {
		t.Errorf("DrainConsole of a file and a buffer took %v", took)
	}
}

// TestDrainConsolePipe: for a pipe (u-root's init's multi-TTY output),
// DrainConsole waits until the reader has read everything, and then drains
// the console device (here a file: nothing to wait for).
func TestDrainConsolePipe(t *testing.T) {
	old := ConsoleDevice
	ConsoleDevice = filepath.Join(t.TempDir(), "console")
	defer func() { ConsoleDevice = old }()
	if err := os.WriteFile(ConsoleDevice, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if _, err := w.WriteString("last lines\n"); err != nil {
		t.Fatal(err)
	}
	const readAfter = 300 * time.Millisecond
	read := make(chan time.Time, 1)
	go func() {
		time.Sleep(readAfter)
		b := make([]byte, 64)
		io.ReadAtLeast(r, b, len("last lines\n"))
		read <- time.Now()
	}()
	DrainConsole(w)
	done := time.Now()
	select {
	case at := <-read:
		if done.Before(at) {
			t.Errorf("DrainConsole returned %v before the reader read the pipe", at.Sub(done))
		}
	default:
		t.Error("DrainConsole returned with the pipe still unread")
	}
	// An empty pipe: no wait beyond the reader's moment.
	start := time.Now()
	DrainConsole(w)
	if took := time.Since(start); took > time.Second {
		t.Errorf("DrainConsole of an empty pipe took %v", took)
	}
}
