package devices

import (
	"fmt"
	"sync"
)

// I8042 is the keyboard controller as far as a Linux guest without a
// keyboard needs it: the status port says the controller is idle, and the
// commands that pulse the CPU reset line (0xfe, or 0xd1 followed by an
// output-port value with bit 0 clear) end the run as a reboot. That is how
// Linux reboots with reboot=k. Other commands and data are ignored.
type I8042 struct {
	// OnReset is called when the guest resets the machine.
	OnReset func(detail string)
	// mu guards writeOutput, set after command 0xd1 (write output port).
	mu          sync.Mutex
	writeOutput bool
}

const (
	i8042Data    = 0x60
	i8042Command = 0x64 // status on read

	i8042CmdWriteOutput = 0xd1
	i8042CmdPulseReset  = 0xfe
	i8042OutputReset    = 0x01 // output port bit 0: 0 holds the CPU in reset
)

// Ports, Out and In make the I8042 a PortDevice.
func (k *I8042) Ports() (uint16, uint16) { return i8042Data, i8042Command }

func (k *I8042) Out(cpu int, port uint16, data []byte) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	switch port {
	case i8042Command:
		k.writeOutput = data[0] == i8042CmdWriteOutput
		if data[0] == i8042CmdPulseReset {
			k.OnReset(fmt.Sprintf("keyboard controller reset (command %#x to port %#x)", data[0], port))
		}
	case i8042Data:
		if k.writeOutput && data[0]&i8042OutputReset == 0 {
			k.OnReset(fmt.Sprintf("keyboard controller reset (output port %#x)", data[0]))
		}
		k.writeOutput = false
	}
	// Ports 0x61..0x63 lie in the range but are not the controller's: the
	// in-kernel PIT handles 0x61, and nothing else is there.
	return nil
}

func (k *I8042) In(cpu int, port uint16, data []byte) error {
	for i := range data {
		data[i] = 0
	}
	if port != i8042Data && port != i8042Command {
		for i := range data {
			data[i] = 0xff
		}
	}
	return nil
}
