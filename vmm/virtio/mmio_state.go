package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The binary encoding of one virtio-mmio transport and the device behind
// it, version 1. It is part of a machine state that arrives over the
// network during failover, so decoding treats it as untrusted: every length
// and count is bounded and must match exactly, reserved fields must be
// zero, and nothing may follow the device section. Encoding applies the same
// rules, so a decoded state re-encodes to the same bytes. All integers are
// little-endian.
//
//	header     magic "USVT" | version u16 (1) | device ID u16 (1 net, 2 block)
//	registers  status u32 | device features sel u32 | driver features sel u32 |
//	           flags u32 (bit 0: the driver accepted a feature above bit 63) |
//	           driver features u64 | queue sel u32 | interrupt status u32 |
//	           config generation u32 | queue count u16 (1..maxStateQueues) | reserved u16 (0)
//	queues     per queue (32 bytes): size u16 | ready u8 (0 or 1) | reserved u8 (0) |
//	           next available u16 | next used u16 | desc u64 | driver u64 | device u64
//	device     length u32 | body: see block_state.go (virtio-blk) or net_state.go (virtio-net)
//
// What the encoding accepts is what a transport can reach: any status bits
// (the driver may set bits VIRTIO 1.x does not define), but DRIVER_OK only
// with FEATURES_OK and FEATURES_OK only with VIRTIO_F_VERSION_1 accepted;
// interrupt status bits 0 and 1 only. What
// depends on the machine it is restored into (the device's offered
// features, its queue sizes, guest memory, the disk) is checked by
// Transport.LoadState; CheckTransportState checks all of it that needs
// only the memory layout, with the same code.

// TransportStateVersion is the version of the transport state encoding this
// build writes and reads.
const TransportStateVersion = 1

// ErrBadState is wrapped by every error about a malformed transport or
// device state, and by LoadState's refusal of a state that cannot be
// restored into this transport.
var ErrBadState = errors.New("bad virtio state")

// ErrNotQuiesced is returned by SaveState when the transport is not
// quiesced: a state captured while the device may still use its queues
// could hold half a request.
var ErrNotQuiesced = errors.New("virtio transport is not quiesced")

// MaxTransportStateSize bounds an encoded transport state: the registers,
// the queues and a virtio-net backlog of NetBacklog maximal frames.
const MaxTransportStateSize = transportStateFixed + maxStateQueues*queueStateSize + 4 +
	netStateFixed + NetBacklog*(4+NetMaxFrame)

const (
	maxStateQueues      = 8
	transportStateFixed = 8 + 40
	queueStateSize      = 32
	flagBeyond64        = 1

	interruptKnown = InterruptUsedBuffer | InterruptConfigChange
)

var transportMagic = [4]byte{'U', 'S', 'V', 'T'}

var le = binary.LittleEndian

func badState(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadState, fmt.Sprintf(format, args...))
}

// validate checks the rules the encoding enforces on its own.
func (s *TransportState) validate() error {
	switch {
	case s.Status&StatusDriverOK != 0 && s.Status&StatusFeaturesOK == 0:
		return badState("status %#x has DRIVER_OK without FEATURES_OK", s.Status)
	case s.Status&StatusFeaturesOK != 0 && (s.DriverFeatures&FeatureVersion1 == 0 || s.DriverFeaturesBeyond64):
		return badState("status %#x has FEATURES_OK, but the driver features %#x (beyond bit 63: %v) would have been refused",
			s.Status, s.DriverFeatures, s.DriverFeaturesBeyond64)
	case s.InterruptStatus&^interruptKnown != 0:
		return badState("interrupt status %#x has bits beyond %#x", s.InterruptStatus, interruptKnown)
	case len(s.Queues) == 0 || len(s.Queues) > maxStateQueues:
		return badState("%d queues, want 1 to %d", len(s.Queues), maxStateQueues)
	}
	for i := range s.Queues {
		if err := s.Queues[i].validate(); err != nil {
			return fmt.Errorf("queue %d: %w", i, err)
		}
	}
	return nil
}

