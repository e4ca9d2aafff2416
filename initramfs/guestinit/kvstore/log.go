package kvstore

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// BlockSize is the smallest unit the log reads and writes, and the
// alignment of its buffers and offsets: enough for O_DIRECT on any device
// whose logical block is at most 4 KiB (a larger one raises it).
const BlockSize = 4096

// maxBlock bounds a device's logical block size.
const maxBlock = 64 << 10

// scanBlocks is how many blocks a scan reads at once.
const scanBlocks = 16

// Errors of the log.
var (
	ErrFull    = errors.New("log full")
	ErrNoLog   = errors.New("no log on the device")
	ErrCorrupt = errors.New("log corrupt")
)

// diskLog is the append-only log on a device or file. It is not safe for
// concurrent use: Store serializes it.
type diskLog struct {
	path   string
	f      *os.File
	direct bool   // f was opened with O_DIRECT
	block  int    // bytes per I/O, a multiple of RecordSize
	slots  uint64 // slots on the device, the header's included
	id     uint64 // the log id in the header
	n      uint64 // PUT records in the log; the next goes to slot n+1

	tail      []byte // the block holding slot n+1, as on the device up to slot n
	tailBlock int64  // which block tail holds
}

// geometry is how a file is read and written.
type geometry struct {
	direct bool
	block  int
	slots  uint64
}

// tryDirect says whether openFile tries O_DIRECT; tests clear it to run
// the path taken where the file system refuses O_DIRECT.
var tryDirect = true

// openFile opens path for reading (and writing if rw) with O_DIRECT where
// the file system allows it, else without, and works out its geometry.
func openFile(path string, rw bool) (*os.File, geometry, error) {
	flag := os.O_RDONLY
	if rw {
		flag = os.O_RDWR
	}
	g := geometry{direct: tryDirect, block: BlockSize}
	f, err := os.OpenFile(path, flag|unix.O_DIRECT, 0)
	if !tryDirect || errors.Is(err, unix.EINVAL) { // tmpfs before Linux 6.6 and a few others refuse O_DIRECT
		if err == nil {
			f.Close()
		}
		g.direct = false
		f, err = os.OpenFile(path, flag, 0)
	}
	if err != nil {
		return nil, g, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, g, err
	}
	switch {
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		lbs, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil {
			f.Close()
			return nil, g, fmt.Errorf("%s: logical block size: %w", path, err)
		}
		if lbs > g.block {
			if lbs > maxBlock || lbs&(lbs-1) != 0 {
				f.Close()
				return nil, g, fmt.Errorf("%s: logical block size %d not supported", path, lbs)
			}
			g.block = lbs
		}
	case !fi.Mode().IsRegular():
		f.Close()
		return nil, g, fmt.Errorf("%s: neither a block device nor a regular file", path)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, g, err
	}
	g.slots = uint64(size/int64(g.block)) * uint64(g.block/RecordSize)
	if g.slots < 2 {
		f.Close()
		return nil, g, fmt.Errorf("%s: %d bytes, too small for a log (at least %d)", path, size, g.block)
	}
	return f, g, nil
}

// alignedBuffer returns n bytes of page-aligned memory (as O_DIRECT wants)
// and the function that frees it.
func alignedBuffer(n int) ([]byte, func(), error) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return nil, nil, fmt.Errorf("buffer of %d bytes: %w", n, err)
	}
	return b, func() { _ = unix.Munmap(b) }, nil
}

// scanResult is what scan found.
type scanResult struct {
	id uint64 // the log id
	n  uint64 // PUT records, in slots 1..n
}

// scan reads the log of f from slot 0 and calls fn for each PUT record in
// order. It returns ErrNoLog when slot 0 holds no record at all, and
// ErrCorrupt when slot 0 is a damaged record or when a valid record of this
// log follows the first slot that is not (a hole in the log: an
// acknowledged record was lost).
func scan(f *os.File, g geometry, fn func(Record)) (scanResult, error) {
	var res scanResult
	chunk := g.block * scanBlocks
	buf, free, err := alignedBuffer(chunk)
	if err != nil {
		return res, err
	}
	defer free()
	perBlock := uint64(g.block / RecordSize)
	var (
		bufStart, bufEnd uint64 // slots in buf
		end              uint64 // first slot past the log, once found (0: not yet)
		checkTo          uint64 // slots up to which a scan past the end looks for holes
	)
	for slot := uint64(0); slot < g.slots; slot++ {
		if slot >= bufEnd {
			nblocks := min(uint64(scanBlocks), (g.slots-slot)/perBlock)
			n, err := f.ReadAt(buf[:nblocks*uint64(g.block)], int64(slot*RecordSize))
			if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
				return res, fmt.Errorf("read log at slot %d: %w", slot, err)
			}
			bufStart, bufEnd = slot, slot+uint64(n)/RecordSize
			if bufEnd == bufStart {
				return res, fmt.Errorf("read log at slot %d: nothing read", slot)
			}
		}
		off := (slot - bufStart) * RecordSize
		r, derr := DecodeRecord(buf[off : off+RecordSize])
		if slot == 0 {
			switch {
			case errors.Is(derr, ErrEmpty) || errors.Is(derr, ErrNotRecord):
				return res, ErrNoLog
			case derr != nil:
				return res, fmt.Errorf("%w: header: %v", ErrCorrupt, derr)
			case r.Kind != kindHeader:
				return res, fmt.Errorf("%w: slot 0 holds a record of kind %d, not the header", ErrCorrupt, r.Kind)
			}
			res.id = r.LogID
			continue
		}
		ours := derr == nil && r.Kind == kindPut && r.LogID == res.id
		if end == 0 {
			if ours && r.Seq == slot {
				fn(r)
				res.n = slot
				continue
			}
			// The log ends here. A torn last write (never acknowledged)
			// looks the same as a lost record at the tail; a record of this
			// log in the next block or two does not.
			end = slot
			checkTo = min(g.slots, (slot/perBlock+2)*perBlock)
			continue
		}
		if slot >= checkTo {
			break
		}
		if ours && r.Seq > end {
			return res, fmt.Errorf("%w: slot %d does not hold record %d, but slot %d holds record %d of the same log", ErrCorrupt, end, end, slot, r.Seq)
		}
	}
	return res, nil
}

