package boot

import (
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// DrainConsole waits until the terminal w has sent everything written to it
// (tcdrain); it does nothing when w is not a file. An init calls it before
// it stops the machine, so that the serial console's last lines leave the
// UART: on a loaded host running QEMU with TCG they did not always.
func DrainConsole(w io.Writer) {
	if f, ok := w.(*os.File); ok {
		_ = unix.IoctlSetInt(int(f.Fd()), unix.TCSBRK, 1)
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
