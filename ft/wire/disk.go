package wire

import (
	"encoding/binary"
)

// Disk replication messages (protocol version 2 additions; doc.go lists
// their layouts). The bytes of a DiskWrites are an encoded
// virtio.DiskWrites, which this package does not interpret: the ft roles
// decode it (every written range carries its own CRC-32C, the disk's
// end-to-end check, as PageSum is the pages'), and the backup's replica
// checks the disk's fingerprint. The frame's trailing CRC covers both
// messages whole.

// Limits on disk messages.
const (
	// MaxDisks is the most disks a protected guest may have.
	MaxDisks = 64
	// MaxDiskParts is the most parts one disk's writes of one epoch may be
	// split into (each at most MaxPayload).
	MaxDiskParts = 1 << 16
	// MaxDiskSize is the largest disk a DiskSeed may carry (16 TiB).
	MaxDiskSize = 1 << 44
	// FingerprintLen is the length of a disk's fingerprint (SHA-256).
	FingerprintLen = 32
)

// DiskWrites carries part Part (of Parts) of epoch Epoch's writes to disk
// Disk (of Disks, the guest's disk count). Data is the part's encoded
// virtio.DiskWrites.
type DiskWrites struct {
	Epoch       uint64
	Disk, Disks uint32
	Part, Parts uint32
	Data        []byte // at least one byte
}

// Type returns TypeDiskWrites.
func (DiskWrites) Type() Type { return TypeDiskWrites }

func checkDisk(t Type, disk, disks uint32) error {
	if disks == 0 || disks > MaxDisks || disk >= disks {
		return malformed(t, "disk %d of %d (at most %d disks)", disk, disks, MaxDisks)
	}
	return nil
}

func (m DiskWrites) check() error {
	const t = TypeDiskWrites
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	if err := checkDisk(t, m.Disk, m.Disks); err != nil {
		return err
	}
	switch {
	case m.Parts == 0 || m.Parts > MaxDiskParts || m.Part >= m.Parts:
		return malformed(t, "part %d of %d (at most %d parts)", m.Part, m.Parts, MaxDiskParts)
	case len(m.Data) == 0:
		return malformed(t, "no data")
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m DiskWrites) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint32(b, m.Disk)
	b = binary.LittleEndian.AppendUint32(b, m.Disks)
	b = binary.LittleEndian.AppendUint32(b, m.Part)
	b = binary.LittleEndian.AppendUint32(b, m.Parts)
	return append(b, m.Data...), nil
}

// MarshalBinary returns the message body.
func (m DiskWrites) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *DiskWrites) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeDiskWrites, b: data}
	v := DiskWrites{Epoch: d.u64(), Disk: d.u32(), Disks: d.u32(), Part: d.u32(), Parts: d.u32()}
	v.Data = append([]byte(nil), d.rest()...)
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// DiskSeed carries bytes Offset..Offset+len(Data) of disk Disk (of Disks)
// as it was at epoch Epoch, for a new backup's seed: the disk is Size bytes
// and has fingerprint Fingerprint (the receiver's replica checks the whole
// disk against it). A disk's seed is sent in order, its chunks ascending
// and not overlapping, the first at offset 0; bytes no chunk carries are
// zero (the sender leaves out chunks of zeros).
type DiskSeed struct {
	Epoch       uint64
	Disk, Disks uint32
	Size        uint64
	Offset      uint64
	Fingerprint [FingerprintLen]byte
	Data        []byte // at least one byte
}

// Type returns TypeDiskSeed.
func (DiskSeed) Type() Type { return TypeDiskSeed }

func (m DiskSeed) check() error {
	const t = TypeDiskSeed
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	if err := checkDisk(t, m.Disk, m.Disks); err != nil {
		return err
	}
	switch {
	case m.Size == 0 || m.Size > MaxDiskSize:
		return malformed(t, "disk of %d bytes (want 1 to %d)", m.Size, uint64(MaxDiskSize))
	case len(m.Data) == 0:
		return malformed(t, "no data")
	case m.Offset >= m.Size || uint64(len(m.Data)) > m.Size-m.Offset:
		return malformed(t, "chunk at %d of %d bytes ends beyond the disk's %d bytes", m.Offset, len(m.Data), m.Size)
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m DiskSeed) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint32(b, m.Disk)
	b = binary.LittleEndian.AppendUint32(b, m.Disks)
	b = binary.LittleEndian.AppendUint64(b, m.Size)
	b = binary.LittleEndian.AppendUint64(b, m.Offset)
	b = append(b, m.Fingerprint[:]...)
	return append(b, m.Data...), nil
}

// MarshalBinary returns the message body.
func (m DiskSeed) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *DiskSeed) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeDiskSeed, b: data}
	v := DiskSeed{Epoch: d.u64(), Disk: d.u32(), Disks: d.u32(), Size: d.u64(), Offset: d.u64()}
	copy(v.Fingerprint[:], d.take(FingerprintLen))
	v.Data = append([]byte(nil), d.rest()...)
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}
