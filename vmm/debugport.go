package vmm

import (
	"encoding/binary"
	"fmt"
	"io"
	"sync"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/vmm/payload"
)

// debugPort is the payload guests' device: console bytes, output records,
// phase markers and the exit code, on ports payload.PortFirst..PortLast.
type debugPort struct {
	// consoleMu guards console (vCPUs print concurrently).
	consoleMu sync.Mutex
	console   io.Writer

	recHi    []uint32 // sticky high halves, one per vCPU (each touched only by its vCPU)
	records  atomic.Uint64
	onRecord func(Record)
	onMark   func(cpu int, phase uint32)
	onExit   func(code int)
}

func newDebugPort(ncpus int, console io.Writer, onRecord func(Record), onMark func(int, uint32), onExit func(int)) *debugPort {
	return &debugPort{console: console, recHi: make([]uint32, ncpus), onRecord: onRecord, onMark: onMark, onExit: onExit}
}

func (d *debugPort) ports() (uint16, uint16) { return payload.PortFirst, payload.PortLast }

func (d *debugPort) out(cpu int, port uint16, data []byte) error {
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
			d.onRecord(Record{CPU: cpu, Value: uint64(d.recHi[cpu])<<32 | uint64(word(data))})
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

func (d *debugPort) in(cpu int, port uint16, data []byte) error {
	return fmt.Errorf("debug port %#x: reads are not supported", port)
}

// word returns a port write's value, zero-extended.
func word(data []byte) uint32 {
	var b [4]byte
	copy(b[:], data)
	return binary.LittleEndian.Uint32(b[:])
}
