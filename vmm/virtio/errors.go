package virtio

import (
	"errors"
	"fmt"
)

// ErrMalformed is wrapped by every error about a ring or descriptor chain
// that breaks the virtqueue rules (an address outside guest memory, a loop, a
// chain longer than the queue, a readable descriptor after a writable one, an
// available index that ran ahead by more than the queue size). The transport
// answers it by setting DEVICE_NEEDS_RESET and stops using the device until
// the driver resets it.
var ErrMalformed = errors.New("malformed virtqueue")

// ErrBadRequest is wrapped by errors about a well-formed chain whose request
// the device cannot carry out (a short header, data buffers in the wrong
// direction, a misaligned length, an out-of-range sector). The device fails
// that request (virtio-blk answers VIRTIO_BLK_S_IOERR, virtio-net drops the
// frame) and goes on.
var ErrBadRequest = errors.New("bad virtio request")

// ErrBadAccess is wrapped by errors about a guest register access the
// transport ignored: a width other than 4 bytes outside configuration space,
// a write to a read-only register, a queue configured while ready, a notify
// of a queue that is not ready.
var ErrBadAccess = errors.New("ignored virtio-mmio access")

// ErrInactive is returned by Host.Deliver once the device has been reset or
// the transport closed: the device must not use its queues any more.
var ErrInactive = errors.New("virtio device is not active")

// ErrNotWritable is wrapped by NewBlock's error when the disk file cannot be
// opened for writing although readOnly is false.
var ErrNotWritable = errors.New("disk file cannot be opened for writing")

// ErrNoTap is wrapped by NewNet's error when no network interface has the
// given name, and ErrNotTap when the interface exists but is not a tap device.
var (
	ErrNoTap  = errors.New("no such tap device")
	ErrNotTap = errors.New("network interface is not a tap device")
)

// QueueError says which queue of which device an error happened on.
type QueueError struct {
	Device string // "virtio-blk", "virtio-net"
	Queue  int
	Err    error
}

func (e *QueueError) Error() string {
	return fmt.Sprintf("%s queue %d: %v", e.Device, e.Queue, e.Err)
}

func (e *QueueError) Unwrap() error { return e.Err }

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, args...))
}

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadRequest, fmt.Sprintf(format, args...))
}

func badAccess(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrBadAccess, fmt.Sprintf(format, args...))
}
