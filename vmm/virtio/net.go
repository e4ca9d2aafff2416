package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
)

// virtio-net feature bits and layout (VIRTIO 1.x section 5.1).
const (
	NetFMAC    = 1 << 5  // VIRTIO_NET_F_MAC
	NetFStatus = 1 << 16 // VIRTIO_NET_F_STATUS

	// NetHeaderSize is the size of struct virtio_net_hdr_v1 (with
	// num_buffers), which precedes every frame in both directions.
	NetHeaderSize = 12
	// NetMaxFrame is the largest Ethernet frame the device passes: a 64 KiB
	// MTU plus the Ethernet header.
	NetMaxFrame = 65536 + 14
	// NetBacklog is how many received frames the device holds while the
	// guest has no receive buffer; beyond it frames are dropped and counted.
	NetBacklog = 64

	netStatusLinkUp = 1
	netConfigSize   = 8 // mac[6], le16 status
	netRxQueue      = 0
	netTxQueue      = 1
)

// NetStats counts a virtio-net device's traffic.
type NetStats struct {
	RxFrames  uint64 // frames placed into guest receive buffers
	RxDropped uint64 // frames from the tap dropped: device inactive, backlog full, or too big for the guest's buffer
	TxFrames  uint64 // frames the guest sent that were written to the tap (when output is held: released, or sent as carried frames)
	TxErrors  uint64 // guest frames dropped: malformed request or tap write failure
	RxBacklog uint64 // frames waiting now for a guest receive buffer
}

// Net is a virtio-net device backed by a tap device. It offers no
// offloads, so the virtio_net_hdr carries nothing: the device strips the
// guest's header before writing a frame to the tap, and puts a zero header
// (num_buffers 1) before every frame it gives the guest. The tap is attached
// without IFF_VNET_HDR.
//
// A goroutine reads the tap and places frames into the guest's receive
// buffers; while there are none it keeps up to NetBacklog frames, and drops
// (and counts) the rest. Transmit happens on the vCPU that notifies.
//
// With output held (HoldOutput, for a protected guest) the frames the guest
// transmits wait in the device until ReleaseOutput: see egress.go.
type Net struct {
	tapName string
	mac     [6]byte
	tap     *os.File

	// Guarded by the transport's lock (Device methods and Deliver):
	h          *Host
	backlog    [][]byte
	linkStatus uint16 // the config space's status field

	active                                             atomic.Pointer[Host]
	rxFrames, rxDropped, txFrames, txErrors, rxBacklog atomic.Uint64

	// egress is the output gate (egress.go), off unless HoldOutput.
	egress egress

	closeOnce sync.Once
	closeErr  error
	done      chan struct{}
}

// NewNet attaches to the existing tap device named tap and starts its
// receive goroutine. mac is the guest's MAC address (6 bytes). A missing
// interface gives an error wrapping ErrNoTap, one that is not a tap (a tun
// device, a veth, a bridge) ErrNotTap; both name the interface. NewNet
// never creates an interface.
func NewNet(tap string, mac net.HardwareAddr) (*Net, error) {
	if len(mac) != 6 {
		return nil, fmt.Errorf("virtio-net: MAC address %q: want 6 bytes, got %d", mac.String(), len(mac))
	}
	f, err := openTap(tap)
	if err != nil {
		return nil, fmt.Errorf("virtio-net: %w", err)
	}
	n := &Net{tapName: tap, tap: f, linkStatus: netStatusLinkUp, done: make(chan struct{})}
	copy(n.mac[:], mac)
	go n.receiveLoop()
	return n, nil
}

// Tap returns the tap device's name.
func (n *Net) Tap() string { return n.tapName }

// MAC returns the guest's MAC address.
func (n *Net) MAC() net.HardwareAddr { return append(net.HardwareAddr(nil), n.mac[:]...) }

// Stats returns the traffic counters.
func (n *Net) Stats() NetStats {
	return NetStats{
		RxFrames: n.rxFrames.Load(), RxDropped: n.rxDropped.Load(),
		TxFrames: n.txFrames.Load(), TxErrors: n.txErrors.Load(),
		RxBacklog: n.rxBacklog.Load(),
	}
}

// DeviceID returns DeviceIDNet.
func (n *Net) DeviceID() uint32 { return DeviceIDNet }

// Features returns VERSION_1, MAC and STATUS.
func (n *Net) Features() uint64 { return netFeatures }