// validate checks a queue's indices: a ready queue's device can be at most
// Size chains ahead of what it returned (the driver owns no more
// descriptors than that).
func (q *QueueState) validate() error {
	if q.Ready && q.LastAvail-q.UsedIdx > q.Size {
		return badState("next available index %d is %d ahead of next used index %d, more than the queue size %d",
			q.LastAvail, q.LastAvail-q.UsedIdx, q.UsedIdx, q.Size)
	}
	return nil
}

// AppendTransportState appends the encoding of s with the device's ID and
// its encoded device state (dev, a block or net state body) to b. It fails
// if s or dev break a rule that decoding enforces.
func AppendTransportState(b []byte, deviceID uint32, s *TransportState, dev []byte) ([]byte, error) {
	if err := s.validate(); err != nil {
		return b, err
	}
	if deviceID != DeviceIDNet && deviceID != DeviceIDBlock {
		return b, badState("device ID %d, want %d (net) or %d (block)", deviceID, DeviceIDNet, DeviceIDBlock)
	}
	if len(dev) > MaxTransportStateSize {
		return b, badState("device state of %d bytes", len(dev))
	}
	b = append(b, transportMagic[:]...)
	b = le.AppendUint16(b, TransportStateVersion)
	b = le.AppendUint16(b, uint16(deviceID))
	var flags uint32
	if s.DriverFeaturesBeyond64 {
		flags |= flagBeyond64
	}
	for _, v := range []uint32{s.Status, s.DeviceFeaturesSel, s.DriverFeaturesSel, flags} {
		b = le.AppendUint32(b, v)
	}
	b = le.AppendUint64(b, s.DriverFeatures)
	for _, v := range []uint32{s.QueueSel, s.InterruptStatus, s.ConfigGeneration} {
		b = le.AppendUint32(b, v)
	}
	b = le.AppendUint16(b, uint16(len(s.Queues)))
	b = le.AppendUint16(b, 0)
	for _, q := range s.Queues {
		b = le.AppendUint16(b, q.Size)
		ready := byte(0)
		if q.Ready {
			ready = 1
		}
		b = append(b, ready, 0)
		b = le.AppendUint16(b, q.LastAvail)
		b = le.AppendUint16(b, q.UsedIdx)
		b = le.AppendUint64(b, q.Desc)
		b = le.AppendUint64(b, q.Driver)
		b = le.AppendUint64(b, q.Device)
	}
	b = le.AppendUint32(b, uint32(len(dev)))
	return append(b, dev...), nil
}

