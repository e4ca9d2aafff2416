package wire

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// Role is a node's part in replication.
type Role uint8

// The roles. Zero is no role and never valid on the wire.
const (
	RolePrimary      Role = 1
	RoleIntermediary Role = 2
	RoleBackup       Role = 3
)

var roleNames = map[Role]string{RolePrimary: "primary", RoleIntermediary: "intermediary", RoleBackup: "backup"}

// Valid reports whether r is one of the defined roles.
func (r Role) Valid() bool { return roleNames[r] != "" }

// String returns the role name ParseRole accepts.
func (r Role) String() string {
	if n := roleNames[r]; n != "" {
		return n
	}
	return fmt.Sprintf("role(%d)", uint8(r))
}

// ParseRole parses "primary", "intermediary" or "backup".
func ParseRole(s string) (Role, error) {
	for r, n := range roleNames {
		if n == s {
			return r, nil
		}
	}
	return 0, fmt.Errorf("role %q: want primary, intermediary or backup", s)
}

// Code says why a peer sent an Error.
type Code uint16

// The error codes.
const (
	CodeProtocol   Code = 1 // an unexpected or malformed message
	CodeVersion    Code = 2 // a protocol version this node does not speak
	CodeRefused    Code = 3 // the peer's identity or role is not accepted here
	CodeCorrupt    Code = 4 // a frame failed its checksum
	CodeIncomplete Code = 5 // a checkpoint failed verification (counts or digest)
	CodeFenced     Code = 6 // the receiver has been fenced and will not be acknowledged again
	CodeInternal   Code = 7 // the sender failed on its own side
	CodeBadRequest Code = 8 // a PageRequest named a page outside guest memory; nothing was served
)

var codeNames = map[Code]string{
	CodeProtocol: "protocol", CodeVersion: "version", CodeRefused: "refused", CodeCorrupt: "corrupt",
	CodeIncomplete: "incomplete", CodeFenced: "fenced", CodeInternal: "internal",
	CodeBadRequest: "bad-request",
}

// Valid reports whether c is one of the defined codes.
func (c Code) Valid() bool { return codeNames[c] != "" }

// String returns the code name.
func (c Code) String() string {
	if n := codeNames[c]; n != "" {
		return n
	}
	return fmt.Sprintf("code(%d)", uint16(c))
}

// Hello opens a session; each side sends one first. Version is the
// protocol version the sender speaks.
type Hello struct {
	Version uint8
	Role    Role
	Name    string   // node name; must equal the certificate's common name
	VMID    [16]byte // the protected VM's identity (zero when not yet known)
	MemSize uint64   // the VM's guest memory in bytes (0 when not yet known)
}

// Type returns TypeHello.
func (Hello) Type() Type { return TypeHello }

func (m Hello) check() error {
	switch {
	case m.Version == 0:
		return malformed(TypeHello, "version 0")
	case !m.Role.Valid():
		return malformed(TypeHello, "%v is not a role", m.Role)
	case m.MemSize%PageSize != 0 || m.MemSize > MaxMemSize:
		return malformed(TypeHello, "memory size %d is not a multiple of %d up to %d", m.MemSize, PageSize, uint64(MaxMemSize))
	}
	if err := CheckName(m.Name); err != nil {
		return malformed(TypeHello, "%v", err)
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m Hello) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = append(b, m.Version, byte(m.Role))
	b = append(b, m.VMID[:]...)
	b = binary.LittleEndian.AppendUint64(b, m.MemSize)
	b = append(b, byte(len(m.Name)))
	return append(b, m.Name...), nil
}

// MarshalBinary returns the message body.
func (m Hello) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Hello) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeHello, b: data}
	var v Hello
	v.Version = d.u8()
	v.Role = Role(d.u8())
	copy(v.VMID[:], d.take(16))
	v.MemSize = d.u64()
	v.Name = string(d.take(int(d.u8())))
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Heartbeat shows a peer is alive. The receiver may echo it back to
// measure the round trip.
type Heartbeat struct {
	Seq  uint64
	Sent int64 // send time, Unix nanoseconds
}

// Type returns TypeHeartbeat.
func (Heartbeat) Type() Type { return TypeHeartbeat }