// openLog opens the log on path, formatting the device first if it holds
// no log (slot 0 is zero or not a record), and calls fn for each record.
func openLog(path string, fn func(Record)) (l *diskLog, formatted bool, err error) {
	f, g, err := openFile(path, true)
	if err != nil {
		return nil, false, err
	}
	defer func() {
		if err != nil {
			f.Close()
		}
	}()
	tail, free, err := alignedBuffer(g.block)
	if err != nil {
		return nil, false, err
	}
	defer func() {
		if err != nil {
			free()
		}
	}()
	l = &diskLog{path: path, f: f, direct: g.direct, block: g.block, slots: g.slots, tail: tail, tailBlock: -1}
	res, err := scan(f, g, fn)
	switch {
	case errors.Is(err, ErrNoLog):
		if err := l.format(); err != nil {
			return nil, false, err
		}
		return l, true, nil
	case err != nil:
		return nil, false, fmt.Errorf("%s: %w", path, err)
	}
	l.id, l.n = res.id, res.n
	// Load the block the next record goes to, and clear what follows the
	// log in it (a torn write, or an earlier log's records).
	next := l.n + 1
	l.tailBlock = int64(next * RecordSize / uint64(l.block))
	if next < l.slots {
		if _, err := f.ReadAt(l.tail, l.tailBlock*int64(l.block)); err != nil {
			return nil, false, fmt.Errorf("%s: read the tail block: %w", path, err)
		}
		clear(l.tail[next*RecordSize%uint64(l.block):])
	}
	return l, false, nil
}

// format writes a new, empty log: a header with a fresh random id.
func (l *diskLog) format() error {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	l.id, l.n = binary.LittleEndian.Uint64(b[:]), 0
	clear(l.tail)
	l.tailBlock = 0
	if err := EncodeRecord(l.tail[:RecordSize], Record{Kind: kindHeader, LogID: l.id}); err != nil {
		return err
	}
	return l.writeTail()
}

// writeTail writes the tail block and waits for the device to have it.
func (l *diskLog) writeTail() error {
	if _, err := l.f.WriteAt(l.tail, l.tailBlock*int64(l.block)); err != nil {
		return fmt.Errorf("write %s: %w", l.path, err)
	}
	if err := unix.Fdatasync(int(l.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", l.path, err)
	}
	return nil
}

// append writes a PUT record and returns its sequence number once the
// device has it (write, then fdatasync).
func (l *diskLog) append(key, value string) (uint64, error) {
	seq := l.n + 1
	if seq >= l.slots {
		return 0, fmt.Errorf("%w: %d records", ErrFull, l.n)
	}
	if blk := int64(seq * RecordSize / uint64(l.block)); blk != l.tailBlock {
		clear(l.tail)
		l.tailBlock = blk
	}
	off := seq * RecordSize % uint64(l.block)
	rec := l.tail[off : off+RecordSize]
	if err := EncodeRecord(rec, Record{Kind: kindPut, LogID: l.id, Seq: seq, Key: key, Value: value}); err != nil {
		return 0, err
	}
	if err := l.writeTail(); err != nil {
		clear(rec) // the next append writes this slot again
		return 0, err
	}
	l.n = seq
	return seq, nil
}

// sync flushes the whole system's dirty data and the log's device.
func (l *diskLog) sync() error {
	unix.Sync()
	if err := unix.Fdatasync(int(l.f.Fd())); err != nil {
		return fmt.Errorf("fdatasync %s: %w", l.path, err)
	}
	return nil
}

func (l *diskLog) close() error {
	_ = unix.Munmap(l.tail)
	l.tail = nil
	return l.f.Close()
}