// DecodeTransportState decodes an encoded transport state. It returns the
// device ID and the device's state body (a sub-slice of b), which
// DecodeBlockState or DecodeNetState decodes.
func DecodeTransportState(b []byte) (TransportState, uint32, []byte, error) {
	var s TransportState
	if len(b) > MaxTransportStateSize {
		return s, 0, nil, badState("transport state is %d bytes, at most %d", len(b), MaxTransportStateSize)
	}
	if len(b) < transportStateFixed {
		return s, 0, nil, badState("transport state is %d bytes, at least %d", len(b), transportStateFixed)
	}
	if [4]byte(b[0:4]) != transportMagic {
		return s, 0, nil, badState("transport state magic %q, want %q", b[0:4], transportMagic[:])
	}
	if v := le.Uint16(b[4:]); v != TransportStateVersion {
		return s, 0, nil, badState("transport state version %d, this build reads version %d", v, TransportStateVersion)
	}
	id := uint32(le.Uint16(b[6:]))
	if id != DeviceIDNet && id != DeviceIDBlock {
		return s, 0, nil, badState("device ID %d, want %d (net) or %d (block)", id, DeviceIDNet, DeviceIDBlock)
	}
	s.Status = le.Uint32(b[8:])
	s.DeviceFeaturesSel = le.Uint32(b[12:])
	s.DriverFeaturesSel = le.Uint32(b[16:])
	flags := le.Uint32(b[20:])
	if flags&^flagBeyond64 != 0 {
		return s, 0, nil, badState("transport flags %#x, only bit 0 is defined", flags)
	}
	s.DriverFeaturesBeyond64 = flags&flagBeyond64 != 0
	s.DriverFeatures = le.Uint64(b[24:])
	s.QueueSel = le.Uint32(b[32:])
	s.InterruptStatus = le.Uint32(b[36:])
	s.ConfigGeneration = le.Uint32(b[40:])
	n := int(le.Uint16(b[44:]))
	if r := le.Uint16(b[46:]); r != 0 {
		return s, 0, nil, badState("reserved field after the queue count is %#x, want 0", r)
	}
	if n == 0 || n > maxStateQueues {
		return s, 0, nil, badState("%d queues, want 1 to %d", n, maxStateQueues)
	}
	rest := b[transportStateFixed:]
	if len(rest) < n*queueStateSize+4 {
		return s, 0, nil, badState("transport state is %d bytes, too short for %d queues and a device section", len(b), n)
	}
	s.Queues = make([]QueueState, n)
	for i := range s.Queues {
		e := rest[i*queueStateSize:]
		if e[2] > 1 || e[3] != 0 {
			return s, 0, nil, badState("queue %d: ready %d and reserved %d, want 0 or 1 and 0", i, e[2], e[3])
		}
		s.Queues[i] = QueueState{
			Size: le.Uint16(e), Ready: e[2] == 1,
			LastAvail: le.Uint16(e[4:]), UsedIdx: le.Uint16(e[6:]),
			Desc: le.Uint64(e[8:]), Driver: le.Uint64(e[16:]), Device: le.Uint64(e[24:]),
		}
	}
	rest = rest[n*queueStateSize:]
	devLen := uint64(le.Uint32(rest))
	rest = rest[4:]
	if uint64(len(rest)) != devLen {
		return s, 0, nil, badState("device section is %d bytes, its length field says %d", len(rest), devLen)
	}
	if err := s.validate(); err != nil {
		return s, 0, nil, err
	}
	return s, id, rest, nil
}

// checkAgainst checks a decoded state against a device that offers the
// features offered and has len(max) queues of at most max[i] descriptors,
// in a machine whose guest RAM is inRAM: the negotiated features (once
// FEATURES_OK is set) were offered, and every ready queue is configured as
// QueueReady requires (validateQueue). LoadState checks a state against its
// own device with it, CheckTransportState against what any device of the
// state's type may be.
func (s *TransportState) checkAgainst(offered uint64, max []uint16, inRAM RAMCheck) error {
	if len(s.Queues) != len(max) {
		return badState("the state has %d queues, the device %d", len(s.Queues), len(max))
	}
	// Before FEATURES_OK the driver features are only what the driver wrote
	// (FEATURES_OK refuses unoffered ones); after it they are negotiated.
	if extra := s.DriverFeatures &^ (offered | FeatureVersion1); extra != 0 && s.Status&StatusFeaturesOK != 0 {
		return badState("negotiated features %#x include %#x, which the device does not offer", s.DriverFeatures, extra)
	}
	for i := range s.Queues {
		st := &s.Queues[i]
		if !st.Ready {
			continue
		}
		if err := validateQueue(inRAM, st, max[i]); err != nil {
			return badState("queue %d: %v", i, err)
		}
	}
	return nil
}

