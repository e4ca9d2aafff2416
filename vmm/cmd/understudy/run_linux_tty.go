package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// A Linux guest's serial input. When stdin is a terminal, `run --kernel`
// puts it in raw mode for the run, as QEMU's -nographic does: every key,
// Ctrl-C included, goes to the guest, and the terminal's own settings come
// back when the run ends (also on an error, SIGINT or SIGTERM). Output
// processing stays on, so the VMM's own lines keep their line breaks. An
// escape takes the place of the keys the guest now gets: Ctrl-A x quits,
// Ctrl-A Ctrl-A sends one Ctrl-A. When stdin is not a terminal nothing
// changes: a pipe or socket is the guest's input as it is, and anything
// else (/dev/null, a regular file) gives the guest no input.

// escapeKey is Ctrl-A, the escape's first key.
const escapeKey = 0x01

// escapeHelp describes the escape, for the flag help and the hint line.
const escapeHelp = "Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A"

// errQuitKey is the cause of a run ended by the escape.
var errQuitKey = errors.New("Ctrl-A x typed at the console")

// linuxStdin is the Linux guest's input (a variable so that tests can give
// a pseudo-terminal).
var linuxStdin = os.Stdin

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// linuxConsole returns the guest's serial input for stdin and a function
// that restores the terminal (safe to call more than once, and a no-op if
// nothing was changed). A terminal is put in raw mode and read through the
// escape, which calls quit on Ctrl-A x.
func linuxConsole(stdin *os.File, quit func()) (io.Reader, func(), error) {
	if stdin == nil || !isTerminal(stdin) {
		return consoleInput(stdin), func() {}, nil
	}
	restore, err := makeRaw(stdin)
	if err != nil {
		return nil, nil, fmt.Errorf("console: %w", err)
	}
	return &escapeReader{r: stdin, quit: quit}, restore, nil
}

// makeRaw puts terminal f in raw mode and returns the function that puts
// its previous settings back.
func makeRaw(f *os.File) (func(), error) {
	fd := int(f.Fd())
	saved, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, fmt.Errorf("read the terminal settings: %w", err)
	}
	raw := *saved
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Oflag |= unix.OPOST // keep \n → \r\n for the VMM's own lines
	raw.Cc[unix.VMIN], raw.Cc[unix.VTIME] = 1, 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, fmt.Errorf("put the terminal in raw mode: %w", err)
	}
	var once sync.Once
	return func() {
		once.Do(func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, saved) })
	}, nil
}

// escapeReader passes r through, minus the escape: Ctrl-A x calls quit and
// ends the input (io.EOF); Ctrl-A Ctrl-A passes one Ctrl-A; Ctrl-A and any
// other key pass both.
type escapeReader struct {
	r       io.Reader
	quit    func()
	pending bool   // the last byte read was Ctrl-A
	done    bool   // Ctrl-A x was read
	queue   []byte // bytes decoded but not yet returned
	buf     []byte
}

func (e *escapeReader) Read(p []byte) (int, error) {
	if len(e.queue) == 0 && !e.done && len(p) > 0 {
		if cap(e.buf) < len(p) {
			e.buf = make([]byte, len(p))
		}
		n, err := e.r.Read(e.buf[:len(p)])
		e.decode(e.buf[:n])
		if len(e.queue) == 0 && !e.done {
			return 0, err
		}
	}
	n := copy(p, e.queue)
	e.queue = e.queue[n:]
	if len(e.queue) == 0 && e.done {
		return n, io.EOF
	}
	return n, nil
}

// decode appends what b gives to the queue, up to Ctrl-A x.
func (e *escapeReader) decode(b []byte) {
	for _, c := range b {
		if e.pending {
			e.pending = false
			switch c {
			case 'x', 'X':
				e.done = true
				e.quit()
				return
			case escapeKey:
				e.queue = append(e.queue, escapeKey)
			default:
				e.queue = append(e.queue, escapeKey, c)
			}
			continue
		}
		if c == escapeKey {
			e.pending = true
			continue
		}
		e.queue = append(e.queue, c)
	}
}
