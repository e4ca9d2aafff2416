package boot

import "fmt"

// What the appliance's test role (initramfs/appliance) and the nested
// guest's init (initramfs/guestinit) agree on. The QEMU tests check both
// ends.

// GuestTag starts every line the nested guest's init prints.
const GuestTag = "understudy-guest: "

// EchoPrompt is the line (followed by " on DEVICE") that the guest init's
// echo mode prints once it reads from its serial console. The appliance's
// understudy.stdin= writes only after it: bytes typed earlier, while the
// guest's serial driver starts, would be lost.
const EchoPrompt = GuestTag + "echo: waiting for a line"

// RestoredLine begins the line `understudy restore` prints once it has
// restored a Linux guest, just before the guest runs again. A restored
// guest that was waiting for a console line (EchoPrompt) before its
// snapshot still waits and prints no new prompt, so the appliance's
// understudy.stdin= writes after this line too.
const RestoredLine = "understudy: restored a Linux guest from "

// The test disk: a file of TestDiskSize bytes that the appliance's test
// role writes (understudy.testdisk=PATH:TEXT) and a nested guest reads as
// its disk (guest.mode=disk). It holds TestDiskText(TEXT, off) and a
// newline at each of TestDiskOffsets.
const TestDiskSize = 1 << 20

// TestDiskOffsets are where the test disk holds its text, and where the
// guest init reads.
var TestDiskOffsets = []int64{0, 512 << 10}

// TestDiskText is the text the test disk made with text holds at off: text
// itself at 0, "text@off" elsewhere, so that a reader shows which offset it
// read.
func TestDiskText(text string, off int64) string {
	if off == 0 {
		return text
	}
	return fmt.Sprintf("%s@%d", text, off)
}
