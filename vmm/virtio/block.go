package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
)

// virtio-blk feature bits, request types and status values (VIRTIO 1.x
// section 5.2).
const (
	BlockFSegMax = 1 << 2 // VIRTIO_BLK_F_SEG_MAX
	BlockFRO     = 1 << 5 // VIRTIO_BLK_F_RO
	BlockFFlush  = 1 << 9 // VIRTIO_BLK_F_FLUSH

	BlockTIn    = 0 // VIRTIO_BLK_T_IN: read sectors
	BlockTOut   = 1 // VIRTIO_BLK_T_OUT: write sectors
	BlockTFlush = 4 // VIRTIO_BLK_T_FLUSH
	BlockTGetID = 8 // VIRTIO_BLK_T_GET_ID: the 20-byte serial

	BlockSOK     = 0 // VIRTIO_BLK_S_OK
	BlockSIOErr  = 1 // VIRTIO_BLK_S_IOERR
	BlockSUnsupp = 2 // VIRTIO_BLK_S_UNSUPP

	// SectorSize is the unit of virtio-blk capacity and request sectors.
	SectorSize = 512
	// BlockIDBytes is the length of the GET_ID serial.
	BlockIDBytes = 20

	blockHeaderSize = 16 // struct virtio_blk_req: le32 type, le32 reserved, le64 sector
	blockConfigSize = 24 // capacity, size_max, seg_max, geometry, blk_size
)

// Block is a virtio-blk device backed by a file (or a block device). Reads
// and writes go straight between the file and guest memory with pread and
// pwrite; FLUSH calls fsync.
type Block struct {
	f        *os.File
	path     string
	readOnly bool
	size     int64  // the file's size in bytes
	sectors  uint64 // capacity; a partial sector at the end of the file is not used
	id       [BlockIDBytes]byte

	// wmu guards the write tracking below. It is taken inside the
	// transport's lock (by Notify and SaveState) and on its own by the
	// harvest (TakeWrites, ReadWrites).
	wmu sync.Mutex
	// The disk's fingerprint as of the last state capture, harvest or
	// restore (nil before), and the chunks written since (bit i:
	// FingerprintChunk i).
	fp      *Fingerprint
	written []uint64
	// wset is the replication write set: bit i is the WriteBlock-sized
	// block i, written since the last TakeWrites; wcount counts its bits.
	wset   []uint64
	wcount uint64
	// trusted is a fingerprint given by SetFingerprint, which the next
	// restore uses instead of reading the disk.
	trusted *Fingerprint

	// h is set while the device is active; guarded by the transport's lock.
	h *Host
}

// NewBlock opens the file at path as a virtio-blk disk. With readOnly the
// device offers VIRTIO_BLK_F_RO and fails every write request.
//
// Without readOnly, a file that cannot be written is refused with an error
// wrapping ErrNotWritable: one the kernel will not open for writing (no
// permission, a read-only file system, an immutable file), and also a
// regular file that has no write permission bit at all. The second check is
// Understudy's own: root opens a mode 0444 file for writing without
// complaint, but such a file is read-only by intent, and writing to it would
// surprise its owner.
func NewBlock(path string, readOnly bool) (*Block, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag|syscall.O_CLOEXEC, 0)
	if err != nil {
		if !readOnly && (errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.ETXTBSY)) {
			return nil, fmt.Errorf("virtio-blk: %w: %w (attach it read-only instead)", ErrNotWritable, err)
		}
		return nil, fmt.Errorf("virtio-blk: open disk: %w", err)
	}
	b := &Block{f: f, path: path, readOnly: readOnly}
	if err := b.init(); err != nil {
		f.Close()
		return nil, err
	}
	return b, nil
}

func (b *Block) init() error {
	fi, err := b.f.Stat()
	if err != nil {
		return fmt.Errorf("virtio-blk: stat disk: %w", err)
	}
	switch {
	case fi.Mode().IsRegular():
		if !b.readOnly && fi.Mode().Perm()&0o222 == 0 {
			return fmt.Errorf("virtio-blk: %w: %s has mode %v, no write permission for anyone (attach it read-only instead)",
				ErrNotWritable, b.path, fi.Mode().Perm())
		}
	case fi.Mode()&fs.ModeDevice != 0 && fi.Mode()&fs.ModeCharDevice == 0:
		// A block device: its size comes from seeking to its end.
	default:
		return fmt.Errorf("virtio-blk: disk %s is a %v, not a regular file or block device", b.path, fi.Mode().Type())
	}
	size, err := b.f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("virtio-blk: size of disk %s: %w", b.path, err)
	}
	b.size = size
	b.sectors = uint64(size) / SectorSize
	b.written = make([]uint64, ((size+FingerprintChunk-1)/FingerprintChunk+63)/64)
	b.wset = make([]uint64, ((size+WriteBlock-1)/WriteBlock+63)/64)
	copy(b.id[:], filepath.Base(b.path))
	return nil
}

