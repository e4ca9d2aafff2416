package virtio

// virtio-mmio register offsets (VIRTIO 1.x section 4.2.2).
const (
	regMagicValue        = 0x000
	regVersion           = 0x004
	regDeviceID          = 0x008
	regVendorID          = 0x00c
	regDeviceFeatures    = 0x010
	regDeviceFeaturesSel = 0x014
	regDriverFeatures    = 0x020
	regDriverFeaturesSel = 0x024
	regQueueSel          = 0x030
	regQueueNumMax       = 0x034
	regQueueNum          = 0x038
	regQueueReady        = 0x044
	regQueueNotify       = 0x050
	regInterruptStatus   = 0x060
	regInterruptACK      = 0x064
	regStatus            = 0x070
	regQueueDescLow      = 0x080
	regQueueDescHigh     = 0x084
	regQueueDriverLow    = 0x090
	regQueueDriverHigh   = 0x094
	regQueueDeviceLow    = 0x0a0
	regQueueDeviceHigh   = 0x0a4
	regSHMSel            = 0x0ac
	regSHMLenLow         = 0x0b0
	regSHMLenHigh        = 0x0b4
	regSHMBaseLow        = 0x0b8
	regSHMBaseHigh       = 0x0bc
	regConfigGeneration  = 0x0fc
	regConfig            = 0x100
)

const (
	// MagicValue is what the MagicValue register reads: "virt" in little endian.
	MagicValue = 0x74726976
	// Version is the virtio-mmio version this transport implements (modern).
	Version = 2
	// VendorID is what the VendorID register reads: "USDY" in little endian.
	VendorID = 0x59445355
)

// Device status bits (VIRTIO 1.x section 2.1).
const (
	StatusAcknowledge      = 1
	StatusDriver           = 2
	StatusDriverOK         = 4
	StatusFeaturesOK       = 8
	StatusDeviceNeedsReset = 0x40
	StatusFailed           = 0x80
)

// Interrupt status bits.
const (
	// InterruptUsedBuffer says the device put buffers into a used ring.
	InterruptUsedBuffer = 1
	// InterruptConfigChange says the configuration changed, or the device
	// needs a reset.
	InterruptConfigChange = 2
)

// Transport feature bits (VIRTIO 1.x section 6).
const (
	// FeatureVersion1 (VIRTIO_F_VERSION_1) marks a modern device; the
	// transport refuses FEATURES_OK without it.
	FeatureVersion1 = 1 << 32
)

// Device IDs.
const (
	DeviceIDNet   = 1
	DeviceIDBlock = 2
)

// Split virtqueue layout (VIRTIO 1.x section 2.7).
const (
	descSize        = 16 // struct virtq_desc
	descFNext       = 1  // VIRTQ_DESC_F_NEXT
	descFWrite      = 2  // VIRTQ_DESC_F_WRITE
	descFIndirect   = 4  // VIRTQ_DESC_F_INDIRECT
	usedElemSize    = 8  // struct virtq_used_elem
	ringHeaderBytes = 4  // flags and idx of the avail and used rings
)

// DefaultQueueSize is the largest queue size the devices here offer.
const DefaultQueueSize = 256
