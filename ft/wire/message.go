package wire

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// Type is a message type, the frame header's type byte. doc.go lists them.
type Type uint8

// The message types of protocol version 1.
const (
	TypeHello           Type = 0x01
	TypeHeartbeat       Type = 0x02
	TypeError           Type = 0x03
	TypeBye             Type = 0x04
	TypeStatus          Type = 0x05
	TypeReady           Type = 0x06
	TypeCheckpointBegin Type = 0x10
	TypePageBatch       Type = 0x11
	TypeStateBlob       Type = 0x12
	TypeCheckpointEnd   Type = 0x13
	TypeAck             Type = 0x14
	TypeCompressedBatch Type = 0x15
	TypeDiskWrites      Type = 0x16
	TypeDiskSeed        Type = 0x17
	TypeActivate        Type = 0x20
	TypePolicy          Type = 0x30
	TypePolicyAck       Type = 0x31
	TypeManifest        Type = 0x32
	TypePageRequest     Type = 0x33
	TypeServed          Type = 0x34
)

// types maps each known type to its name and a constructor of an empty message.
var types = map[Type]struct {
	name string
	new  func() Message
}{
	TypeHello:           {"Hello", func() Message { return new(Hello) }},
	TypeHeartbeat:       {"Heartbeat", func() Message { return new(Heartbeat) }},
	TypeError:           {"Error", func() Message { return new(Error) }},
	TypeBye:             {"Bye", func() Message { return new(Bye) }},
	TypeStatus:          {"Status", func() Message { return new(Status) }},
	TypeReady:           {"Ready", func() Message { return new(Ready) }},
	TypeCheckpointBegin: {"CheckpointBegin", func() Message { return new(CheckpointBegin) }},
	TypePageBatch:       {"PageBatch", func() Message { return new(PageBatch) }},
	TypeStateBlob:       {"StateBlob", func() Message { return new(StateBlob) }},
	TypeCheckpointEnd:   {"CheckpointEnd", func() Message { return new(CheckpointEnd) }},
	TypeAck:             {"Ack", func() Message { return new(Ack) }},
	TypeCompressedBatch: {"CompressedBatch", func() Message { return new(CompressedBatch) }},
	TypeDiskWrites:      {"DiskWrites", func() Message { return new(DiskWrites) }},
	TypeDiskSeed:        {"DiskSeed", func() Message { return new(DiskSeed) }},
	TypeActivate:        {"Activate", func() Message { return new(Activate) }},
	TypePolicy:          {"Policy", func() Message { return new(Policy) }},
	TypePolicyAck:       {"PolicyAck", func() Message { return new(PolicyAck) }},
	TypeManifest:        {"Manifest", func() Message { return new(Manifest) }},
	TypePageRequest:     {"PageRequest", func() Message { return new(PageRequest) }},
	TypeServed:          {"Served", func() Message { return new(Served) }},
}

// Known reports whether t is a message type of this protocol version.
func (t Type) Known() bool {
	_, ok := types[t]
	return ok
}

// String returns the message name, or the number of an unknown type.
func (t Type) String() string {
	if d, ok := types[t]; ok {
		return d.name
	}
	return fmt.Sprintf("type %#02x", uint8(t))
}

// Message is one protocol message. The message types in this package
// implement it with pointer receivers (pass &wire.Ack{Epoch: 3}).
//
// AppendBinary appends the message body (the frame payload) to b and fails if
// a field breaks the layout rules; UnmarshalBinary replaces the message with
// the one in data, which it does not retain, and fails with ErrMalformed
// unless data is exactly one valid message body.
type Message interface {
	Type() Type
	AppendBinary(b []byte) ([]byte, error)
	MarshalBinary() ([]byte, error)
	UnmarshalBinary(data []byte) error
}

// New returns an empty message of type t, or an ErrUnknownType.
func New(t Type) (Message, error) {
	d, ok := types[t]
	if !ok {
		return nil, fmt.Errorf("%w: %v", ErrUnknownType, t)
	}
	return d.new(), nil
}

// Decode decodes payload as a message of type t.
func Decode(t Type, payload []byte) (Message, error) {
	m, err := New(t)
	if err != nil {
		return nil, err
	}
	if err := m.UnmarshalBinary(payload); err != nil {
		return nil, err
	}
	return m, nil
}

// Limits on message fields.
const (
	// PageSize is the size of a guest page record's data.
	PageSize = 4096
	// MaxPFN is the largest guest page frame number (a 52-bit physical address space).
	MaxPFN = 1<<40 - 1
	// MaxMemSize is the largest guest memory size a Hello may announce.
	MaxMemSize = (MaxPFN + 1) * PageSize
	// MaxBatchPages is the most page records in one PageBatch (32 MiB of data).
	MaxBatchPages = 8192
	// MaxStateLen is the largest VM state blob of one checkpoint.
	MaxStateLen = 1 << 30
	// MaxNameLen is the longest node name.
	MaxNameLen = 64
	// MaxReasonLen is the longest reason string in Error and Bye.
	MaxReasonLen = 1024
)

// CheckName reports whether s is a valid node name: 1..MaxNameLen bytes of
// ASCII letters, digits, '.', '_' and '-', starting with a letter or digit.
// Names double as file names (NAME.crt) and certificate common names.
func CheckName(s string) error {
	if s == "" || len(s) > MaxNameLen {
		return fmt.Errorf("node name %q: want 1..%d characters", s, MaxNameLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '.' && c != '_' && c != '-') {
			return fmt.Errorf("node name %q: want letters, digits, '.', '_' and '-', starting with a letter or digit", s)
		}
	}
	return nil
}

// decoder reads fields from a message body, remembering the first error.
type decoder struct {
	t   Type
	b   []byte
	off int
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b)-d.off {
		d.err = malformed(d.t, "truncated: %d bytes needed at offset %d of %d", n, d.off, len(d.b))
		return nil
	}
	b := d.b[d.off : d.off+n]
	d.off += n
	return b
}

func (d *decoder) u8() uint8 {
	if b := d.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u16() uint16 {
	if b := d.take(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

// rest takes everything left.
func (d *decoder) rest() []byte { return d.take(len(d.b) - d.off) }

// finish fails if bytes remain or an error occurred.
func (d *decoder) finish() error {
	if d.err == nil && d.off != len(d.b) {
		d.err = malformed(d.t, "%d trailing bytes after %d", len(d.b)-d.off, d.off)
	}
	return d.err
}

// checkText validates a reason string.
func checkText(t Type, field, s string, maxLen int) error {
	if len(s) > maxLen {
		return malformed(t, "%s is %d bytes (limit %d)", field, len(s), maxLen)
	}
	if !utf8.ValidString(s) {
		return malformed(t, "%s is not valid UTF-8", field)
	}
	return nil
}

// checkEpoch validates an epoch number (epochs start at 1).
func checkEpoch(t Type, e uint64) error {
	if e == 0 {
		return malformed(t, "epoch 0 (epochs start at 1)")
	}
	return nil
}