// CheckTransportState checks an encoded transport state (from
// Transport.SaveState) without a machine: it decodes it, the device's body
// included, as DecodeTransportState and DecodeBlockState or DecodeNetState
// do, and checks it against what any device of its type may be and against
// guest RAM as inRAM describes it. It refuses, with an error wrapping
// ErrBadState, what LoadState would refuse in any machine of that memory
// layout: a queue count other than the device type's, negotiated features
// (FEATURES_OK set) that no device of the type offers, and a ready queue
// whose size is not a power of 2 within the type's maximum, whose
// descriptor table, available ring or used ring is misaligned or not
// inside one region of guest RAM, or whose next available index is more
// than its size ahead of its next used index (mod 2^16). What only the
// device restored into can say (the disk's size and fingerprint, the MAC,
// whether a disk is read-only) is left to LoadState.
//
// The checks are LoadState's own (one implementation), so a state this
// accepts is refused by LoadState only for a reason of the device.
func CheckTransportState(b []byte, inRAM RAMCheck) error {
	s, id, body, err := DecodeTransportState(b)
	if err != nil {
		return err
	}
	var offered uint64
	var max []uint16
	switch id {
	case DeviceIDBlock:
		_, err = DecodeBlockState(body)
		offered, max = blockFeatures|BlockFRO, blockQueueSizes()
	case DeviceIDNet:
		_, err = DecodeNetState(body)
		offered, max = netFeatures, netQueueSizes()
	}
	if err != nil {
		return err
	}
	return s.checkAgainst(offered, max, inRAM)
}

// stateful is a device whose own state a transport state carries (Block,
// Net). The transport calls these with its lock held.
type stateful interface {
	// appendState appends the device's encoded state to b.
	appendState(b []byte) ([]byte, error)
	// prepareState decodes and checks body against the device without
	// changing it, and returns what puts it into the device.
	prepareState(body []byte) (apply func(), err error)
	// quiesce finishes what the device has been given before a capture.
	quiesce() error
	// flush makes the device's backend durable (a snapshot to a file).
	flush() error
}

// Quiesce readies the transport for a capture while the machine is paused
// (no vCPU runs), and keeps it still until Resume. It completes every
// request the guest has made available to a block device (data written to
// the disk file or read into guest memory, used ring written, interrupt
// raised), and stops a network device from placing received frames (they
// wait in its backlog, which the state carries). After Quiesce the device
// writes nothing into guest memory until Resume. Quiescing a quiesced
// transport is allowed (it completes what was made available since).
//
// It returns an error only for a host failure (the interrupt could not be
// raised); a malformed ring sets DEVICE_NEEDS_RESET, as a notify would, and
// the state records it.
func (t *Transport) Quiesce() error {
	t.mu.Lock()
	t.quiesced = true
	var err error
	if t.host != nil && t.st.Status&StatusDeviceNeedsReset == 0 {
		if d, ok := t.dev.(stateful); ok {
			err = d.quiesce()
		}
	}
	raise := t.settle(err)
	t.mu.Unlock()
	if errors.Is(err, ErrMalformed) || errors.Is(err, ErrBadRequest) {
		// Recorded in the device state (DEVICE_NEEDS_RESET) or answered to
		// the guest (a failed request): not the machine's problem.
		err = nil
	}
	return errors.Join(err, t.raise(raise))
}

// Flush makes the device's backend durable: fsync of a writable block
// device's disk file, nothing for a network device. A snapshot to a file
// calls it after Quiesce, before it takes the disk's fingerprint.
func (t *Transport) Flush() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if d, ok := t.dev.(stateful); ok {
		return d.flush()
	}
	return nil
}

// Quiesced reports whether the transport is between Quiesce (or LoadState)
// and Resume.
func (t *Transport) Quiesced() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.quiesced
}

// SaveState returns the encoded state of the transport and its device. The
// transport must be quiesced (ErrNotQuiesced otherwise). For a block
// device it includes the disk's fingerprint, which costs a read of the
// chunks written since the last SaveState (the whole disk the first time).
func (t *Transport) SaveState() ([]byte, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.quiesced {
		return nil, fmt.Errorf("%s: save state: %w", t.name, ErrNotQuiesced)
	}
	d, ok := t.dev.(stateful)
	if !ok {
		return nil, fmt.Errorf("%s: save state: the device does not save its state", t.name)
	}
	dev, err := d.appendState(nil)
	if err != nil {
		return nil, fmt.Errorf("%s: save state: %w", t.name, err)
	}
	b, err := AppendTransportState(nil, t.dev.DeviceID(), &t.st, dev)
	if err != nil {
		return nil, fmt.Errorf("%s: save state: %w", t.name, err)
	}
	return b, nil
}