// AppendBinary appends the message body to b.
func (m Heartbeat) AppendBinary(b []byte) ([]byte, error) {
	b = binary.LittleEndian.AppendUint64(b, m.Seq)
	return binary.LittleEndian.AppendUint64(b, uint64(m.Sent)), nil
}

// MarshalBinary returns the message body.
func (m Heartbeat) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Heartbeat) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeHeartbeat, b: data}
	v := Heartbeat{Seq: d.u64(), Sent: int64(d.u64())}
	if err := d.finish(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Error tells the peer why the sender refuses something; the sender
// usually closes the connection after it. *Error is also a Go error.
type Error struct {
	Code   Code
	Reason string // at most MaxReasonLen bytes of UTF-8
}

// Type returns TypeError.
func (Error) Type() Type { return TypeError }

// Error formats the code and reason.
func (m *Error) Error() string { return fmt.Sprintf("peer error (%v): %s", m.Code, m.Reason) }

func (m Error) check() error {
	if !m.Code.Valid() {
		return malformed(TypeError, "%v is not an error code", m.Code)
	}
	return checkText(TypeError, "reason", m.Reason, MaxReasonLen)
}

// AppendBinary appends the message body to b.
func (m Error) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(m.Code))
	b = binary.LittleEndian.AppendUint16(b, uint16(len(m.Reason)))
	return append(b, m.Reason...), nil
}

// MarshalBinary returns the message body.
func (m Error) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Error) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeError, b: data}
	var v Error
	v.Code = Code(d.u16())
	v.Reason = string(d.take(int(d.u16())))
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Bye ends a session cleanly.
type Bye struct {
	Reason string // at most MaxReasonLen bytes of UTF-8
}

// Type returns TypeBye.
func (Bye) Type() Type { return TypeBye }

// AppendBinary appends the message body to b.
func (m Bye) AppendBinary(b []byte) ([]byte, error) {
	if err := checkText(TypeBye, "reason", m.Reason, MaxReasonLen); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint16(b, uint16(len(m.Reason)))
	return append(b, m.Reason...), nil
}

// MarshalBinary returns the message body.
func (m Bye) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Bye) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeBye, b: data}
	v := Bye{Reason: string(d.take(int(d.u16())))}
	if err := d.finish(); err != nil {
		return err
	}
	if err := checkText(TypeBye, "reason", v.Reason, MaxReasonLen); err != nil {
		return err
	}
	*m = v
	return nil
}

// Status reports the latest complete epoch the sender holds, e.g. a
// backup's committed epoch when it (re)connects.
type Status struct {
	Role      Role
	Committed uint64 // 0: none yet
}

// Type returns TypeStatus.
func (Status) Type() Type { return TypeStatus }

// AppendBinary appends the message body to b.
func (m Status) AppendBinary(b []byte) ([]byte, error) {
	if !m.Role.Valid() {
		return b, malformed(TypeStatus, "%v is not a role", m.Role)
	}
	return binary.LittleEndian.AppendUint64(append(b, byte(m.Role)), m.Committed), nil
}

// MarshalBinary returns the message body.
func (m Status) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Status) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeStatus, b: data}
	v := Status{Role: Role(d.u8()), Committed: d.u64()}
	if err := d.finish(); err != nil {
		return err
	}
	if !v.Role.Valid() {
		return malformed(TypeStatus, "%v is not a role", v.Role)
	}
	*m = v
	return nil
}

// Ready ends the Hello exchange: the side that sends it has checked the
// peer's Hello and the link is open. It has no body.
type Ready struct{}

// Type returns TypeReady.
func (Ready) Type() Type { return TypeReady }

// AppendBinary appends the (empty) message body to b.
func (Ready) AppendBinary(b []byte) ([]byte, error) { return b, nil }

// MarshalBinary returns the (empty) message body.
func (Ready) MarshalBinary() ([]byte, error) { return []byte{}, nil }

// UnmarshalBinary decodes a message body, which must be empty.
func (*Ready) UnmarshalBinary(data []byte) error {
	if len(data) != 0 {
		return malformed(TypeReady, "%d bytes, want none", len(data))
	}
	return nil
}

// FlagFullImage marks a checkpoint that carries every page of guest memory.
const FlagFullImage uint32 = 1 << 0

// FlagStaged marks a delta that commits together with the pages staged
// ahead of it (bare PageBatch messages sent to a backup since Base): the
// intermediary's hold-back sync. It is never set on a full image.
const FlagStaged uint32 = 1 << 1

