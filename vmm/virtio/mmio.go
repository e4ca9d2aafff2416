package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
)

// Transport is a virtio-mmio (version 2) register window in front of one
// Device. Read and Write may be called concurrently from several vCPUs.
//
// Read and Write always handle the access completely. A non-nil error says
// what was wrong for the log: ErrBadAccess for an access the transport
// ignored, ErrMalformed after which the device needs a reset (the status
// register shows DEVICE_NEEDS_RESET and a configuration-change interrupt was
// raised), ErrBadRequest for a request the device failed; any other error is
// a host failure (the interrupt could not be raised). None of them require
// stopping the machine.
type Transport struct {
	dev  Device
	name string
	mem  Memory
	irq  Interrupt

	// mu guards everything below, the queues and the device's own state
	// (the device is only called with mu held).
	mu     sync.Mutex
	st     TransportState
	queues []*Queue
	host   *Host // non-nil while the device is active (DRIVER_OK)
	gen    uint64
	closed bool
	// quiesced is set from Quiesce or LoadState until Resume: the device
	// must not write into guest memory.
	quiesced bool
	// restored is set by LoadState until Resume, which then raises a
	// pending interrupt again.
	restored bool
}

// NewMMIO puts dev behind a virtio-mmio transport that accesses guest memory
// through mem and calls irq when it has used buffers or a configuration
// change for the driver.
func NewMMIO(dev Device, mem Memory, irq Interrupt) *Transport {
	t := &Transport{dev: dev, name: deviceName(dev.DeviceID()), mem: mem, irq: irq}
	sizes := dev.QueueSizes()
	t.st.Queues = make([]QueueState, len(sizes))
	t.queues = make([]*Queue, len(sizes))
	for i, max := range sizes {
		t.queues[i] = &Queue{index: i, max: max, st: &t.st.Queues[i], mem: mem}
	}
	return t
}

func deviceName(id uint32) string {
	switch id {
	case DeviceIDNet:
		return "virtio-net"
	case DeviceIDBlock:
		return "virtio-blk"
	}
	return fmt.Sprintf("virtio device %d", id)
}

// State returns a copy of the transport's guest-visible state.
func (t *Transport) State() TransportState {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := t.st
	st.Queues = append([]QueueState(nil), t.st.Queues...)
	return st
}

// Device returns the device behind the transport.
func (t *Transport) Device() Device { return t.dev }

