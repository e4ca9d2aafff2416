package virtio

import (
	"crypto/sha256"
	"fmt"
)

// BlockState is a virtio-blk device's own state: what the guest saw of the
// disk (capacity, read-only) and the identity of the disk's content at the
// capture, so that a restore refuses another disk. The device keeps no
// request between notifications (it serves each one completely on the vCPU
// that notifies, and Quiesce serves the rest), so there is nothing else.
type BlockState struct {
	Capacity uint64 // in 512-byte sectors
	ReadOnly bool
	// DiskSize is the backing file's size in bytes.
	DiskSize uint64
	// Fingerprint is Fingerprint.Root of the disk's content.
	Fingerprint [sha256.Size]byte
}

// Encoding (the device body of a virtio-blk transport state):
//
//	capacity u64 | read-only u8 (0 or 1) | reserved 7 bytes (0) |
//	disk size u64 | chunk size u32 (FingerprintChunk) | reserved u32 (0) |
//	fingerprint 32 bytes
//
// The capacity must be the disk size in whole sectors.

const blockStateSize = 64

func (s *BlockState) validate() error {
	if s.Capacity != s.DiskSize/SectorSize {
		return badState("virtio-blk capacity %d sectors does not match a disk of %d bytes", s.Capacity, s.DiskSize)
	}
	return nil
}

// AppendBinary appends the encoded state to b.
func (s *BlockState) AppendBinary(b []byte) ([]byte, error) {
	if err := s.validate(); err != nil {
		return b, err
	}
	b = le.AppendUint64(b, s.Capacity)
	ro := byte(0)
	if s.ReadOnly {
		ro = 1
	}
	b = append(b, ro, 0, 0, 0, 0, 0, 0, 0)
	b = le.AppendUint64(b, s.DiskSize)
	b = le.AppendUint32(b, FingerprintChunk)
	b = le.AppendUint32(b, 0)
	return append(b, s.Fingerprint[:]...), nil
}

// DecodeBlockState decodes the device body of a virtio-blk transport state.
func DecodeBlockState(b []byte) (BlockState, error) {
	var s BlockState
	if len(b) != blockStateSize {
		return s, badState("virtio-blk state is %d bytes, want %d", len(b), blockStateSize)
	}
	if b[8] > 1 || !allZero(b[9:16]) || !allZero(b[28:32]) {
		return s, badState("virtio-blk state: read-only %d or a reserved field is not 0", b[8])
	}
	if c := le.Uint32(b[24:]); c != FingerprintChunk {
		return s, badState("virtio-blk state: fingerprint chunk size %d, this build uses %d", c, FingerprintChunk)
	}
	s = BlockState{Capacity: le.Uint64(b), ReadOnly: b[8] == 1, DiskSize: le.Uint64(b[16:])}
	copy(s.Fingerprint[:], b[32:])
	if err := s.validate(); err != nil {
		return s, err
	}
	return s, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// fingerprint brings the disk's fingerprint up to date: a full read the
// first time, then only the chunks the guest wrote since. It assumes that
// nothing but this device writes the disk file while it is attached.
// Called with wmu held.
func (b *Block) fingerprint() (*Fingerprint, error) {
	if b.fp == nil {
		fp, err := NewFingerprint(b.f, b.size)
		if err != nil {
			return nil, fmt.Errorf("virtio-blk %s: %w", b.path, err)
		}
		b.fp = fp
	} else if err := b.fp.Update(b.f, b.written); err != nil {
		b.fp = nil // some chunks may be stale now; start over next time
		return nil, fmt.Errorf("virtio-blk %s: %w", b.path, err)
	}
	clear(b.written)
	return b.fp, nil
}

// state returns the device's state, with the disk's fingerprint brought up
// to date. Call it only while the transport is quiesced (Transport.SaveState
// does).
func (b *Block) state() (BlockState, error) {
	b.wmu.Lock()
	defer b.wmu.Unlock()
	fp, err := b.fingerprint()
	if err != nil {
		return BlockState{}, err
	}
	return BlockState{Capacity: b.sectors, ReadOnly: b.readOnly, DiskSize: uint64(b.size), Fingerprint: fp.Root()}, nil
}

func (b *Block) appendState(dst []byte) ([]byte, error) {
	s, err := b.state()
	if err != nil {
		return dst, err
	}
	return s.AppendBinary(dst)
}

// prepareState checks that this device's disk is the one the state saw:
// same capacity, read-only setting, size and content fingerprint (a full
// read of the disk, unless SetFingerprint gave the disk's fingerprint).
func (b *Block) prepareState(body []byte) (func(), error) {
	s, err := DecodeBlockState(body)
	if err != nil {
		return nil, err
	}
	switch {
	case s.ReadOnly != b.readOnly:
		return nil, badState("virtio-blk: the state's disk is read-only=%v, %s is attached read-only=%v", s.ReadOnly, b.path, b.readOnly)
	case s.DiskSize != uint64(b.size):
		return nil, badState("virtio-blk: the state's disk is %d bytes, %s is %d bytes", s.DiskSize, b.path, b.size)
	case s.Capacity != b.sectors:
		return nil, badState("virtio-blk: the state's capacity is %d sectors, %s has %d", s.Capacity, b.path, b.sectors)
	}
	b.wmu.Lock()
	fp := b.trusted
	b.wmu.Unlock()
	if fp == nil {
		if fp, err = NewFingerprint(b.f, b.size); err != nil {
			return nil, fmt.Errorf("virtio-blk %s: %w", b.path, err)
		}
	}
	if root := fp.Root(); root != s.Fingerprint {
		return nil, badState("virtio-blk: %s has fingerprint %x, the state's disk %x: another disk, or one changed since the snapshot",
			b.path, root[:8], s.Fingerprint[:8])
	}
	return func() {
		b.wmu.Lock()
		b.fp, b.trusted = fp, nil
		clear(b.written)
		b.wmu.Unlock()
	}, nil
}

// quiesce serves every request the guest has made available, so that a
// capture sees none half done.
func (b *Block) quiesce() error {
	if b.h == nil || b.h.Queue(0) == nil {
		return nil
	}
	return b.Notify(0)
}

// flush writes the disk file's data to stable storage (a read-only disk has
// nothing to flush).
func (b *Block) flush() error {
	if b.readOnly {
		return nil
	}
	if err := b.f.Sync(); err != nil {
		return fmt.Errorf("virtio-blk flush %s: %w", b.path, err)
	}
	return nil
}