// LoadState restores an encoded state (from SaveState) into a transport the
// guest has not used: one fresh from NewMMIO, or reset. Its device must be
// what the state describes: the same type, a block device with the same
// capacity, read-only setting, disk size and fingerprint. The state is
// refused, with one error wrapping ErrBadState and nothing changed, when it
// is malformed, when its negotiated features (FEATURES_OK set) were never
// offered by this device, when
// its queue sizes exceed the device's, when a ready queue's ring lies
// outside guest memory, or when a ready queue's indices are inconsistent
// with its size.
//
// Guest memory should hold the snapshot's contents before Resume; LoadState
// reads only the device's own backend. It leaves the transport quiesced:
// the machine calls Resume once it has restored everything else.
func (t *Transport) LoadState(b []byte) error {
	if err := t.loadState(b); err != nil {
		return fmt.Errorf("%s: restore: %w", t.name, err)
	}
	return nil
}

func (t *Transport) loadState(b []byte) error {
	s, id, body, err := DecodeTransportState(b)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.closed:
		return badState("the transport is closed")
	case t.host != nil || t.st.Status != 0:
		return badState("the transport is in use (status %#x); restore into a fresh or reset one", t.st.Status)
	case id != t.dev.DeviceID():
		return badState("the state is of a %s, the device is a %s", deviceName(id), t.name)
	}
	max := make([]uint16, len(t.queues))
	for i, q := range t.queues {
		max[i] = q.max
	}
	if err := s.checkAgainst(t.dev.Features(), max, memoryRAM(t.mem)); err != nil {
		return err
	}
	d, ok := t.dev.(stateful)
	if !ok {
		return badState("the device does not restore its state")
	}
	apply, err := d.prepareState(body)
	if err != nil {
		return err
	}
	// Nothing can fail from here on.
	queues := t.st.Queues
	copy(queues, s.Queues)
	s.Queues = queues
	t.st = s
	for _, q := range t.queues {
		q.used = false
	}
	apply()
	t.quiesced = true
	t.restored = true
	if t.st.Status&StatusDriverOK != 0 {
		t.gen++
		t.host = &Host{t: t, gen: t.gen}
		// Activate only records the host for Block and Net; an error
		// would be a device that refuses a state it accepted.
		if err := t.dev.Activate(t.host); err != nil {
			t.st.Status |= StatusDeviceNeedsReset
			t.st.InterruptStatus |= InterruptConfigChange
		}
	}
	return nil
}

// Resume ends a Quiesce (after a checkpoint) or a LoadState (after a
// restore) and kicks every ready queue, as if the driver had notified it:
// the device re-reads each available ring and serves what the guest made
// available while it was still (a block request, a receive buffer for the
// backlog, a frame to transmit), and raises the interrupt if that used
// buffers. After a restore it also raises the interrupt if the interrupt
// status register shows one pending, since the new machine's interrupt
// controller may not have seen it (a spurious one is harmless: the driver
// finds the status register clear). Guest memory must hold the snapshot's
// contents by then. Errors are as for Write: for the log; the machine keeps
// running.
func (t *Transport) Resume() error {
	t.mu.Lock()
	t.quiesced = false
	restored := t.restored
	t.restored = false
	var errs error
	if t.host != nil && t.st.Status&StatusDeviceNeedsReset == 0 {
		for i, q := range t.queues {
			if !q.st.Ready {
				continue
			}
			if err := t.dev.Notify(i); err != nil {
				errs = errors.Join(errs, &QueueError{Device: t.name, Queue: i, Err: err})
				if errors.Is(err, ErrMalformed) {
					break
				}
			}
		}
	}
	raise := t.settle(errs) || restored && t.st.InterruptStatus != 0
	t.mu.Unlock()
	return errors.Join(errs, t.raise(raise))
}

// Paused reports whether the transport is quiesced: a device's own
// goroutine must then not write into guest memory. Call it only with the
// transport's lock held (inside Deliver).
func (h *Host) Paused() bool { return h.t.quiesced }
