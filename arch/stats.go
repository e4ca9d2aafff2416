package arch

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"

	"golang.org/x/sys/unix"
)

// Stats reads a KVM binary statistics fd (KVM_GET_STATS_FD): a header, an id
// string, a block of descriptors and a block of u64 values.
type Stats struct {
	fd         int
	ID         string
	Descs      []StatDesc
	dataOffset int64
	index      map[string]int
}

// StatDesc describes one statistic.
type StatDesc struct {
	Name       string
	Flags      uint32
	Exponent   int16
	Size       uint16 // number of u64 values
	Offset     uint32 // from the start of the data block
	BucketSize uint32
}

const (
	statsHeaderSize = 24
	statsDescFixed  = 16
	maxStatsDescs   = 4096
	maxStatsName    = 4096
	maxStatsValues  = 4096
)

func newStats(fd int) (*Stats, error) {
	hdr := make([]byte, statsHeaderSize)
	if _, err := unix.Pread(fd, hdr, 0); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("read KVM stats header: %w", err)
	}
	h, err := parseStatsHeader(hdr)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	id := make([]byte, h.nameSize)
	if _, err := unix.Pread(fd, id, int64(h.idOffset)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("read KVM stats id: %w", err)
	}
	descs := make([]byte, int(h.numDesc)*(statsDescFixed+int(h.nameSize)))
	if _, err := unix.Pread(fd, descs, int64(h.descOffset)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("read KVM stats descriptors: %w", err)
	}
	d, err := ParseStatsDescs(descs, h.numDesc, h.nameSize)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	s := &Stats{fd: fd, ID: cString(id), Descs: d, dataOffset: int64(h.dataOffset), index: map[string]int{}}
	for i, d := range d {
		s.index[d.Name] = i
	}
	return s, nil
}

type statsHeader struct {
	flags, nameSize, numDesc, idOffset, descOffset, dataOffset uint32
}

func parseStatsHeader(b []byte) (statsHeader, error) {
	if len(b) < statsHeaderSize {
		return statsHeader{}, fmt.Errorf("KVM stats header: %d bytes, want %d", len(b), statsHeaderSize)
	}
	le := binary.LittleEndian
	h := statsHeader{le.Uint32(b), le.Uint32(b[4:]), le.Uint32(b[8:]), le.Uint32(b[12:]), le.Uint32(b[16:]), le.Uint32(b[20:])}
	if h.nameSize == 0 || h.nameSize > maxStatsName {
		return h, fmt.Errorf("KVM stats header: name size %d out of range", h.nameSize)
	}
	if h.numDesc > maxStatsDescs {
		return h, fmt.Errorf("KVM stats header: %d descriptors, at most %d", h.numDesc, maxStatsDescs)
	}
	return h, nil
}

// ParseStatsDescs decodes n descriptors, each 16 bytes plus a nameSize-byte
// NUL-padded name. It rejects truncated input and oversized values.
func ParseStatsDescs(b []byte, n, nameSize uint32) ([]StatDesc, error) {
	if nameSize == 0 || nameSize > maxStatsName || n > maxStatsDescs {
		return nil, fmt.Errorf("KVM stats: %d descriptors with %d-byte names out of range", n, nameSize)
	}
	step := statsDescFixed + int(nameSize)
	if len(b) < int(n)*step {
		return nil, fmt.Errorf("KVM stats: descriptor block of %d bytes, want %d", len(b), int(n)*step)
	}
	le := binary.LittleEndian
	out := make([]StatDesc, 0, n)
	for i := 0; i < int(n); i++ {
		p := b[i*step : (i+1)*step]
		d := StatDesc{
			Flags: le.Uint32(p), Exponent: int16(le.Uint16(p[4:])), Size: le.Uint16(p[6:]),
			Offset: le.Uint32(p[8:]), BucketSize: le.Uint32(p[12:]), Name: cString(p[16:]),
		}
		if d.Size == 0 || d.Size > maxStatsValues {
			return nil, fmt.Errorf("KVM stats: %q has %d values", d.Name, d.Size)
		}
		if d.Offset%8 != 0 {
			return nil, fmt.Errorf("KVM stats: %q at unaligned offset %d", d.Name, d.Offset)
		}
		out = append(out, d)
	}
	return out, nil
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// Value returns the first u64 of the named statistic.
func (s *Stats) Value(name string) (uint64, error) {
	i, ok := s.index[name]
	if !ok {
		return 0, fmt.Errorf("KVM stats %s: no statistic %q", s.ID, name)
	}
	var b [8]byte
	n, err := unix.Pread(s.fd, b[:], s.dataOffset+int64(s.Descs[i].Offset))
	if err == nil && n != len(b) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return 0, fmt.Errorf("read KVM stat %q: %w", name, err)
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Has reports whether the named statistic exists.
func (s *Stats) Has(name string) bool { _, ok := s.index[name]; return ok }

// Close closes the stats fd.
func (s *Stats) Close() error { return unix.Close(s.fd) }
