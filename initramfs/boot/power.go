package boot

import (
	"fmt"

	"golang.org/x/sys/unix"
)

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
