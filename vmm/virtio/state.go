package virtio

// QueueState is one split virtqueue as the driver configured it and as the
// device has advanced it. Together with TransportState it is everything a
// snapshot needs to resume the queue.
type QueueState struct {
	Size   uint16 // QueueNum: number of descriptors, a power of 2
	Ready  bool   // QueueReady
	Desc   uint64 // guest-physical address of the descriptor table
	Driver uint64 // guest-physical address of the available ring
	Device uint64 // guest-physical address of the used ring
	// LastAvail is the available-ring index of the next chain the device
	// will take (free-running, wraps at 2^16).
	LastAvail uint16
	// UsedIdx is the used-ring index the device will write next
	// (free-running; the used ring's idx field holds the same value).
	UsedIdx uint16
}

// TransportState is the guest-visible state of a virtio-mmio transport: the
// registers and every queue. The device's own state (BlockState, NetState)
// lives in the device; Transport.SaveState encodes both (mmio_state.go).
type TransportState struct {
	Status            uint32 // device status (StatusAcknowledge | ...)
	DeviceFeaturesSel uint32
	DriverFeaturesSel uint32
	DriverFeatures    uint64 // features the driver acknowledged
	// DriverFeaturesBeyond64 records that the driver accepted a feature
	// above bit 63 (none exist here), so FEATURES_OK is refused.
	DriverFeaturesBeyond64 bool
	QueueSel               uint32
	InterruptStatus        uint32 // InterruptUsedBuffer | InterruptConfigChange
	ConfigGeneration       uint32
	Queues                 []QueueState
}