// CheckpointBegin opens checkpoint Epoch: Pages page records and StateLen
// bytes of state follow, then a CheckpointEnd. A full image (FlagFullImage)
// has Base 0; a delta holds the pages changed since checkpoint Base.
type CheckpointBegin struct {
	Epoch    uint64
	Base     uint64
	Pages    uint64
	StateLen uint64
	Flags    uint32
}

// Type returns TypeCheckpointBegin.
func (CheckpointBegin) Type() Type { return TypeCheckpointBegin }

// Full reports whether the checkpoint is a full image.
func (m CheckpointBegin) Full() bool { return m.Flags&FlagFullImage != 0 }

func (m CheckpointBegin) check() error {
	const t = TypeCheckpointBegin
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	switch {
	case m.Flags&^(FlagFullImage|FlagStaged) != 0:
		return malformed(t, "undefined flags %#x", m.Flags&^(FlagFullImage|FlagStaged))
	case m.Full() && m.Flags&FlagStaged != 0:
		return malformed(t, "a full image cannot commit staged pages")
	case m.Full() && m.Base != 0:
		return malformed(t, "full image with base epoch %d (want 0)", m.Base)
	case !m.Full() && (m.Base == 0 || m.Base >= m.Epoch):
		return malformed(t, "delta epoch %d on base epoch %d (want 1 <= base < epoch)", m.Epoch, m.Base)
	case m.Pages > MaxPFN+1:
		return malformed(t, "%d pages (limit %d)", m.Pages, uint64(MaxPFN+1))
	case m.StateLen > MaxStateLen:
		return malformed(t, "state length %d (limit %d)", m.StateLen, MaxStateLen)
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m CheckpointBegin) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint64(b, m.Base)
	b = binary.LittleEndian.AppendUint64(b, m.Pages)
	b = binary.LittleEndian.AppendUint64(b, m.StateLen)
	return binary.LittleEndian.AppendUint32(b, m.Flags), nil
}

// MarshalBinary returns the message body.
func (m CheckpointBegin) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *CheckpointBegin) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeCheckpointBegin, b: data}
	v := CheckpointBegin{Epoch: d.u64(), Base: d.u64(), Pages: d.u64(), StateLen: d.u64(), Flags: d.u32()}
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Page is one guest page record.
type Page struct {
	PFN  uint64 // guest page frame number (guest-physical address / PageSize)
	Sum  uint32 // PageSum(PFN, Data), computed where the page was captured
	Data []byte // exactly PageSize bytes
}

// PageSum returns the end-to-end check of a page record: CRC-32C
// (Castagnoli) of its PFN (u64, little-endian) followed by its data. The
// primary computes it once, from the page it captured; every node that
// receives the page verifies it (VerifyPages) and passes the same sum on,
// so a page that our own bookkeeping misplaces or damages anywhere between
// the primary's and the backup's memory is caught. (TLS guards each hop
// against tampering; this guards the path.)
func PageSum(pfn uint64, data []byte) uint32 {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], pfn)
	return crc32.Update(crc32.Checksum(b[:], castagnoli), castagnoli, data)
}

// PageBatch carries page records of checkpoint Epoch, 1..MaxBatchPages of
// them, in strictly ascending PFN order, each with its end-to-end sum. The
// encoding does not check the sums (that is a pass over the data, done once
// by whoever receives the pages: VerifyPages).
type PageBatch struct {
	Epoch uint64
	Pages []Page
}

// Type returns TypePageBatch.
func (PageBatch) Type() Type { return TypePageBatch }

// pageBatchHead is the size of a PageBatch body before its records.
const pageBatchHead = 16

// pageRecordHead is the size of one record's PFN and sum.
const pageRecordHead = 12

// pageBatchHeadLen returns the length of the part of a PageBatch body
// before its page data (epoch, count, reserved, PFNs and sums), given the
// body: it reads the count. A body too short to hold a count, or one that
// ends before the records' heads, gives its own length.
func pageBatchHeadLen(body []byte) int {
	if len(body) < pageBatchHead {
		return len(body)
	}
	n := uint64(binary.LittleEndian.Uint32(body[8:]))
	return int(min(uint64(len(body)), pageBatchHead+pageRecordHead*n))
}

