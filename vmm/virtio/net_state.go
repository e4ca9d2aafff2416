package virtio

import (
	"fmt"
	"net"
)

// NetState is a virtio-net device's own state: its configuration space (the
// MAC address and the link status) and the received frames waiting for a
// guest receive buffer, oldest first.
//
// A frame is never half placed in a capture: the device places a frame
// into a receive chain and returns the chain in one step under the
// transport's lock, and a quiesced device places none (frames that arrive
// then join the backlog). So the backlog holds whole frames, and a frame
// not yet in the used ring is delivered again after a restore; the receive
// chain it would have used is still available (the next-available index
// was not advanced past it). Transmission happens completely on the vCPU
// that notifies, so there is no transmit backlog. Frames held by the
// output gate (egress.go) are not part of this state: a checkpoint carries
// them beside it (see HeldFrame for why).
type NetState struct {
	MAC net.HardwareAddr // 6 bytes
	// LinkStatus is the status field of the configuration space
	// (VIRTIO_NET_S_LINK_UP).
	LinkStatus uint16
	Backlog    [][]byte // at most NetBacklog frames of 1 to NetMaxFrame bytes
}

// Encoding (the device body of a virtio-net transport state):
//
//	MAC 6 bytes | link status u16 (bit 0 only) | backlog frames u16 (0..NetBacklog) | reserved u16 (0) |
//	per frame: length u32 (1..NetMaxFrame) | frame

const netStateFixed = 12

func (s *NetState) validate() error {
	switch {
	case len(s.MAC) != 6:
		return badState("virtio-net MAC address of %d bytes, want 6", len(s.MAC))
	case s.LinkStatus&^netStatusLinkUp != 0:
		return badState("virtio-net link status %#x has bits beyond LINK_UP", s.LinkStatus)
	case len(s.Backlog) > NetBacklog:
		return badState("virtio-net backlog of %d frames, at most %d", len(s.Backlog), NetBacklog)
	}
	for i, f := range s.Backlog {
		if len(f) == 0 || len(f) > NetMaxFrame {
			return badState("virtio-net backlog frame %d is %d bytes, want 1 to %d", i, len(f), NetMaxFrame)
		}
	}
	return nil
}

// AppendBinary appends the encoded state to b.
func (s *NetState) AppendBinary(b []byte) ([]byte, error) {
	if err := s.validate(); err != nil {
		return b, err
	}
	b = append(b, s.MAC...)
	b = le.AppendUint16(b, s.LinkStatus)
	b = le.AppendUint16(b, uint16(len(s.Backlog)))
	b = le.AppendUint16(b, 0)
	for _, f := range s.Backlog {
		b = le.AppendUint32(b, uint32(len(f)))
		b = append(b, f...)
	}
	return b, nil
}

// DecodeNetState decodes the device body of a virtio-net transport state.
func DecodeNetState(b []byte) (NetState, error) {
	var s NetState
	if len(b) < netStateFixed {
		return s, badState("virtio-net state is %d bytes, at least %d", len(b), netStateFixed)
	}
	n := int(le.Uint16(b[8:]))
	if r := le.Uint16(b[10:]); r != 0 {
		return s, badState("virtio-net state: reserved field is %#x, want 0", r)
	}
	if n > NetBacklog {
		return s, badState("virtio-net backlog of %d frames, at most %d", n, NetBacklog)
	}
	s.MAC = append(net.HardwareAddr(nil), b[:6]...)
	s.LinkStatus = le.Uint16(b[6:])
	rest := b[netStateFixed:]
	for i := range n {
		if len(rest) < 4 {
			return s, badState("virtio-net state ends inside backlog frame %d's length", i)
		}
		size := uint64(le.Uint32(rest))
		rest = rest[4:]
		if size == 0 || size > NetMaxFrame || size > uint64(len(rest)) {
			return s, badState("virtio-net backlog frame %d is %d bytes (%d left): want 1 to %d", i, size, len(rest), NetMaxFrame)
		}
		s.Backlog = append(s.Backlog, append([]byte(nil), rest[:size]...))
		rest = rest[size:]
	}
	if len(rest) != 0 {
		return s, badState("virtio-net state has %d bytes after the last backlog frame", len(rest))
	}
	if err := s.validate(); err != nil {
		return s, err
	}
	return s, nil
}

func (n *Net) appendState(b []byte) ([]byte, error) {
	s := NetState{MAC: n.mac[:], LinkStatus: n.linkStatus, Backlog: n.backlog}
	return s.AppendBinary(b)
}

// prepareState accepts any valid state: the MAC and link status come from
// the state (the guest keeps its MAC on the new host), the backlog is
// delivered after Resume.
func (n *Net) prepareState(body []byte) (func(), error) {
	s, err := DecodeNetState(body)
	if err != nil {
		return nil, err
	}
	return func() {
		copy(n.mac[:], s.MAC)
		n.linkStatus = s.LinkStatus
		n.backlog = s.Backlog
		n.rxBacklog.Store(uint64(len(n.backlog)))
	}, nil
}

// quiesce has nothing to finish: receive placement stops while the
// transport is quiesced, and frames the guest made available for transmit
// are sent after Resume (transmitting is output, which the machine may hold).
func (n *Net) quiesce() error { return nil }

func (n *Net) flush() error { return nil }

// RARP announcement frame (as QEMU's announce-self after a migration).
const (
	etherTypeRARP   = 0x8035
	rarpRequestRev  = 3 // RARP "request reverse"
	announceFrameSz = 60
)

// Announce writes one RARP frame from the guest's MAC address to the
// broadcast address on the tap, so that switches and bridges on the new
// host's segment learn where the guest's MAC now lives without waiting for
// the guest to send. The guest keeps its IP and MAC across a restore, so
// peers' ARP caches stay right; only the segment's forwarding tables move.
// After a restore the machine calls it a few times, spaced out (QEMU sends
// 5 rounds starting 50 ms apart, each gap 100 ms longer). Once LoadState
// has returned it may be called from any goroutine.
func (n *Net) Announce() error {
	f := make([]byte, announceFrameSz)
	for i := range 6 {
		f[i] = 0xff
	}
	copy(f[6:], n.MAC())
	be := func(off int, v uint16) { f[off], f[off+1] = byte(v>>8), byte(v) }
	be(12, etherTypeRARP)
	be(14, 1)      // hardware type: Ethernet
	be(16, 0x0800) // protocol type: IPv4
	f[18], f[19] = 6, 4
	be(20, rarpRequestRev)
	copy(f[22:], n.MAC()) // sender hardware address; sender IP 0
	copy(f[32:], n.MAC()) // target hardware address; target IP 0
	if _, err := n.tap.Write(f); err != nil {
		return fmt.Errorf("virtio-net: announce on tap %s: %w", n.tapName, err)
	}
	return nil
}
