package devices

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/vmm/payload"
)

// DebugPort is the payload guests' device: console bytes, output records,
// phase markers and the exit code, on ports payload.PortFirst..PortLast.
// Its state (debugport_state.go) is the record count and each vCPU's
// record high half.
type DebugPort struct {
	// consoleMu guards console (vCPUs print concurrently).
	consoleMu sync.Mutex
	console   io.Writer

	recHi    []uint32 // sticky high halves, one per vCPU (each touched only by its vCPU)
	records  atomic.Uint64
	onRecord func(cpu int, value uint64)
	onMark   func(cpu int, phase uint32)
	onExit   func(code int)
}

// NewDebugPort makes the debug port of a machine with ncpus vCPUs: console
// bytes go to console; onRecord (if not nil) gets every output record,
// onMark (if not nil) every phase marker, and onExit the exit code, each on
// the writing vCPU's thread.
func NewDebugPort(ncpus int, console io.Writer, onRecord func(cpu int, value uint64), onMark func(cpu int, phase uint32), onExit func(code int)) *DebugPort {
	return &DebugPort{console: console, recHi: make([]uint32, ncpus), onRecord: onRecord, onMark: onMark, onExit: onExit}
}

// Records returns the number of output records emitted.
func (d *DebugPort) Records() uint64 { return d.records.Load() }

// Ports, Out and In make the DebugPort a port device (see the PortDevice
// interface).

func (d *DebugPort) Ports() (uint16, uint16) { return payload.PortFirst, payload.PortLast }

func (d *DebugPort) Out(cpu int, port uint16, data []byte) error {
	switch port {
	case payload.PortConsole:
		d.consoleMu.Lock()
		_, err := d.console.Write(data[:1])
		d.consoleMu.Unlock()
		if err != nil {
			return fmt.Errorf("console: %w", err)
		}
		return nil
	case payload.PortExit:
		d.onExit(int(int32(word(data))))
	case payload.PortRecHi:
		d.recHi[cpu] = word(data)
	case payload.PortRecLo:
		d.records.Add(1)
		if d.onRecord != nil {
			d.onRecord(cpu, uint64(d.recHi[cpu])<<32|uint64(word(data)))
		}
	case payload.PortMark:
		if d.onMark != nil {
			d.onMark(cpu, word(data))
		}
	default:
		return fmt.Errorf("debug port %#x: no register there", port)
	}
	return nil
}

func (d *DebugPort) In(cpu int, port uint16, data []byte) error {
	return fmt.Errorf("debug port %#x: reads are not supported", port)
}

// word returns a port write's value, zero-extended.
func word(data []byte) uint32 {
	var b [4]byte
	copy(b[:], data)
	return binary.LittleEndian.Uint32(b[:])
}
