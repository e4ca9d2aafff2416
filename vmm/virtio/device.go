package virtio

// Device is one virtio device behind a transport (Block, Net). The transport
// calls every method except Close with its lock held, so a device needs no
// locking for state it touches only from these methods.
type Device interface {
	// DeviceID is the virtio device type (1 network, 2 block).
	DeviceID() uint32
	// Features returns the feature bits the device offers, VIRTIO_F_VERSION_1 included.
	Features() uint64
	// QueueSizes returns the maximum size of each of the device's queues.
	QueueSizes() []uint16
	// ReadConfig reads the device configuration space at offset into data.
	// Bytes outside it read as zero.
	ReadConfig(offset uint64, data []byte)
	// WriteConfig writes the device configuration space; most fields are read-only.
	WriteConfig(offset uint64, data []byte)
	// Activate starts the device after the driver set DRIVER_OK. h stays
	// valid until Reset.
	Activate(h *Host) error
	// Notify processes queue after the driver notified it.
	Notify(queue int) error
	// Reset returns the device to its initial state: it forgets h and stops
	// using the queues.
	Reset()
	// Close releases the backend. The transport calls it without its lock.
	Close() error
}

// Host is what a transport gives an activated device: its queues and a way
// to use them from the device's own goroutines.
type Host struct {
	t   *Transport
	gen uint64
}
