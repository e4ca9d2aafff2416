package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
)

// A snapshot is a machine's state followed by all of its memory, as one
// stream (a file, for `understudy run --save`). All integers are
// little-endian; CRCs are CRC-32C (Castagnoli).
//
//	offset size  field
//	0      8     magic "USSNAPSH"
//	8      4     snapshot version (1)
//	12     4     flags (0)
//	16     8     state length S (at most MaxStateSize)
//	24     8     memory length M (the state's memory size)
//	32     4     CRC of the state bytes
//	36     4     CRC of bytes 0..35
//	40     S     the encoded MachineState (state_encoding.go)
//	40+S   M     guest memory, in backing order (the state's regions one after another)
//	40+S+M 4     CRC of the memory bytes
//	44+S+M 4     end marker "USND"
//
// Reading checks the header's CRC before trusting its lengths, the state's
// CRC before decoding it, and the memory's CRC once all of it has been read.

// ErrBadSnapshot is wrapped by every error about a malformed, truncated or
// foreign snapshot.
var ErrBadSnapshot = errors.New("bad snapshot")

const (
	snapshotVersion    = 1
	snapshotHeaderSize = 40
	snapshotTrailer    = 8
)

// SnapshotStateSize is the size of the encoded machine state in a snapshot
// of size bytes of a machine with memSize bytes of memory: what is not
// memory or framing.
func SnapshotStateSize(size int64, memSize uint64) int64 {
	return size - int64(memSize) - snapshotHeaderSize - snapshotTrailer
}

var (
	snapshotMagic = [8]byte{'U', 'S', 'S', 'N', 'A', 'P', 'S', 'H'}
	snapshotEnd   = [4]byte{'U', 'S', 'N', 'D'}
	castagnoli    = crc32.MakeTable(crc32.Castagnoli)
)

// SaveSnapshot writes a snapshot of the paused machine (FlushDisks,
// CaptureState, then all of guest memory) to w. Nothing may write guest memory meanwhile; the
// caller must not run large-page sampling, which revokes access to it.
func (m *Machine) SaveSnapshot(w io.Writer) error {
	if err := m.FlushDisks(); err != nil {
		return err
	}
	st, err := m.CaptureState()
	if err != nil {
		return err
	}
	return WriteSnapshot(w, st, m.Memory())
}

// WriteSnapshot writes st and all of mem, which must be the memory st
// describes, to w as a snapshot.
func WriteSnapshot(w io.Writer, st *MachineState, mem *mmu.Memory) error {
	if mem.Size() != st.Config.MemSize {
		return fmt.Errorf("write snapshot: %s of memory for a state with %s", option.FormatSize(mem.Size()), option.FormatSize(st.Config.MemSize))
	}
	state, err := st.MarshalBinary()
	if err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	hdr := make([]byte, 0, snapshotHeaderSize)
	hdr = append(hdr, snapshotMagic[:]...)
	hdr = le.AppendUint32(hdr, snapshotVersion)
	hdr = le.AppendUint32(hdr, 0)
	hdr = le.AppendUint64(hdr, uint64(len(state)))
	hdr = le.AppendUint64(hdr, mem.Size())
	hdr = le.AppendUint32(hdr, crc32.Checksum(state, castagnoli))
	hdr = le.AppendUint32(hdr, crc32.Checksum(hdr, castagnoli))
	if _, err := w.Write(hdr); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if _, err := w.Write(state); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	var crc uint32
	const chunk = 4 << 20
	for b := mem.Backing(); len(b) > 0; {
		n := min(len(b), chunk)
		crc = crc32.Update(crc, castagnoli, b[:n])
		if _, err := w.Write(b[:n]); err != nil {
			return fmt.Errorf("write snapshot: %w", err)
		}
		b = b[n:]
	}
	trailer := le.AppendUint32(nil, crc)
	trailer = append(trailer, snapshotEnd[:]...)
	if _, err := w.Write(trailer); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	return nil
}