// Capacity returns the disk size in 512-byte sectors.
func (b *Block) Capacity() uint64 { return b.sectors }

// ReadOnly reports whether the device offers VIRTIO_BLK_F_RO.
func (b *Block) ReadOnly() bool { return b.readOnly }

// DeviceID returns DeviceIDBlock.
func (b *Block) DeviceID() uint32 { return DeviceIDBlock }

// Features returns VERSION_1, SEG_MAX, FLUSH, and RO for a read-only disk.
func (b *Block) Features() uint64 {
	f := uint64(blockFeatures)
	if b.readOnly {
		f |= BlockFRO
	}
	return f
}

// QueueSizes returns one request queue of DefaultQueueSize.
func (b *Block) QueueSizes() []uint16 { return blockQueueSizes() }

// blockFeatures are the features every virtio-blk device offers; a
// read-only one adds BlockFRO.
const blockFeatures = FeatureVersion1 | BlockFSegMax | BlockFFlush

func blockQueueSizes() []uint16 { return []uint16{DefaultQueueSize} }

// ReadConfig reads struct virtio_blk_config: the capacity in sectors and
// seg_max (the queue size minus the header and status descriptors).
func (b *Block) ReadConfig(offset uint64, data []byte) {
	var cfg [blockConfigSize]byte
	binary.LittleEndian.PutUint64(cfg[0:], b.sectors)
	binary.LittleEndian.PutUint32(cfg[12:], DefaultQueueSize-2)
	readConfig(cfg[:], offset, data)
}

func readConfig(cfg []byte, offset uint64, data []byte) {
	clear(data)
	if offset < uint64(len(cfg)) {
		copy(data, cfg[offset:])
	}
}

// WriteConfig ignores the write: the fields are read-only (writeback is
// not offered).
func (b *Block) WriteConfig(offset uint64, data []byte) {}

// Activate starts serving requests.
func (b *Block) Activate(h *Host) error {
	b.h = h
	return nil
}

// Reset stops serving requests.
func (b *Block) Reset() { b.h = nil }

// Close closes the file.
func (b *Block) Close() error {
	if err := b.f.Close(); err != nil {
		return fmt.Errorf("virtio-blk: close disk %s: %w", b.path, err)
	}
	return nil
}

// Notify serves every available request of queue 0. A request the device
// cannot carry out is completed with VIRTIO_BLK_S_IOERR or UNSUPP and
// reported (ErrBadRequest); a malformed chain, or one without a writable
// status byte, stops the queue (ErrMalformed).
func (b *Block) Notify(queue int) error {
	if b.h == nil {
		return badAccess("virtio-blk notified while inactive")
	}
	q := b.h.Queue(queue)
	if q == nil {
		return badAccess("virtio-blk queue %d is not ready", queue)
	}
	var first error
	for {
		c, err := q.Pop()
		if err != nil {
			return err
		}
		if c == nil {
			return first
		}
		written, err := b.serve(c)
		if errors.Is(err, ErrMalformed) {
			return err
		}
		if err != nil && first == nil {
			first = err
		}
		if err := q.Push(c.Head, written); err != nil {
			return err
		}
	}
}

// serve carries out one request and writes its status byte. It returns the
// number of bytes written into the chain's writable buffers.
func (b *Block) serve(c *Chain) (uint32, error) {
	mem := b.h.Memory()
	wlen := c.WritableLen()
	if wlen == 0 {
		return 0, malformed("virtio-blk request (head %d) has no device-writable status byte", c.Head)
	}
	dataIn := wlen - 1 // writable bytes before the status byte
	status, n, err := b.request(c, dataIn)
	if _, werr := scatter(mem, c.Writable, dataIn, []byte{status}); werr != nil {
		return 0, malformed("virtio-blk status byte: %v", werr)
	}
	return uint32(min(n, 0xfffffffe)) + 1, err
}