// QueueSizes returns the receive queue and the transmit queue.
func (n *Net) QueueSizes() []uint16 { return netQueueSizes() }

// netFeatures are the features a virtio-net device offers.
const netFeatures = FeatureVersion1 | NetFMAC | NetFStatus

func netQueueSizes() []uint16 { return []uint16{DefaultQueueSize, DefaultQueueSize} }

// ReadConfig reads struct virtio_net_config: the MAC and the link status
// (up, unless a restored state said otherwise).
func (n *Net) ReadConfig(offset uint64, data []byte) {
	var cfg [netConfigSize]byte
	copy(cfg[:], n.mac[:])
	binary.LittleEndian.PutUint16(cfg[6:], n.linkStatus)
	readConfig(cfg[:], offset, data)
}

// WriteConfig ignores the write: the MAC is read-only once VERSION_1 is
// negotiated.
func (n *Net) WriteConfig(offset uint64, data []byte) {}

// Activate starts placing received frames into the guest.
func (n *Net) Activate(h *Host) error {
	n.h = h
	n.active.Store(h)
	return nil
}

// Reset stops using the queues and drops the backlog. Frames held by the
// output gate stay held.
func (n *Net) Reset() {
	n.h = nil
	n.active.Store(nil)
	n.rxDropped.Add(uint64(len(n.backlog)))
	n.backlog = nil
	n.rxBacklog.Store(0)
	// Held frames stay held (the guest sent them); chains waiting at a
	// bound are gone with the rings.
	n.egress.mu.Lock()
	n.egress.stalled, n.egress.waitLeft = false, 0
	n.egress.mu.Unlock()
}

// Close detaches from the tap and waits for the receive goroutine to end.
func (n *Net) Close() error {
	n.closeOnce.Do(func() {
		n.active.Store(nil)
		if err := n.tap.Close(); err != nil {
			n.closeErr = fmt.Errorf("virtio-net: close tap %s: %w", n.tapName, err)
		}
		<-n.done
	})
	return n.closeErr
}

// Notify transmits the frames of the transmit queue, or, for the receive
// queue (the guest added buffers), places the backlog.
func (n *Net) Notify(queue int) error {
	if n.h == nil {
		return badAccess("virtio-net notified while inactive")
	}
	switch queue {
	case netRxQueue:
		return n.drain()
	case netTxQueue:
		return n.transmit()
	}
	return badAccess("virtio-net has no queue %d", queue)
}

func (n *Net) transmit() error {
	q := n.h.Queue(netTxQueue)
	if q == nil {
		return badAccess("virtio-net transmit queue is not ready")
	}
	hold := n.egress.holding()
	var first error
	frame := make([]byte, 0, 2048)
	for {
		c, err := q.Pop()
		if err != nil {
			return err
		}
		if c == nil {
			return first
		}
		p, err := n.frameOf(c, &frame)
		switch {
		case err == nil && hold:
			if !n.egress.admit(p) {
				// At a bound: the chain waits in the ring until a
				// release makes room (see egress.go).
				q.Unpop()
				if waiting, err := q.Pending(); err == nil {
					n.egress.waiting(int(waiting))
				}
				return first
			}
		case err == nil:
			if _, werr := n.tap.Write(p); werr != nil {
				err = fmt.Errorf("virtio-net: write frame to tap %s: %w", n.tapName, werr)
			} else {
				n.txFrames.Add(1)
			}
		}
		if err != nil {
			n.txErrors.Add(1)
			if first == nil {
				first = err
			}
		}
		if err := q.Push(c.Head, 0); err != nil {
			return err
		}
	}
}

// frameOf returns one transmit chain's frame, without its virtio-net
// header, in *frame's storage.
func (n *Net) frameOf(c *Chain, frame *[]byte) ([]byte, error) {
	if len(c.Writable) > 0 {
		return nil, badRequest("virtio-net transmit chain (head %d) has %d device-writable descriptors; transmit buffers are device-readable",
			c.Head, len(c.Writable))
	}
	total := c.ReadableLen()
	if total < NetHeaderSize || total-NetHeaderSize > NetMaxFrame {
		return nil, badRequest("virtio-net transmit chain (head %d) is %d bytes: want a %d-byte header and a frame of at most %d bytes",
			c.Head, total, NetHeaderSize, NetMaxFrame)
	}
	size := int(total - NetHeaderSize)
	if cap(*frame) < size {
		*frame = make([]byte, size)
	}
	p := (*frame)[:size]
	gather(c.Readable, NetHeaderSize, p)
	return p, nil
}