// ReadSnapshot reads a snapshot's header and machine state from r, which
// must end where the snapshot ends. It returns the state and a reader of the
// memory image that follows, which returns io.EOF only after it has checked
// the image's length, its CRC and the end of r (Restore reads it to that end).
func ReadSnapshot(r io.Reader) (*MachineState, io.Reader, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadSnapshot, fmt.Sprintf(format, args...))
	}
	hdr := make([]byte, snapshotHeaderSize)
	switch n, err := io.ReadFull(r, hdr); {
	case n == 0 && errors.Is(err, io.EOF):
		return nil, nil, bad("empty, not an Understudy snapshot")
	case n < len(snapshotMagic) && errors.Is(err, io.ErrUnexpectedEOF):
		return nil, nil, bad("%d bytes, not an Understudy snapshot", n)
	case err != nil && !errors.Is(err, io.ErrUnexpectedEOF):
		return nil, nil, fmt.Errorf("read snapshot: %w", err)
	case !bytes.Equal(hdr[:len(snapshotMagic)], snapshotMagic[:]):
		return nil, nil, bad("not an Understudy snapshot (starts with %q)", hdr[:len(snapshotMagic)])
	case err != nil:
		return nil, nil, bad("truncated: header is %d of %d bytes", n, snapshotHeaderSize)
	}
	if got, want := le.Uint32(hdr[36:]), crc32.Checksum(hdr[:36], castagnoli); got != want {
		return nil, nil, bad("corrupt header (CRC %#08x, want %#08x)", got, want)
	}
	if v := le.Uint32(hdr[8:]); v != snapshotVersion {
		return nil, nil, bad("version %d, this build reads version %d", v, snapshotVersion)
	}
	if f := le.Uint32(hdr[12:]); f != 0 {
		return nil, nil, bad("flags %#x, none are defined", f)
	}
	stateLen, memLen, stateCRC := le.Uint64(hdr[16:]), le.Uint64(hdr[24:]), le.Uint32(hdr[32:])
	if stateLen > MaxStateSize {
		return nil, nil, bad("machine state of %d bytes, at most %d", stateLen, MaxStateSize)
	}
	if memLen > MaxStateMemSize {
		return nil, nil, bad("memory of %d bytes, at most %d", memLen, uint64(MaxStateMemSize))
	}
	state := make([]byte, stateLen)
	if n, err := io.ReadFull(r, state); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, nil, bad("truncated: machine state is %d of %d bytes", n, stateLen)
		}
		return nil, nil, fmt.Errorf("read snapshot: %w", err)
	}
	if got := crc32.Checksum(state, castagnoli); got != stateCRC {
		return nil, nil, bad("corrupt machine state (CRC %#08x, want %#08x)", got, stateCRC)
	}
	st := new(MachineState)
	if err := st.UnmarshalBinary(state); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", ErrBadSnapshot, err)
	}
	if st.Config.MemSize != memLen {
		return nil, nil, bad("header says %d bytes of memory, the machine state %d", memLen, st.Config.MemSize)
	}
	return st, &snapshotMemory{r: r, left: memLen, size: memLen}, nil
}

// snapshotMemory reads a snapshot's memory image and, at its end, checks
// the trailer.
type snapshotMemory struct {
	r    io.Reader
	size uint64
	left uint64
	crc  uint32
	err  error // sticky: io.EOF after a good trailer
}

func (s *snapshotMemory) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if s.left == 0 {
		s.err = s.checkTrailer()
		return 0, s.err
	}
	if uint64(len(p)) > s.left {
		p = p[:s.left]
	}
	n, err := s.r.Read(p)
	s.crc = crc32.Update(s.crc, castagnoli, p[:n])
	s.left -= uint64(n)
	switch {
	case errors.Is(err, io.EOF) && s.left > 0:
		s.err = fmt.Errorf("%w: truncated: memory image is %d of %d bytes", ErrBadSnapshot, s.size-s.left, s.size)
		return n, s.err
	case errors.Is(err, io.EOF):
		err = nil // the trailer is still to come
	case err != nil:
		s.err = fmt.Errorf("read snapshot: %w", err)
		return n, s.err
	}
	return n, nil
}

func (s *snapshotMemory) checkTrailer() error {
	t := make([]byte, snapshotTrailer)
	if n, err := io.ReadFull(s.r, t); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: truncated: trailer is %d of %d bytes", ErrBadSnapshot, n, snapshotTrailer)
		}
		return fmt.Errorf("read snapshot: %w", err)
	}
	if got := le.Uint32(t); got != s.crc {
		return fmt.Errorf("%w: corrupt memory image (CRC %#08x, want %#08x)", ErrBadSnapshot, s.crc, got)
	}
	if !bytes.Equal(t[4:], snapshotEnd[:]) {
		return fmt.Errorf("%w: no end marker after the memory image", ErrBadSnapshot)
	}
	var extra [1]byte
	if n, _ := io.ReadFull(s.r, extra[:]); n != 0 {
		return fmt.Errorf("%w: data after the end marker", ErrBadSnapshot)
	}
	return io.EOF
}

// RestoreSnapshot reads a snapshot from r and restores the machine in it
// (ReadSnapshot, then Restore).
func RestoreSnapshot(cfg RestoreConfig, r io.Reader) (*Machine, error) {
	st, mem, err := ReadSnapshot(r)
	if err != nil {
		return nil, err
	}
	return Restore(cfg, st, mem)
}

// FlushDisks makes a paused machine's virtio disks durable (fsync of each
// writable disk file; Transport.Flush), as a snapshot to a file does before
// the disks' fingerprints are taken. It is a no-op for a machine without
// virtio devices.
func (m *Machine) FlushDisks() error {
	m.pauseMu.Lock()
	defer m.pauseMu.Unlock()
	if !m.paused && !m.halted.Load() {
		return fmt.Errorf("flush disks: %w", ErrNotPaused)
	}
	if m.linux == nil {
		return nil
	}
	for _, s := range m.linux.virtio {
		if s.t == nil {
			continue
		}
		if !s.t.Quiesced() {
			if err := s.t.Quiesce(); err != nil {
				return fmt.Errorf("flush disks: %w", err)
			}
		}
		if err := s.t.Flush(); err != nil {
			return fmt.Errorf("flush disks: %s: %w", s.name, err)
		}
	}
	return nil
}