// request carries out the request and returns its status and the number of
// data bytes it wrote into guest memory.
func (b *Block) request(c *Chain, dataIn uint64) (byte, uint64, error) {
	var hdr [blockHeaderSize]byte
	if gather(c.Readable, 0, hdr[:]) < blockHeaderSize {
		return BlockSIOErr, 0, badRequest("virtio-blk request header is %d bytes, want %d", c.ReadableLen(), blockHeaderSize)
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	dataOut := c.ReadableLen() - blockHeaderSize // readable bytes after the header
	switch typ {
	case BlockTIn:
		if dataOut != 0 {
			return BlockSIOErr, 0, badRequest("virtio-blk read has %d device-readable data bytes; data must be device-writable", dataOut)
		}
		if err := b.checkRange(sector, dataIn); err != nil {
			return BlockSIOErr, 0, err
		}
		if err := b.readIn(c.Writable, dataIn, int64(sector*SectorSize)); err != nil {
			return BlockSIOErr, 0, err
		}
		return BlockSOK, dataIn, nil
	case BlockTOut:
		if dataIn != 0 {
			return BlockSIOErr, 0, badRequest("virtio-blk write has %d device-writable data bytes; data must be device-readable", dataIn)
		}
		if b.readOnly {
			return BlockSIOErr, 0, badRequest("virtio-blk write to a read-only disk")
		}
		if err := b.checkRange(sector, dataOut); err != nil {
			return BlockSIOErr, 0, err
		}
		if err := b.writeOut(c.Readable, int64(sector*SectorSize)); err != nil {
			return BlockSIOErr, 0, err
		}
		return BlockSOK, 0, nil
	case BlockTFlush:
		if b.readOnly {
			return BlockSOK, 0, nil
		}
		if err := b.f.Sync(); err != nil {
			return BlockSIOErr, 0, fmt.Errorf("virtio-blk flush %s: %w", b.path, err)
		}
		return BlockSOK, 0, nil
	case BlockTGetID:
		if dataOut != 0 {
			return BlockSIOErr, 0, badRequest("virtio-blk GET_ID has %d device-readable data bytes", dataOut)
		}
		n := min(dataIn, BlockIDBytes)
		if _, err := scatter(b.h.Memory(), c.Writable, 0, b.id[:n]); err != nil {
			return BlockSIOErr, 0, badRequest("virtio-blk GET_ID: %v", err)
		}
		return BlockSOK, n, nil
	}
	return BlockSUnsupp, 0, badRequest("virtio-blk request type %d is not supported", typ)
}

func (b *Block) checkRange(sector, n uint64) error {
	if n%SectorSize != 0 {
		return badRequest("virtio-blk data length %d is not a multiple of %d", n, SectorSize)
	}
	if sector > b.sectors || n/SectorSize > b.sectors-sector {
		return badRequest("virtio-blk sectors [%d, +%d) are beyond the disk's %d sectors", sector, n/SectorSize, b.sectors)
	}
	return nil
}

// readIn reads n bytes at off from the file straight into the writable
// buffers (before the status byte) and marks them dirty.
func (b *Block) readIn(bufs []Buffer, n uint64, off int64) error {
	mem := b.h.Memory()
	for _, buf := range bufs {
		if n == 0 {
			break
		}
		p := buf.Data[:min(uint64(len(buf.Data)), n)]
		got, err := b.f.ReadAt(p, off)
		if got > 0 {
			if derr := mem.MarkDirty(buf.GPA, uint64(got)); derr != nil {
				return fmt.Errorf("virtio-blk: mark dirty: %w", derr)
			}
		}
		if err != nil {
			return fmt.Errorf("virtio-blk read %s at %d: %w", b.path, off, err)
		}
		off += int64(len(p))
		n -= uint64(len(p))
	}
	return nil
}

// writeOut writes the readable buffers after the header to the file at off.
func (b *Block) writeOut(bufs []Buffer, off int64) error {
	skip := uint64(blockHeaderSize)
	for _, buf := range bufs {
		p := buf.Data
		if skip >= uint64(len(p)) {
			skip -= uint64(len(p))
			continue
		}
		p, skip = p[skip:], 0
		n, err := b.f.WriteAt(p, off)
		b.markWritten(off, n)
		if err != nil {
			return fmt.Errorf("virtio-blk write %s at %d: %w", b.path, off, err)
		}
		off += int64(len(p))
	}
	return nil
}