func (m PageBatch) check() error {
	const t = TypePageBatch
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	if n := len(m.Pages); n == 0 || n > MaxBatchPages {
		return malformed(t, "%d pages (want 1..%d)", n, MaxBatchPages)
	}
	for i, p := range m.Pages {
		if len(p.Data) != PageSize {
			return malformed(t, "page %d (PFN %#x) has %d bytes of data (want %d)", i, p.PFN, len(p.Data), PageSize)
		}
	}
	return checkPFNs(m.Pages)
}

// checkPFNs checks the pages' frame numbers are in range and strictly ascending.
func checkPFNs(pages []Page) error {
	for i, p := range pages {
		if p.PFN > MaxPFN {
			return malformed(TypePageBatch, "page %d: PFN %#x beyond %#x", i, p.PFN, uint64(MaxPFN))
		}
		if i > 0 && p.PFN <= pages[i-1].PFN {
			return malformed(TypePageBatch, "page %d: PFN %#x not above the previous %#x", i, p.PFN, pages[i-1].PFN)
		}
	}
	return nil
}

// VerifyPages checks every page's sum against its PFN and data and returns
// an ErrChecksum naming the first that does not match.
func VerifyPages(pages []Page) error {
	for i, p := range pages {
		if got := PageSum(p.PFN, p.Data); got != p.Sum {
			return fmt.Errorf("%w: page %d (PFN %#x): sum %#08x, computed %#08x", ErrChecksum, i, p.PFN, p.Sum, got)
		}
	}
	return nil
}

// appendHead appends the body's head: epoch, count, reserved, PFNs, sums.
func (m PageBatch) appendHead(b []byte) []byte {
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Pages)))
	b = binary.LittleEndian.AppendUint32(b, 0)
	for _, p := range m.Pages {
		b = binary.LittleEndian.AppendUint64(b, p.PFN)
	}
	for _, p := range m.Pages {
		b = binary.LittleEndian.AppendUint32(b, p.Sum)
	}
	return b
}

// AppendBinary appends the message body to b.
func (m PageBatch) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = growAppend(b, pageBatchHead+len(m.Pages)*(pageRecordHead+PageSize))
	b = m.appendHead(b)
	for _, p := range m.Pages {
		b = append(b, p.Data...)
	}
	return b, nil
}

// growAppend makes room for n more bytes in b without changing its length.
func growAppend(b []byte, n int) []byte {
	if cap(b)-len(b) >= n {
		return b
	}
	nb := make([]byte, len(b), len(b)+n)
	copy(nb, b)
	return nb
}

// MarshalBinary returns the message body.
func (m PageBatch) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body. The page data share one new
// allocation.
func (m *PageBatch) UnmarshalBinary(data []byte) error {
	v, err := decodeBatchHead(data, len(data))
	if err != nil {
		return err
	}
	buf := make([]byte, len(v.Pages)*PageSize)
	copy(buf, data[pageBatchHead+pageRecordHead*len(v.Pages):])
	v.place(buf)
	*m = v
	return nil
}

// decodeBatchHead decodes the head of a PageBatch body of size bytes (of
// which head holds at least the head) and checks it: the records' PFNs
// and sums, without their data.
func decodeBatchHead(head []byte, size int) (PageBatch, error) {
	const t = TypePageBatch
	d := decoder{t: t, b: head}
	epoch := d.u64()
	n := d.u32()
	if r := d.u32(); d.err == nil && r != 0 {
		return PageBatch{}, malformed(t, "reserved field %#x (want 0)", r)
	}
	if d.err != nil {
		return PageBatch{}, d.err
	}
	if n == 0 || n > MaxBatchPages {
		return PageBatch{}, malformed(t, "%d pages (want 1..%d)", n, MaxBatchPages)
	}
	if err := checkEpoch(t, epoch); err != nil {
		return PageBatch{}, err
	}
	if want := pageBatchHead + int(n)*(pageRecordHead+PageSize); size != want {
		return PageBatch{}, malformed(t, "%d pages need %d bytes, payload has %d", n, want, size)
	}
	pfns := d.take(int(n) * 8)
	sums := d.take(int(n) * 4)
	pages := make([]Page, n)
	for i := range pages {
		pages[i].PFN = binary.LittleEndian.Uint64(pfns[8*i:])
		pages[i].Sum = binary.LittleEndian.Uint32(sums[4*i:])
	}
	if err := checkPFNs(pages); err != nil {
		return PageBatch{}, err
	}
	return PageBatch{Epoch: epoch, Pages: pages}, nil
}

