package devices

import (
	"fmt"
	"sync"

	"github.com/understudy-vmm/understudy/arch"
)

// ACPIPM is the ACPI fixed hardware a Linux guest uses to power off and
// reset: the PM1a event block (status, enable), the PM1a control block and
// the reset register, on consecutive I/O ports. The FADT names them (see
// arch.BuildACPI). A write of SLP_EN with the \_S5 sleep type to PM1a
// control powers the guest off; writing the reset value to the reset
// register reboots it. SCI_EN always reads as set: the machine is always in
// ACPI mode (the FADT has no SMI command port).
type ACPIPM struct {
	// OnPowerOff and OnReset are called, on the vCPU thread, when the guest
	// powers off or resets the machine.
	OnPowerOff func(detail string)
	OnReset    func(detail string)
	// mu guards enable and control (any vCPU may access them).
	mu      sync.Mutex
	enable  uint16
	control uint16
}

// ACPI fixed hardware ports and values of a Linux machine.
const (
	ACPIPM1EventPort   = 0x600
	ACPIPM1ControlPort = ACPIPM1EventPort + arch.PM1EventLen
	ACPIResetPort      = ACPIPM1ControlPort + arch.PM1ControlLen
	ACPIResetValue     = 0x01
	ACPIS5Type         = 5
	ACPISCI            = 9
	acpiPortLast       = ACPIResetPort
)

// Ports, Out and In make the ACPIPM a PortDevice.
func (p *ACPIPM) Ports() (uint16, uint16) { return ACPIPM1EventPort, acpiPortLast }

// reg returns a pointer to the 16-bit register holding port and the byte
// offset of port in it (nil for status and the reset register).
func (p *ACPIPM) reg(port uint16) (*uint16, int) {
	switch {
	case port >= ACPIPM1EventPort+2 && port < ACPIPM1ControlPort:
		return &p.enable, int(port - ACPIPM1EventPort - 2)
	case port >= ACPIPM1ControlPort && port < ACPIResetPort:
		return &p.control, int(port - ACPIPM1ControlPort)
	}
	return nil, 0
}

func (p *ACPIPM) Out(cpu int, port uint16, data []byte) error {
	if port == ACPIResetPort {
		if len(data) == 1 && data[0] == ACPIResetValue {
			p.OnReset(fmt.Sprintf("ACPI reset register (%#x to port %#x)", data[0], port))
		}
		return nil
	}
	// Accesses may span registers (a 4-byte write to the event block sets
	// status and enable): handle byte by byte.
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, b := range data {
		r, off := p.reg(port + uint16(i))
		if r == nil {
			continue // status bits are write-1-to-clear and never set here
		}
		*r = *r&^(0xff<<(8*off)) | uint16(b)<<(8*off)
		if r == &p.control && off == 1 {
			p.checkSleep()
		}
	}
	return nil
}

// checkSleep acts on a PM1a control write whose high byte has landed (the
// caller holds mu).
func (p *ACPIPM) checkSleep() {
	v := p.control
	if v&arch.PM1CntSleepEnable == 0 {
		return
	}
	p.control &^= arch.PM1CntSleepEnable // SLP_EN is write-only
	if t := arch.PM1SleepType(v); t == ACPIS5Type {
		p.OnPowerOff(fmt.Sprintf("ACPI S5 power-off (PM1a control %#x)", v))
	}
	// Other sleep states are not offered by the DSDT; a guest that writes
	// one anyway stays awake, as if it had woken at once.
}

func (p *ACPIPM) In(cpu int, port uint16, data []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range data {
		var v uint16
		r, off := p.reg(port + uint16(i))
		if r != nil {
			v = *r
			if r == &p.control {
				v |= arch.PM1CntSCIEnable
			}
		}
		if port+uint16(i) == ACPIResetPort {
			v = 0
		}
		data[i] = uint8(v >> (8 * off))
	}
	return nil
}
