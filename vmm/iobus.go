package vmm

import (
	"fmt"
	"sync"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/vmm/devices"
)

// ioBus dispatches port I/O exits. For a payload machine an access to a port
// no device decodes is an error: payload guests only use the debug ports.
// A Linux machine's bus is lenient (see unknownPorts), because Linux probes
// legacy hardware that may or may not be there.
type ioBus struct {
	devs []devices.PortDevice
	// lenient, if set, answers accesses to ports without a device.
	lenient *unknownPorts
}

// add registers d; its ports must not overlap another device's.
func (b *ioBus) add(d devices.PortDevice) error {
	first, last := d.Ports()
	if first > last {
		return fmt.Errorf("I/O device %T: empty port range %#x..%#x", d, first, last)
	}
	for _, o := range b.devs {
		f, l := o.Ports()
		if first <= l && f <= last {
			return fmt.Errorf("I/O device %T at ports %#x..%#x overlaps %T at %#x..%#x", d, first, last, o, f, l)
		}
	}
	b.devs = append(b.devs, d)
	return nil
}

func (b *ioBus) handle(m *Machine, v *vcpu, io arch.IOExit) error {
	if io.Size != 1 && io.Size != 2 && io.Size != 4 {
		return m.exitError(v, "bad I/O exit", fmt.Sprintf("port %#x access of %d bytes", io.Port, io.Size))
	}
	for _, d := range b.devs {
		first, last := d.Ports()
		if io.Port < first || io.Port > last {
			continue
		}
		for i := 0; i < io.Count; i++ {
			chunk := io.Data[i*io.Size : (i+1)*io.Size]
			var err error
			if io.Out {
				err = d.Out(v.id, io.Port, chunk)
			} else {
				err = d.In(v.id, io.Port, chunk)
			}
			if err != nil {
				return m.exitError(v, "device error", err.Error())
			}
		}
		return nil
	}
	if b.lenient != nil {
		b.lenient.access(m, io)
		return nil
	}
	dir := "read from"
	if io.Out {
		dir = "write to"
	}
	return m.exitError(v, "I/O to a port without a device", fmt.Sprintf("%d-byte %s port %#x", io.Size, dir, io.Port))
}

// unknownPorts answers a Linux guest's accesses to ports without a device
// the way an ISA bus with nothing there does: reads return all ones, writes
// go nowhere. It counts them, and logs the first access to each port at
// debug level. Linux probes legacy hardware this way (COM2-4, the RTC, PCI
// configuration ports, VGA registers) and uses port 0x80 for I/O delays.
type unknownPorts struct {
	// mu guards counts.
	mu     sync.Mutex
	counts map[uint16]uint64
}

func newUnknownPorts() *unknownPorts { return &unknownPorts{counts: map[uint16]uint64{}} }

func (u *unknownPorts) access(m *Machine, io arch.IOExit) {
	if !io.Out {
		for i := range io.Data {
			io.Data[i] = 0xff
		}
	}
	u.mu.Lock()
	n := u.counts[io.Port]
	u.counts[io.Port] = n + uint64(io.Count)
	u.mu.Unlock()
	if n == 0 {
		dir := "read"
		if io.Out {
			dir = "write"
		}
		m.log.Debug("guest I/O to a port without a device (reads return all ones, writes are ignored)",
			"port", fmt.Sprintf("%#x", io.Port), "access", dir, "size", io.Size)
	}
}

// count returns how many accesses port has had.
func (u *unknownPorts) count(port uint16) uint64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[port]
}