// place points the pages' data at consecutive pages of buf.
func (m *PageBatch) place(buf []byte) {
	for i := range m.Pages {
		m.Pages[i].Data = buf[i*PageSize : (i+1)*PageSize : (i+1)*PageSize]
	}
}

// StateBlob carries bytes Offset..Offset+len(Data) of checkpoint Epoch's
// VM state, which this package does not interpret. A blob may be split
// into several chunks.
type StateBlob struct {
	Epoch  uint64
	Offset uint64
	Data   []byte // at least one byte
}

// Type returns TypeStateBlob.
func (StateBlob) Type() Type { return TypeStateBlob }

func (m StateBlob) check() error {
	const t = TypeStateBlob
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	if len(m.Data) == 0 {
		return malformed(t, "no data")
	}
	if m.Offset > MaxStateLen || uint64(len(m.Data)) > MaxStateLen-m.Offset {
		return malformed(t, "chunk at %d of %d bytes ends beyond the state limit %d", m.Offset, len(m.Data), MaxStateLen)
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m StateBlob) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint64(b, m.Offset)
	return append(b, m.Data...), nil
}

// MarshalBinary returns the message body.
func (m StateBlob) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *StateBlob) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeStateBlob, b: data}
	v := StateBlob{Epoch: d.u64(), Offset: d.u64()}
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

// CheckpointEnd closes checkpoint Epoch. Pages and StateLen repeat what was
// sent; Digest is the Digester sum over it.
type CheckpointEnd struct {
	Epoch    uint64
	Pages    uint64
	StateLen uint64
	Digest   uint32
}

// Type returns TypeCheckpointEnd.
func (CheckpointEnd) Type() Type { return TypeCheckpointEnd }

func (m CheckpointEnd) check() error {
	const t = TypeCheckpointEnd
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	switch {
	case m.Pages > MaxPFN+1:
		return malformed(t, "%d pages (limit %d)", m.Pages, uint64(MaxPFN+1))
	case m.StateLen > MaxStateLen:
		return malformed(t, "state length %d (limit %d)", m.StateLen, MaxStateLen)
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m CheckpointEnd) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint64(b, m.Pages)
	b = binary.LittleEndian.AppendUint64(b, m.StateLen)
	return binary.LittleEndian.AppendUint32(b, m.Digest), nil
}

// MarshalBinary returns the message body.
func (m CheckpointEnd) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *CheckpointEnd) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeCheckpointEnd, b: data}
	v := CheckpointEnd{Epoch: d.u64(), Pages: d.u64(), StateLen: d.u64(), Digest: d.u32()}
	if err := d.finish(); err != nil {
		return err
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Ack acknowledges that the sender holds checkpoint Epoch completely and
// has verified it.
type Ack struct{ Epoch uint64 }

// Type returns TypeAck.
func (Ack) Type() Type { return TypeAck }

// AppendBinary appends the message body to b.
func (m Ack) AppendBinary(b []byte) ([]byte, error) { return appendEpoch(b, TypeAck, m.Epoch) }

// MarshalBinary returns the message body.
func (m Ack) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Ack) UnmarshalBinary(data []byte) error { return decodeEpoch(data, TypeAck, &m.Epoch) }

// Activate tells a backup to restore checkpoint Epoch and run the guest.
type Activate struct{ Epoch uint64 }

// Type returns TypeActivate.
func (Activate) Type() Type { return TypeActivate }

// AppendBinary appends the message body to b.
func (m Activate) AppendBinary(b []byte) ([]byte, error) {
	return appendEpoch(b, TypeActivate, m.Epoch)
}

// MarshalBinary returns the message body.
func (m Activate) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Activate) UnmarshalBinary(data []byte) error {
	return decodeEpoch(data, TypeActivate, &m.Epoch)
}

func appendEpoch(b []byte, t Type, e uint64) ([]byte, error) {
	if err := checkEpoch(t, e); err != nil {
		return b, err
	}
	return binary.LittleEndian.AppendUint64(b, e), nil
}

func decodeEpoch(data []byte, t Type, into *uint64) error {
	d := decoder{t: t, b: data}
	e := d.u64()
	if err := d.finish(); err != nil {
		return err
	}
	if err := checkEpoch(t, e); err != nil {
		return err
	}
	*into = e
	return nil
}

