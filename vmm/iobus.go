package vmm

import (
	"fmt"

	"github.com/understudy-vmm/understudy/arch"
)

// portDevice is a device on the I/O port bus.
type portDevice interface {
	// ports returns the inclusive port range the device decodes.
	ports() (first, last uint16)
	// out handles a write of data (1, 2 or 4 bytes) by vCPU cpu.
	out(cpu int, port uint16, data []byte) error
	// in fills data for a read by vCPU cpu.
	in(cpu int, port uint16, data []byte) error
}

// ioBus dispatches port I/O exits. An access to a port no device decodes is
// an error: payload guests only use the debug ports.
type ioBus struct {
	devs []portDevice
}

func (b *ioBus) add(d portDevice) { b.devs = append(b.devs, d) }

func (b *ioBus) handle(m *Machine, v *vcpu, io arch.IOExit) error {
	if io.Size != 1 && io.Size != 2 && io.Size != 4 {
		return m.exitError(v, "bad I/O exit", fmt.Sprintf("port %#x access of %d bytes", io.Port, io.Size))
	}
	for _, d := range b.devs {
		first, last := d.ports()
		if io.Port < first || io.Port > last {
			continue
		}
		for i := 0; i < io.Count; i++ {
			chunk := io.Data[i*io.Size : (i+1)*io.Size]
			var err error
			if io.Out {
				err = d.out(v.id, io.Port, chunk)
			} else {
				err = d.in(v.id, io.Port, chunk)
			}
			if err != nil {
				return m.exitError(v, "device error", err.Error())
			}
		}
		return nil
	}
	dir := "read from"
	if io.Out {
		dir = "write to"
	}
	return m.exitError(v, "I/O to a port without a device", fmt.Sprintf("%d-byte %s port %#x", io.Size, dir, io.Port))
}