// Read handles a guest read of len(data) bytes at offset within the register
// window: 4 bytes for registers, 1, 2, 4 or 8 bytes in configuration space.
// What the guest may not read reads as zero.
func (t *Transport) Read(offset uint64, data []byte) error {
	clear(data)
	if offset >= MMIOSize || uint64(len(data)) > MMIOSize-offset {
		return badAccess("read of %d bytes at %#x is outside the %#x-byte window", len(data), offset, MMIOSize)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if offset >= regConfig {
		if !validWidth(len(data)) {
			return badAccess("config read of %d bytes at %#x", len(data), offset)
		}
		t.dev.ReadConfig(offset-regConfig, data)
		return nil
	}
	if len(data) != 4 || offset%4 != 0 {
		return badAccess("register read of %d bytes at %#x: registers are 4 bytes wide and aligned", len(data), offset)
	}
	v, err := t.readReg(offset)
	binary.LittleEndian.PutUint32(data, v)
	return err
}

func validWidth(n int) bool { return n == 1 || n == 2 || n == 4 || n == 8 }

func (t *Transport) selected() *Queue {
	if int64(t.st.QueueSel) < int64(len(t.queues)) {
		return t.queues[t.st.QueueSel]
	}
	return nil
}

func (t *Transport) readReg(offset uint64) (uint32, error) {
	q := t.selected()
	switch offset {
	case regMagicValue:
		return MagicValue, nil
	case regVersion:
		return Version, nil
	case regDeviceID:
		return t.dev.DeviceID(), nil
	case regVendorID:
		return VendorID, nil
	case regDeviceFeatures:
		f := t.dev.Features() | FeatureVersion1
		switch t.st.DeviceFeaturesSel {
		case 0:
			return uint32(f), nil
		case 1:
			return uint32(f >> 32), nil
		}
		return 0, nil
	case regQueueNumMax:
		if q == nil {
			return 0, nil
		}
		return uint32(q.max), nil
	case regQueueReady:
		if q == nil || !q.st.Ready {
			return 0, nil
		}
		return 1, nil
	case regInterruptStatus:
		return t.st.InterruptStatus, nil
	case regStatus:
		return t.st.Status, nil
	case regSHMLenLow, regSHMLenHigh, regSHMBaseLow, regSHMBaseHigh:
		// No shared memory regions: length and base read as all ones.
		return 0xffffffff, nil
	case regConfigGeneration:
		return t.st.ConfigGeneration, nil
	}
	return 0, badAccess("read of write-only or reserved register %#x", offset)
}

// Write handles a guest write of len(data) bytes at offset within the
// register window. A write to QueueNotify processes the queue.
func (t *Transport) Write(offset uint64, data []byte) error {
	if offset >= MMIOSize || uint64(len(data)) > MMIOSize-offset {
		return badAccess("write of %d bytes at %#x is outside the %#x-byte window", len(data), offset, MMIOSize)
	}
	t.mu.Lock()
	var err error
	if offset >= regConfig {
		if validWidth(len(data)) {
			t.dev.WriteConfig(offset-regConfig, data)
		} else {
			err = badAccess("config write of %d bytes at %#x", len(data), offset)
		}
	} else if len(data) != 4 || offset%4 != 0 {
		err = badAccess("register write of %d bytes at %#x: registers are 4 bytes wide and aligned", len(data), offset)
	} else {
		err = t.writeReg(offset, binary.LittleEndian.Uint32(data))
	}
	raise := t.settle(err)
	t.mu.Unlock()
	return errors.Join(err, t.raise(raise))
}

// settle runs after anything that may have used a queue: it turns a
// malformed ring into DEVICE_NEEDS_RESET and collects the interrupt bits to
// raise. It reports whether to call irq.
func (t *Transport) settle(err error) bool {
	raise := false
	if errors.Is(err, ErrMalformed) && t.st.Status&StatusDeviceNeedsReset == 0 {
		t.st.Status |= StatusDeviceNeedsReset
		t.st.InterruptStatus |= InterruptConfigChange
		raise = true
	}
	for _, q := range t.queues {
		if q.used {
			q.used = false
			t.st.InterruptStatus |= InterruptUsedBuffer
			raise = true
		}
	}
	return raise
}

func (t *Transport) raise(raise bool) error {
	if !raise || t.irq == nil {
		return nil
	}
	if err := t.irq(); err != nil {
		return fmt.Errorf("%s: raise interrupt: %w", t.name, err)
	}
	return nil
}

func setHalf(v *uint64, high bool, w uint32) {
	if high {
		*v = *v&0xffffffff | uint64(w)<<32
	} else {
		*v = *v&^0xffffffff | uint64(w)
	}
}

func (t *Transport) writeReg(offset uint64, v uint32) error {
	switch offset {
	case regDeviceFeaturesSel:
		t.st.DeviceFeaturesSel = v
		return nil
	case regDriverFeaturesSel:
		t.st.DriverFeaturesSel = v
		return nil
	case regDriverFeatures:
		if t.st.Status&StatusFeaturesOK != 0 {
			return badAccess("driver features written after FEATURES_OK")
		}
		if t.st.DriverFeaturesSel > 1 {
			if v != 0 {
				t.st.DriverFeaturesBeyond64 = true
				return badAccess("driver features word %d = %#x: no such features are offered", t.st.DriverFeaturesSel, v)
			}
			return nil
		}
		setHalf(&t.st.DriverFeatures, t.st.DriverFeaturesSel == 1, v)
		return nil
	case regQueueSel:
		t.st.QueueSel = v
		return nil
	case regQueueNotify:
		return t.notify(v)
	case regInterruptACK:
		t.st.InterruptStatus &^= v
		return nil
	case regStatus:
		return t.writeStatus(v)
	case regSHMSel:
		return nil
	case regQueueNum, regQueueReady, regQueueDescLow, regQueueDescHigh,
		regQueueDriverLow, regQueueDriverHigh, regQueueDeviceLow, regQueueDeviceHigh:
		return t.writeQueueReg(offset, v)
	}
	return badAccess("write of %#x to read-only or reserved register %#x", v, offset)
}

func (t *Transport) writeQueueReg(offset uint64, v uint32) error {
	q := t.selected()
	if q == nil {
		return badAccess("queue register %#x written with QueueSel %d, but the device has %d queues",
			offset, t.st.QueueSel, len(t.queues))
	}
	st := q.st
	if offset == regQueueReady {
		switch {
		case v == 0:
			st.Ready = false
		case st.Ready:
		default:
			if err := validateQueue(memoryRAM(t.mem), st, q.max); err != nil {
				return &QueueError{Device: t.name, Queue: q.index, Err: err}
			}
			st.Ready = true
		}
		return nil
	}
	if st.Ready {
		return badAccess("queue %d register %#x written while the queue is ready", q.index, offset)
	}
	switch offset {
	case regQueueNum:
		st.Size = uint16(v)
		if v > 0xffff {
			st.Size = 0 // refused when the queue is made ready
		}
	case regQueueDescLow, regQueueDescHigh:
		setHalf(&st.Desc, offset == regQueueDescHigh, v)
	case regQueueDriverLow, regQueueDriverHigh:
		setHalf(&st.Driver, offset == regQueueDriverHigh, v)
	case regQueueDeviceLow, regQueueDeviceHigh:
		setHalf(&st.Device, offset == regQueueDeviceHigh, v)
	}
	return nil
}

func (t *Transport) writeStatus(v uint32) error {
	if v == 0 {
		t.reset()
		return nil
	}
	old := t.st.Status
	if v&^old&StatusDeviceNeedsReset != 0 {
		return badAccess("driver set DEVICE_NEEDS_RESET in status %#x", v)
	}
	v |= old & StatusDeviceNeedsReset // only the device sets or clears it
	if old&^v != 0 {
		return badAccess("status %#x clears bits of %#x; only a write of 0 (reset) may", v, old)
	}
	if v&StatusFeaturesOK != 0 && old&StatusFeaturesOK == 0 {
		offered := t.dev.Features() | FeatureVersion1
		if t.st.DriverFeaturesBeyond64 {
			t.st.Status = v &^ (StatusFeaturesOK | StatusDriverOK)
			return badAccess("FEATURES_OK refused: the driver accepted features above bit 63, which were not offered")
		}
		if extra := t.st.DriverFeatures &^ offered; extra != 0 {
			t.st.Status = v &^ (StatusFeaturesOK | StatusDriverOK)
			return badAccess("FEATURES_OK refused: the driver accepted features %#x that were not offered", extra)
		}
		if t.st.DriverFeatures&FeatureVersion1 == 0 {
			t.st.Status = v &^ (StatusFeaturesOK | StatusDriverOK)
			return badAccess("FEATURES_OK refused: the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)")
		}
	}
	if v&StatusDriverOK != 0 && old&StatusDriverOK == 0 {
		if v&StatusFeaturesOK == 0 {
			t.st.Status = v &^ StatusDriverOK
			return badAccess("DRIVER_OK refused: FEATURES_OK is not set")
		}
		t.st.Status = v
		return t.activate()
	}
	t.st.Status = v
	return nil
}

func (t *Transport) activate() error {
	if t.closed {
		return badAccess("DRIVER_OK after the transport was closed")
	}
	t.gen++
	t.host = &Host{t: t, gen: t.gen}
	if err := t.dev.Activate(t.host); err != nil {
		return &QueueError{Device: t.name, Queue: -1, Err: fmt.Errorf("%w: activate: %w", ErrMalformed, err)}
	}
	return nil
}

func (t *Transport) reset() {
	t.dev.Reset()
	t.host = nil
	t.gen++
	gen := t.st.ConfigGeneration
	t.st = TransportState{Queues: t.st.Queues, ConfigGeneration: gen}
	for i := range t.st.Queues {
		t.st.Queues[i] = QueueState{}
	}
	for _, q := range t.queues {
		q.used = false
	}
}

func (t *Transport) notify(v uint32) error {
	if int64(v) >= int64(len(t.queues)) {
		return badAccess("notify of queue %d, but the device has %d queues", v, len(t.queues))
	}
	q := t.queues[v]
	switch {
	case t.host == nil:
		return badAccess("notify of queue %d before DRIVER_OK", v)
	case t.st.Status&StatusDeviceNeedsReset != 0:
		return badAccess("notify of queue %d while the device needs a reset", v)
	case !q.st.Ready:
		return badAccess("notify of queue %d, which is not ready", v)
	case t.quiesced:
		// The machine is paused for a capture (a vCPU's exit raced the
		// pause): guest memory must not change. Resume kicks every
		// queue, so the notification is not lost.
		return nil
	}
	if err := t.dev.Notify(int(v)); err != nil {
		return &QueueError{Device: t.name, Queue: int(v), Err: err}
	}
	return nil
}

// Close stops the device's goroutines and closes its backend. Later
// accesses find the device reset.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.reset()
	t.mu.Unlock()
	if err := t.dev.Close(); err != nil {
		return fmt.Errorf("%s: close: %w", t.name, err)
	}
	return nil
}