// MaxPolicyLen bounds a Policy's text.
const MaxPolicyLen = 1024

// Policy is a forwarding policy a backup installs at its intermediary
// (backup-driven retrieval): Spec says, in the intermediary's policy
// language, what to send and when. Version must grow with every policy a
// backup installs; the intermediary answers PolicyAck{Version}, or an Error
// (CodeRefused) saying why it refuses the policy, which changes nothing.
type Policy struct {
	Version uint64
	Spec    string // at most MaxPolicyLen bytes of UTF-8
}

// Type returns TypePolicy.
func (Policy) Type() Type { return TypePolicy }

// AppendBinary appends the message body to b.
func (m Policy) AppendBinary(b []byte) ([]byte, error) {
	if m.Version == 0 {
		return b, malformed(TypePolicy, "version 0")
	}
	if err := checkText(TypePolicy, "spec", m.Spec, MaxPolicyLen); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Version)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(m.Spec)))
	return append(b, m.Spec...), nil
}

// MarshalBinary returns the message body.
func (m Policy) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Policy) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypePolicy, b: data}
	v := Policy{Version: d.u64()}
	v.Spec = string(d.take(int(d.u16())))
	if err := d.finish(); err != nil {
		return err
	}
	if v.Version == 0 {
		return malformed(TypePolicy, "version 0")
	}
	if err := checkText(TypePolicy, "spec", v.Spec, MaxPolicyLen); err != nil {
		return err
	}
	*m = v
	return nil
}

// PolicyAck confirms that policy Version is installed.
type PolicyAck struct {
	Version uint64
}

// Type returns TypePolicyAck.
func (PolicyAck) Type() Type { return TypePolicyAck }

// AppendBinary appends the message body to b.
func (m PolicyAck) AppendBinary(b []byte) ([]byte, error) {
	return binary.LittleEndian.AppendUint64(b, m.Version), nil
}

// MarshalBinary returns the message body.
func (m PolicyAck) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *PolicyAck) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypePolicyAck, b: data}
	v := PolicyAck{Version: d.u64()}
	if err := d.finish(); err != nil {
		return err
	}
	*m = v
	return nil
}

// CompressedBatch is a PageBatch of Epoch compressed for a slow link: Sums
// are its pages' end-to-end sums (see PageSum), in order, and Data is the
// batch in the ft/wanzip encoding, which the receiver decodes (and checks)
// back into the PageBatch it stands for, wherever a PageBatch may come; it
// must hold len(Sums) pages. This package only frames it.
type CompressedBatch struct {
	Epoch uint64
	Sums  []uint32 // 1..MaxBatchPages
	Data  []byte   // at least 3 bytes: a wanzip batch
}

// Type returns TypeCompressedBatch.
func (CompressedBatch) Type() Type { return TypeCompressedBatch }

func (m CompressedBatch) check() error {
	const t = TypeCompressedBatch
	if err := checkEpoch(t, m.Epoch); err != nil {
		return err
	}
	if n := len(m.Sums); n == 0 || n > MaxBatchPages {
		return malformed(t, "%d pages (want 1..%d)", n, MaxBatchPages)
	}
	if len(m.Data) < 3 {
		return malformed(t, "%d data bytes, want at least 3", len(m.Data))
	}
	return nil
}

// AppendBinary appends the message body to b.
func (m CompressedBatch) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Sums)))
	for _, s := range m.Sums {
		b = binary.LittleEndian.AppendUint32(b, s)
	}
	return append(b, m.Data...), nil
}

// MarshalBinary returns the message body.
func (m CompressedBatch) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *CompressedBatch) UnmarshalBinary(data []byte) error {
	const t = TypeCompressedBatch
	d := decoder{t: t, b: data}
	v := CompressedBatch{Epoch: d.u64()}
	n := d.u32()
	if d.err == nil && n > MaxBatchPages {
		return malformed(t, "%d pages (want 1..%d)", n, MaxBatchPages)
	}
	sums := d.take(4 * int(n))
	if d.err != nil {
		return d.err
	}
	v.Sums = make([]uint32, n)
	for i := range v.Sums {
		v.Sums[i] = binary.LittleEndian.Uint32(sums[4*i:])
	}
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
