// Package devices holds the machine's legacy port devices, each with its
// saved state in a *_state.go file beside it: the payload guests' debug port
// (console, output records, phase markers, exit code), and a Linux guest's
// 16550A UART on COM1, i8042 keyboard controller (reset) and ACPI PM fixed
// hardware (power-off, reset). Each state type has a strict binary encoding
// (AppendBinary, Decode*State) that package vmm embeds in a MachineState;
// every decoder reads untrusted bytes and fails with ErrBadState.
//
// A device is a PortDevice: vmm's port bus calls Out and In on the vCPU
// thread of the exit. Devices know nothing of the machine: they reach it
// only through the callbacks and writers they are built with (an interrupt
// line, the console, power-off and reset). This package must not import
// vmm; vmm imports it. The virtio devices are in vmm/virtio.
package devices

import (
	"encoding/binary"
	"errors"
)

// PortDevice is a device on the I/O port bus.
type PortDevice interface {
	// Ports returns the inclusive port range the device decodes.
	Ports() (first, last uint16)
	// Out handles a write of data (1, 2 or 4 bytes) by vCPU cpu.
	Out(cpu int, port uint16, data []byte) error
	// In fills data for a read by vCPU cpu.
	In(cpu int, port uint16, data []byte) error
}

// ErrBadState is wrapped by every error about a malformed or inconsistent
// device state; vmm.ErrBadState is the same error.
var ErrBadState = errors.New("bad machine state")

var le = binary.LittleEndian