// receiveLoop reads frames from the tap until it is closed.
func (n *Net) receiveLoop() {
	defer close(n.done)
	buf := make([]byte, NetMaxFrame)
	for {
		size, err := n.tap.Read(buf)
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				slog.Error("virtio-net: read from tap failed; receive stopped", "tap", n.tapName, "err", err)
			}
			return
		}
		h := n.active.Load()
		if h == nil {
			n.rxDropped.Add(1)
			continue
		}
		frame := buf[:size]
		err = h.Deliver(func() error { return n.receive(frame) })
		switch {
		case errors.Is(err, ErrInactive):
			n.rxDropped.Add(1)
		case err != nil:
			slog.Warn("virtio-net receive", "tap", n.tapName, "err", err)
		}
	}
}

// receive places frame (owned by the caller) into the guest after the
// backlog, or keeps a copy in the backlog. Called with the transport's lock
// held.
func (n *Net) receive(frame []byte) error {
	if n.h.Paused() {
		// The machine is paused for a capture: guest memory must not
		// change, so the frame waits with the others.
		return n.hold(frame, nil)
	}
	err := n.drain()
	if errors.Is(err, ErrMalformed) {
		return err
	}
	if len(n.backlog) == 0 {
		placed, perr := n.place(frame)
		err = errors.Join(err, perr)
		if placed || errors.Is(perr, ErrMalformed) {
			return err
		}
	}
	return n.hold(frame, err)
}

// hold appends a copy of frame to the backlog, or drops it if the backlog
// is full, and returns err.
func (n *Net) hold(frame []byte, err error) error {
	if len(n.backlog) >= NetBacklog {
		n.rxDropped.Add(1)
		return err
	}
	n.backlog = append(n.backlog, append([]byte(nil), frame...))
	n.rxBacklog.Store(uint64(len(n.backlog)))
	return err
}

// drain places backlog frames while the guest has receive buffers.
func (n *Net) drain() error {
	var errs error
	for len(n.backlog) > 0 {
		placed, err := n.place(n.backlog[0])
		errs = errors.Join(errs, err)
		if !placed || errors.Is(err, ErrMalformed) {
			return errs
		}
		n.backlog[0] = nil
		n.backlog = n.backlog[1:]
		n.rxBacklog.Store(uint64(len(n.backlog)))
	}
	n.backlog = nil
	return errs
}

// place puts frame into the next receive chain. It reports false when
// there is no receive buffer. A frame too big for the buffer is dropped
// (counted, and reported placed) and the buffer kept for the next frame. A
// chain with device-readable descriptors is returned empty and reported
// (ErrBadRequest), and the next one tried.
func (n *Net) place(frame []byte) (bool, error) {
	q := n.h.Queue(netRxQueue)
	if q == nil {
		return false, nil
	}
	var bad error
	for {
		c, err := q.Pop()
		if err != nil {
			return false, err
		}
		if c == nil {
			return false, bad
		}
		if len(c.Readable) > 0 {
			if err := q.Push(c.Head, 0); err != nil {
				return false, err
			}
			bad = errors.Join(bad, badRequest("virtio-net receive chain (head %d) has %d device-readable descriptors; receive buffers are device-writable",
				c.Head, len(c.Readable)))
			continue
		}
		if c.WritableLen() < NetHeaderSize+uint64(len(frame)) {
			q.Unpop()
			n.rxDropped.Add(1)
			return true, bad
		}
		var hdr [NetHeaderSize]byte
		binary.LittleEndian.PutUint16(hdr[10:], 1) // num_buffers
		mem := n.h.Memory()
		if _, err := scatter(mem, c.Writable, 0, hdr[:]); err != nil {
			return false, malformed("virtio-net receive buffer: %v", err)
		}
		if _, err := scatter(mem, c.Writable, NetHeaderSize, frame); err != nil {
			return false, malformed("virtio-net receive buffer: %v", err)
		}
		if err := q.Push(c.Head, uint32(NetHeaderSize+len(frame))); err != nil {
			return false, err
		}
		n.rxFrames.Add(1)
		return true, bad
	}
}
