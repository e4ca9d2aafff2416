package boot

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// maxDrain bounds DrainConsole's wait for a UART that does not empty.
const maxDrain = 5 * time.Second

// DrainConsole waits until the terminal w has sent everything written to
// it; it does nothing when w is not a terminal. An init calls it before it
// stops the machine, so that the serial console's last lines leave the
// UART: on a loaded host running QEMU with TCG they did not always. tcdrain
// (TCSBRK) alone is not enough there: the serial driver stops waiting for
// the UART after a few character times, and a signal ends the wait early
// (the Go runtime sends itself SIGURG to preempt goroutines). So it asks
// the UART too (TIOCSERGETLSR), until its transmitter is empty, for up to
// maxDrain.
//
// When w is a pipe (u-root's init gives its uinit a pipe and copies what
// comes out of it to the consoles, its "multi-TTY" output), it first waits
// until the pipe is empty (FIONREAD, alias TIOCINQ) and the reader has had a moment to
// write what it read, then drains the console device (ConsoleDevice)
// itself; otherwise the machine could stop with the uinit's last lines
// still in the pipe.
func DrainConsole(w io.Writer) {
	f, ok := w.(*os.File)
	if !ok {
		return
	}
	fd := int(f.Fd())
	deadline := time.Now().Add(maxDrain)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFIFO {
		for time.Now().Before(deadline) {
			n, err := unix.IoctlGetInt(fd, unix.TIOCINQ) // FIONREAD
			if err != nil || n == 0 {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(pipeReaderDelay)
		c, err := os.OpenFile(ConsoleDevice, os.O_WRONLY|unix.O_NOCTTY, 0)
		if err != nil {
			return
		}
		defer c.Close()
		fd = int(c.Fd())
	}
	drainTTY(fd, deadline)
}

// ConsoleDevice is the kernel's console, drained when the uinit's output
// is a pipe to init.
var ConsoleDevice = "/dev/console"

// pipeReaderDelay is how long DrainConsole gives the reader of an emptied
// pipe to write what it read.
const pipeReaderDelay = 50 * time.Millisecond

func drainTTY(fd int, deadline time.Time) {
	for time.Now().Before(deadline) {
		err := unix.IoctlSetInt(fd, unix.TCSBRK, 1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return // not a terminal
		}
		lsr, err := unix.IoctlGetInt(fd, unix.TIOCSERGETLSR)
		if err != nil || lsr&unix.TIOCSER_TEMT != 0 {
			return // not a serial port, or everything is out
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// PowerOff syncs file systems and powers the machine off. It returns only on
// failure (not root, or not allowed).
func PowerOff() error {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		return fmt.Errorf("power off: %w", err)
	}
	return nil
}

// Restart syncs file systems and resets the machine. It returns only on
// failure.
func Restart() error {
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
		return fmt.Errorf("restart: %w", err)
	}
	return nil
}