// Name returns the device's name for messages ("virtio-blk", "virtio-net").
func (h *Host) Name() string { return h.t.name }

// Queue returns the device's queue i, or nil if there is no such queue or it
// is not ready. Call it only with the transport's lock held: from
// Device.Notify or inside Deliver.
func (h *Host) Queue(i int) *Queue {
	if i < 0 || i >= len(h.t.queues) || !h.t.queues[i].st.Ready {
		return nil
	}
	return h.t.queues[i]
}

// Memory returns guest memory.
func (h *Host) Memory() Memory { return h.t.mem }

// Deliver runs fn with the transport's lock held, for a device's own
// goroutine (virtio-net receive) that wants to use its queues, then raises
// the interrupt if fn pushed used buffers. It returns ErrInactive without
// calling fn if the device was reset, the transport closed, or the device
// needs a reset since h was handed out. An error from fn wrapping
// ErrMalformed sets DEVICE_NEEDS_RESET.
func (h *Host) Deliver(fn func() error) error {
	t := h.t
	t.mu.Lock()
	if t.closed || t.host != h || t.gen != h.gen || t.st.Status&StatusDeviceNeedsReset != 0 {
		t.mu.Unlock()
		return ErrInactive
	}
	err := fn()
	raise := t.settle(err)
	t.mu.Unlock()
	return errors.Join(err, t.raise(raise))
}
