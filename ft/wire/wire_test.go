package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// page returns PageSize bytes filled from seed.
func page(seed byte) []byte {
	b := make([]byte, PageSize)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// samples has at least one valid message of every type.
func samples() []Message {
	return []Message{
		&Hello{Version: Version, Role: RolePrimary, Name: "pri-1", VMID: [16]byte{1, 2, 3, 15: 9}, MemSize: 256 << 20},
		&Hello{Version: 7, Role: RoleBackup, Name: strings.Repeat("b", MaxNameLen)},
		&Heartbeat{Seq: 42, Sent: -1},
		&Heartbeat{Seq: 1<<64 - 1, Sent: 1_800_000_000_000_000_000},
		&Error{Code: CodeVersion, Reason: "this node speaks version 1 ✓"},
		&Error{Code: CodeInternal},
		&Bye{Reason: "shutting down"},
		&Bye{},
		&Status{Role: RoleBackup, Committed: 0},
		&Status{Role: RoleIntermediary, Committed: 99},
		&Ready{},
		&CheckpointBegin{Epoch: 1, Pages: 65536, StateLen: 12345, Flags: FlagFullImage},
		&CheckpointBegin{Epoch: 9, Base: 8, Pages: 3, StateLen: MaxStateLen},
		&PageBatch{Epoch: 3, Pages: []Page{{PFN: 0, Sum: PageSum(0, page(1)), Data: page(1)}}},
		&PageBatch{Epoch: 3, Pages: []Page{{PFN: 5, Sum: 1, Data: page(2)}, {PFN: 6, Data: page(3)}, {PFN: MaxPFN, Sum: 1<<32 - 1, Data: page(4)}}},
		&StateBlob{Epoch: 3, Offset: 0, Data: []byte("vcpu state")},
		&StateBlob{Epoch: 3, Offset: MaxStateLen - 1, Data: []byte{0}},
		&CheckpointEnd{Epoch: 3, Pages: 3, StateLen: 10, Digest: 0xaa5500ff},
		&Ack{Epoch: 3},
		&Activate{Epoch: 1<<64 - 1},
		&CheckpointBegin{Epoch: 9, Base: 4, Pages: 0, StateLen: 1, Flags: FlagStaged},
		&Policy{Version: 1, Spec: "pull-every=2s,max-lag-epochs=400"},
		&Policy{Version: 1<<64 - 1, Spec: strings.Repeat("p", MaxPolicyLen)},
		&PolicyAck{Version: 0},
		&PolicyAck{Version: 7},
		&CompressedBatch{Epoch: 4, Sums: []uint32{7}, Data: []byte{1, 0, 1, 0, 0}},
		&CompressedBatch{Epoch: 4, Sums: make([]uint32, MaxBatchPages), Data: []byte{1, 0, 1}},
		&Manifest{Epoch: 5, Pages: []ManifestPage{{PFN: 0, Freq: 0}, {PFN: 7, Freq: FreqOne}, {PFN: MaxPFN, Freq: 65535}}},
		&PageRequest{ID: 0, PFNs: []uint64{3}},
		&PageRequest{ID: 1<<64 - 1, PFNs: []uint64{1, 2, 9, MaxPFN}},
		&Served{ID: 3, Epoch: 8, Pages: 0},
		&DiskWrites{Epoch: 5, Disk: 1, Disks: 2, Part: 0, Parts: 1, Data: []byte("USDW")},
		&DiskSeed{Epoch: 5, Disk: 0, Disks: 1, Size: 8192, Offset: 4096, Fingerprint: [32]byte{1, 31: 2}, Data: make([]byte, 4096)},
	}
}

func TestRoundTrip(t *testing.T) {
	seen := map[Type]bool{}
	for _, m := range samples() {
		seen[m.Type()] = true
		body, err := m.MarshalBinary()
		if err != nil {
			t.Fatalf("%T.MarshalBinary() = %v", m, err)
		}
		got, err := Decode(m.Type(), body)
		if err != nil {
			t.Fatalf("Decode(%v, %x) = %v, want %+v", m.Type(), body, err, m)
		}
		if !reflect.DeepEqual(got, m) {
			t.Errorf("Decode(%v, MarshalBinary(m)) = %+v, want %+v", m.Type(), got, m)
		}
		// AppendBinary appends after existing bytes and agrees with MarshalBinary.
		app, err := m.AppendBinary([]byte("prefix"))
		if err != nil || !bytes.Equal(app, append([]byte("prefix"), body...)) {
			t.Errorf("%T.AppendBinary(prefix) = %x, %v; want prefix then %x", m, app, err, body)
		}
	}
	for t8 := range 256 {
		if typ := Type(t8); typ.Known() != seen[typ] {
			t.Errorf("Type(%#x).Known() = %v, but samples cover it: %v", t8, typ.Known(), seen[typ])
		}
	}
}

func TestStreamRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	ms := samples()
	for _, m := range ms {
		if err := w.WriteMessage(m); err != nil {
			t.Fatalf("WriteMessage(%+v) = %v", m, err)
		}
	}
	for name, src := range map[string]io.Reader{
		"whole":   bytes.NewReader(buf.Bytes()),
		"onebyte": iotest.OneByteReader(bytes.NewReader(buf.Bytes())),
		"dataerr": iotest.DataErrReader(bytes.NewReader(buf.Bytes())),
		"half":    iotest.HalfReader(bytes.NewReader(buf.Bytes())),
	} {
		r := NewReader(src)
		for i, want := range ms {
			got, err := r.ReadMessage()
			if err != nil {
				t.Fatalf("%s: ReadMessage() #%d = %v, want %v", name, i, err, want.Type())
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s: ReadMessage() #%d = %+v, want %+v", name, i, got, want)
			}
		}
		if _, err := r.ReadMessage(); err != io.EOF {
			t.Errorf("%s: ReadMessage() at end = %v, want io.EOF", name, err)
		}
	}
}

func TestLargeBatch(t *testing.T) {
	pages := make([]Page, MaxBatchPages)
	for i := range pages {
		pages[i] = Page{PFN: uint64(3 * i), Data: page(byte(i))}
	}
	m := &PageBatch{Epoch: 1, Pages: pages}
	frame, err := AppendFrame(nil, m)
	if err != nil {
		t.Fatalf("AppendFrame(%d-page batch) = %v", len(pages), err)
	}
	if want := HeaderSize + 16 + MaxBatchPages*(12+PageSize) + TrailerSize; len(frame) != want {
		t.Errorf("len(AppendFrame(%d-page batch)) = %d, want %d", len(pages), len(frame), want)
	}
	got, err := NewReader(bytes.NewReader(frame)).ReadMessage()
	if err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("ReadMessage(%d-page batch) = %v; want the batch back", len(pages), err)
	}
	// The decoded pages do not alias the frame.
	frame[HeaderSize+16+MaxBatchPages*12] ^= 0xff
	if got.(*PageBatch).Pages[0].Data[0] != page(0)[0] {
		t.Errorf("decoded page data aliases the frame buffer")
	}
}

// encodeRaw frames an arbitrary payload with correct CRCs.
func encodeRaw(version uint8, typ Type, flags uint16, payload []byte) []byte {
	h := make([]byte, HeaderSize, HeaderSize+len(payload)+TrailerSize)
	copy(h, magic[:])
	h[4], h[5] = version, byte(typ)
	binary.LittleEndian.PutUint16(h[6:], flags)
	binary.LittleEndian.PutUint32(h[8:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(h[12:], crc32.Checksum(h[:12], castagnoli))
	b := append(h, payload...)
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b[:HeaderSize+coveredLen(typ, payload)], castagnoli))
}

func TestReadFrameErrors(t *testing.T) {
	ack, err := AppendFrame(nil, &Ack{Epoch: 5})
	if err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte)) []byte {
		b := bytes.Clone(ack)
		f(b)
		return b
	}
	// refix recomputes the header CRC after a header change.
	refix := func(b []byte) { binary.LittleEndian.PutUint32(b[12:], crc32.Checksum(b[:12], castagnoli)) }
	tests := []struct {
		name string
		in   []byte
		want error
		sub  string
	}{
		{"empty", nil, io.EOF, "EOF"},
		{"bad magic", mut(func(b []byte) { b[0] = 'X' }), ErrBadMagic, "magic"},
		{"http", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), ErrBadMagic, "magic"},
		{"header crc", mut(func(b []byte) { b[12] ^= 1 }), ErrChecksum, "header CRC"},
		{"length bit flip", mut(func(b []byte) { b[9] ^= 4 }), ErrChecksum, "header CRC"},
		{"version 1", encodeRaw(1, TypeAck, 0, make([]byte, 8)), ErrVersion, "version 1"},
		{"version 3", encodeRaw(3, TypeAck, 0, make([]byte, 8)), ErrVersion, "version 3"},
		{"version 0", encodeRaw(0, TypeAck, 0, make([]byte, 8)), ErrVersion, "version 0"},
		{"type 0", encodeRaw(Version, 0, 0, nil), ErrUnknownType, "type 0x00"},
		{"type 0x3f", encodeRaw(Version, 0x3f, 0, nil), ErrUnknownType, "type 0x3f"},
		{"flags", encodeRaw(Version, TypeAck, 0x8000, make([]byte, 8)), ErrMalformed, "flags"},
		{"oversize", mut(func(b []byte) { binary.LittleEndian.PutUint32(b[8:], MaxPayload+1); refix(b) }), ErrTooLarge, "67108865"},
		{"max uint32 length", mut(func(b []byte) { binary.LittleEndian.PutUint32(b[8:], 1<<32-1); refix(b) }), ErrTooLarge, "limit"},
		{"payload flip", mut(func(b []byte) { b[HeaderSize] ^= 0x10 }), ErrChecksum, "CRC-32C"},
		{"trailer flip", mut(func(b []byte) { b[len(b)-1] ^= 0x80 }), ErrChecksum, "CRC-32C"},
		{"short header", ack[:7], io.ErrUnexpectedEOF, "truncated after 7 bytes"},
		{"header only", ack[:HeaderSize], io.ErrUnexpectedEOF, "truncated"},
		{"no trailer", ack[:len(ack)-TrailerSize], io.ErrUnexpectedEOF, "truncated"},
		{"half trailer", ack[:len(ack)-2], io.ErrUnexpectedEOF, "truncated"},
		{"message error", encodeRaw(Version, TypeAck, 0, make([]byte, 8)), ErrMalformed, "epoch 0"},
		{"message trailing", encodeRaw(Version, TypeAck, 0, make([]byte, 9)), ErrMalformed, "trailing"},
	}
	for _, tc := range tests {
		r := NewReader(bytes.NewReader(tc.in))
		_, err := r.ReadMessage()
		if !errors.Is(err, tc.want) || !strings.Contains(fmt.Sprint(err), tc.sub) {
			t.Errorf("%s: ReadMessage(%x) = %v, want %v containing %q", tc.name, tc.in, err, tc.want, tc.sub)
		}
		if tc.want == ErrVersion {
			var ve *VersionError
			if !errors.As(err, &ve) || ve.Got != tc.in[4] {
				t.Errorf("%s: ReadMessage() = %#v, want *VersionError{Got: %d}", tc.name, err, tc.in[4])
			}
		}
	}
}

// TestEveryTruncation cuts a stream of frames at every byte: the Reader
// returns each whole frame, then io.EOF at a boundary or
// io.ErrUnexpectedEOF inside a frame, never a panic or a partial message.
func TestEveryTruncation(t *testing.T) {
	var stream []byte
	var ends []int
	for _, m := range []Message{&Hello{Version: 1, Role: RoleBackup, Name: "b"}, &Ack{Epoch: 1}, &StateBlob{Epoch: 1, Data: []byte("xyz")}} {
		var err error
		if stream, err = AppendFrame(stream, m); err != nil {
			t.Fatal(err)
		}
		ends = append(ends, len(stream))
	}
	for cut := 0; cut <= len(stream); cut++ {
		r := NewReader(bytes.NewReader(stream[:cut]))
		whole := 0
		for _, e := range ends {
			if e <= cut {
				whole++
			}
		}
		for i := range whole {
			if _, err := r.ReadMessage(); err != nil {
				t.Fatalf("cut %d: ReadMessage() #%d = %v, want a message", cut, i, err)
			}
		}
		_, err := r.ReadMessage()
		atBoundary := cut == 0 || (whole > 0 && ends[whole-1] == cut)
		if atBoundary && err != io.EOF {
			t.Errorf("cut %d (frame boundary): ReadMessage() = %v, want io.EOF", cut, err)
		}
		if !atBoundary && !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Errorf("cut %d (inside a frame): ReadMessage() = %v, want io.ErrUnexpectedEOF", cut, err)
		}
	}
}

func TestReaderStickyError(t *testing.T) {
	good, _ := AppendFrame(nil, &Ack{Epoch: 1})
	bad := bytes.Clone(good)
	bad[HeaderSize] ^= 1
	r := NewReader(bytes.NewReader(append(bad, good...)))
	_, err1 := r.ReadFrame()
	_, err2 := r.ReadFrame()
	if !errors.Is(err1, ErrChecksum) || err2 != err1 {
		t.Errorf("ReadFrame() twice after a corrupt frame = %v, %v; want the same ErrChecksum twice", err1, err2)
	}
}

// TestOversizeAllocation checks that a header claiming a huge payload costs
// no more than one allocation step until the bytes arrive.
func TestOversizeAllocation(t *testing.T) {
	f := encodeRaw(Version, TypeStateBlob, 0, nil)[:HeaderSize]
	binary.LittleEndian.PutUint32(f[8:], MaxPayload)
	binary.LittleEndian.PutUint32(f[12:], crc32.Checksum(f[:12], castagnoli))
	r := NewReader(bytes.NewReader(append(f, make([]byte, 100)...)))
	_, err := r.ReadFrame()
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("ReadFrame(64 MiB claim, 100 bytes) = %v, want io.ErrUnexpectedEOF", err)
	}
	if cap(r.buf) > allocStep {
		t.Errorf("ReadFrame(64 MiB claim, 100 bytes) allocated %d bytes, want at most %d", cap(r.buf), allocStep)
	}
}

// timeoutErr is a deadline error, like os.ErrDeadlineExceeded from a conn.
type timeoutErr struct{}

func (timeoutErr) Error() string { return "i/o timeout" }
func (timeoutErr) Timeout() bool { return true }

// stutter returns a timeout before every chunk of n bytes.
type stutter struct {
	b       []byte
	n       int
	pending bool
}

func (s *stutter) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	if s.pending = !s.pending; s.pending {
		return 0, timeoutErr{}
	}
	k := min(len(p), s.n, len(s.b))
	copy(p, s.b[:k])
	s.b = s.b[k:]
	return k, nil
}

func TestReaderResumesAfterTimeout(t *testing.T) {
	var stream []byte
	ms := samples()
	for _, m := range ms {
		stream, _ = AppendFrame(stream, m)
	}
	r := NewReader(&stutter{b: stream, n: 5000})
	for i := 0; i < len(ms); {
		m, err := r.ReadMessage()
		if errors.Is(err, timeoutErr{}) {
			continue
		}
		if err != nil {
			t.Fatalf("ReadMessage() #%d = %v, want %v", i, err, ms[i].Type())
		}
		if !reflect.DeepEqual(m, ms[i]) {
			t.Fatalf("ReadMessage() #%d = %+v, want %+v", i, m, ms[i])
		}
		i++
	}
	for {
		_, err := r.ReadMessage()
		if errors.Is(err, timeoutErr{}) {
			continue
		}
		if err != io.EOF {
			t.Errorf("ReadMessage() at end = %v, want io.EOF", err)
		}
		break
	}
	// The deadline error a net.Conn returns is a timeout too.
	if !isTimeoutForTest(os.ErrDeadlineExceeded) {
		t.Errorf("os.ErrDeadlineExceeded is not treated as a timeout")
	}
}

func isTimeoutForTest(err error) bool {
	r := NewReader(iotest.ErrReader(err))
	_, got := r.ReadFrame()
	return got == err && r.err == nil
}

type failWriter struct{ err error }

func (f failWriter) Write([]byte) (int, error) { return 0, f.err }

func TestWriterErrors(t *testing.T) {
	w := NewWriter(failWriter{io.ErrClosedPipe})
	if err := w.WriteMessage(&Ack{Epoch: 1}); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("WriteMessage(to a failing writer) = %v, want io.ErrClosedPipe", err)
	}
	big := &StateBlob{Epoch: 1, Data: make([]byte, MaxPayload)}
	if err := NewWriter(io.Discard).WriteMessage(big); !errors.Is(err, ErrTooLarge) {
		t.Errorf("WriteMessage(StateBlob of MaxPayload bytes) = %v, want ErrTooLarge", err)
	}
	if b, err := AppendFrame([]byte("x"), big); err == nil || string(b) != "x" {
		t.Errorf("AppendFrame(x, too big) = %q, %v; want x unchanged and an error", b, err)
	}
	if b, err := AppendFrame([]byte("x"), &Ack{}); !errors.Is(err, ErrMalformed) || string(b) != "x" {
		t.Errorf("AppendFrame(x, Ack{0}) = %q, %v; want x unchanged and ErrMalformed", b, err)
	}
}

// TestEncodeRejects checks that each invalid message fails to encode with
// ErrMalformed and appends nothing.
func TestEncodeRejects(t *testing.T) {
	two := []Page{{PFN: 1, Data: page(0)}, {PFN: 1, Data: page(1)}}
	tests := []struct {
		m   Message
		sub string
	}{
		{&Hello{Role: RolePrimary, Name: "a"}, "version 0"},
		{&Hello{Version: 1, Name: "a"}, "role(0) is not a role"},
		{&Hello{Version: 1, Role: 4, Name: "a"}, "role(4)"},
		{&Hello{Version: 1, Role: RolePrimary}, "node name"},
		{&Hello{Version: 1, Role: RolePrimary, Name: "a/b"}, "node name"},
		{&Hello{Version: 1, Role: RolePrimary, Name: strings.Repeat("x", 65)}, "1..64"},
		{&Hello{Version: 1, Role: RolePrimary, Name: "a", MemSize: 4097}, "multiple of 4096"},
		{&Hello{Version: 1, Role: RolePrimary, Name: "a", MemSize: MaxMemSize + PageSize}, "multiple of 4096"},
		{&Error{Code: 0}, "code(0)"},
		{&Error{Code: 99, Reason: "x"}, "code(99)"},
		{&Error{Code: CodeProtocol, Reason: strings.Repeat("r", MaxReasonLen+1)}, "limit 1024"},
		{&Error{Code: CodeProtocol, Reason: "\xff"}, "UTF-8"},
		{&Bye{Reason: "\xc3"}, "UTF-8"},
		{&Bye{Reason: strings.Repeat("r", MaxReasonLen+1)}, "limit"},
		{&Status{Role: 0}, "not a role"},
		{&CheckpointBegin{Epoch: 0, Flags: FlagFullImage}, "epoch 0"},
		{&CheckpointBegin{Epoch: 2, Base: 1, Flags: FlagFullImage}, "full image with base"},
		{&CheckpointBegin{Epoch: 2, Base: 0}, "want 1 <= base < epoch"},
		{&CheckpointBegin{Epoch: 2, Base: 2}, "want 1 <= base < epoch"},
		{&CheckpointBegin{Epoch: 2, Flags: 4 | FlagFullImage}, "undefined flags 0x4"},
		{&CheckpointBegin{Epoch: 2, Flags: FlagStaged | FlagFullImage}, "a full image cannot commit staged pages"},
		{&CheckpointBegin{Epoch: 2, Flags: FlagFullImage, Pages: MaxPFN + 2}, "pages"},
		{&CheckpointBegin{Epoch: 2, Flags: FlagFullImage, StateLen: MaxStateLen + 1}, "state length"},
		{&PageBatch{Epoch: 1}, "0 pages"},
		{&PageBatch{Epoch: 0, Pages: two[:1]}, "epoch 0"},
		{&PageBatch{Epoch: 1, Pages: make([]Page, MaxBatchPages+1)}, "8193 pages"},
		{&PageBatch{Epoch: 1, Pages: []Page{{PFN: 1, Data: make([]byte, 100)}}}, "100 bytes of data"},
		{&PageBatch{Epoch: 1, Pages: two}, "not above the previous"},
		{&PageBatch{Epoch: 1, Pages: []Page{{PFN: MaxPFN + 1, Data: page(0)}}}, "beyond"},
		{&StateBlob{Epoch: 1}, "no data"},
		{&StateBlob{Epoch: 0, Data: []byte{1}}, "epoch 0"},
		{&StateBlob{Epoch: 1, Offset: MaxStateLen, Data: []byte{1}}, "beyond the state limit"},
		{&StateBlob{Epoch: 1, Offset: 1<<64 - 1, Data: []byte{1}}, "beyond the state limit"},
		{&CheckpointEnd{Epoch: 0}, "epoch 0"},
		{&CheckpointEnd{Epoch: 1, Pages: 1 << 62}, "pages"},
		{&CheckpointEnd{Epoch: 1, StateLen: MaxStateLen + 1}, "state length"},
		{&Ack{}, "epoch 0"},
		{&Activate{}, "epoch 0"},
	}
	for _, tc := range tests {
		b, err := tc.m.AppendBinary([]byte("p"))
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("%T%+v.AppendBinary() = %v, want ErrMalformed containing %q", tc.m, tc.m, err, tc.sub)
		}
		if string(b) != "p" {
			t.Errorf("%T.AppendBinary(p) on error = %q, want p unchanged", tc.m, b)
		}
	}
}

// body marshals m, failing the test on error.
func body(t *testing.T, m Message) []byte {
	t.Helper()
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("%T.MarshalBinary() = %v", m, err)
	}
	return b
}

// TestDecodeRejects checks that malformed bodies of every type fail with
// ErrMalformed.
func TestDecodeRejects(t *testing.T) {
	set := func(b []byte, off int, v ...byte) []byte {
		b = bytes.Clone(b)
		copy(b[off:], v)
		return b
	}
	hello := body(t, &Hello{Version: 1, Role: RolePrimary, Name: "node", MemSize: 1 << 20})
	batch := body(t, &PageBatch{Epoch: 2, Pages: []Page{{PFN: 1, Data: page(0)}, {PFN: 2, Data: page(1)}}})
	u64 := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	manifest := body(t, &Manifest{Epoch: 2, Pages: []ManifestPage{{PFN: 1, Freq: 3}, {PFN: 2, Freq: 4}}})
	request := body(t, &PageRequest{ID: 9, PFNs: []uint64{1, 2}})
	tests := []struct {
		name string
		t    Type
		in   []byte
		sub  string
	}{
		{"hello empty", TypeHello, nil, "truncated"},
		{"hello short name", TypeHello, hello[:len(hello)-1], "truncated"},
		{"hello trailing", TypeHello, append(bytes.Clone(hello), 0), "trailing"},
		{"hello version 0", TypeHello, set(hello, 0, 0), "version 0"},
		{"hello role 9", TypeHello, set(hello, 1, 9), "role(9)"},
		{"hello mem", TypeHello, set(hello, 18, 1), "multiple"},
		{"hello name char", TypeHello, set(hello, 27, '/'), "node name"},
		{"hello name len 0", TypeHello, set(hello, 26, 0)[:27], "node name"},
		{"heartbeat short", TypeHeartbeat, make([]byte, 15), "truncated"},
		{"heartbeat long", TypeHeartbeat, make([]byte, 17), "trailing"},
		{"error code 0", TypeError, []byte{0, 0, 0, 0}, "code(0)"},
		{"error len", TypeError, []byte{1, 0, 5, 0, 'a'}, "truncated"},
		{"error utf8", TypeError, []byte{1, 0, 1, 0, 0xff}, "UTF-8"},
		{"error too long", TypeError, append([]byte{1, 0, 0x01, 0x04}, make([]byte, 1025)...), "limit 1024"},
		{"bye trailing", TypeBye, []byte{0, 0, 1}, "trailing"},
		{"bye empty", TypeBye, nil, "truncated"},
		{"status role", TypeStatus, make([]byte, 9), "not a role"},
		{"status short", TypeStatus, []byte{1}, "truncated"},
		{"ready body", TypeReady, []byte{0}, "want none"},
		{"begin short", TypeCheckpointBegin, make([]byte, 35), "truncated"},
		{"begin zero", TypeCheckpointBegin, make([]byte, 36), "epoch 0"},
		{"begin base", TypeCheckpointBegin, set(make([]byte, 36), 0, 1, 0, 0, 0, 0, 0, 0, 0, 1), "want 1 <= base < epoch"},
		{"begin unknown flag", TypeCheckpointBegin, set(make([]byte, 36), 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80), "undefined flags"},
		{"batch empty", TypePageBatch, nil, "truncated"},
		{"batch count 0", TypePageBatch, set(batch, 8, 0)[:16], "0 pages"},
		{"batch count huge", TypePageBatch, set(batch, 8, 0xff, 0xff, 0xff, 0xff), "4294967295 pages"},
		{"batch count high", TypePageBatch, set(batch, 8, 3), "need"},
		{"batch reserved", TypePageBatch, set(batch, 12, 1), "reserved"},
		{"batch epoch 0", TypePageBatch, set(batch, 0, 0, 0), "epoch 0"},
		{"batch short data", TypePageBatch, batch[:len(batch)-1], "need"},
		{"batch trailing", TypePageBatch, append(bytes.Clone(batch), 0), "need"},
		{"batch order", TypePageBatch, set(batch, 24, 1), "not above"},
		{"batch pfn range", TypePageBatch, set(batch, 16, 0, 0, 0, 0, 0, 1), "beyond"},
		{"state no data", TypeStateBlob, make([]byte, 16), "epoch 0"},
		{"state empty", TypeStateBlob, append(u64(1), u64(0)...), "no data"},
		{"state short", TypeStateBlob, make([]byte, 15), "truncated"},
		{"state limit", TypeStateBlob, append(append(u64(1), u64(MaxStateLen)...), 1), "state limit"},
		{"end short", TypeCheckpointEnd, make([]byte, 27), "truncated"},
		{"end long", TypeCheckpointEnd, append(u64(1), make([]byte, 21)...), "trailing"},
		{"end state", TypeCheckpointEnd, append(append(u64(1), u64(0)...), append(u64(MaxStateLen+1), make([]byte, 4)...)...), "state length"},
		{"ack short", TypeAck, make([]byte, 7), "truncated"},
		{"ack zero", TypeAck, make([]byte, 8), "epoch 0"},
		{"ack long", TypeAck, make([]byte, 9), "trailing"},
		{"activate zero", TypeActivate, make([]byte, 8), "epoch 0"},
		{"policy version 0", TypePolicy, make([]byte, 10), "version 0"},
		{"policy short", TypePolicy, []byte{1, 0, 0, 0, 0, 0, 0, 0, 5, 0, 'a'}, "truncated"},
		{"policy bad utf-8", TypePolicy, []byte{1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0xff}, "UTF-8"},
		{"policy ack long", TypePolicyAck, make([]byte, 9), "trailing"},
		{"compressed epoch 0", TypeCompressedBatch, make([]byte, 12), "epoch 0"},
		{"compressed short", TypeCompressedBatch, []byte{1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 9, 9, 9, 1}, "at least 3"},
		{"compressed no pages", TypeCompressedBatch, []byte{1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3}, "0 pages"},
		{"compressed too many", TypeCompressedBatch, []byte{1, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x20, 0, 0, 1, 2, 3}, "8193 pages"},
		{"compressed sums short", TypeCompressedBatch, []byte{1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 2, 3}, "truncated"},
		{"manifest empty", TypeManifest, nil, "truncated"},
		{"manifest count 0", TypeManifest, set(manifest, 8, 0)[:12], "0 pages"},
		{"manifest count huge", TypeManifest, set(manifest, 8, 0xff, 0xff, 0xff, 0xff), "4294967295 pages"},
		{"manifest short", TypeManifest, manifest[:len(manifest)-1], "need"},
		{"manifest trailing", TypeManifest, append(bytes.Clone(manifest), 0), "need"},
		{"manifest epoch 0", TypeManifest, set(manifest, 0, 0), "epoch 0"},
		{"manifest order", TypeManifest, set(manifest, 20, 1), "not above"},
		{"manifest pfn range", TypeManifest, set(manifest, 12, 0, 0, 0, 0, 0, 1), "beyond"},
		{"request empty", TypePageRequest, nil, "truncated"},
		{"request count 0", TypePageRequest, set(request, 8, 0)[:12], "0 pages"},
		{"request too many", TypePageRequest, set(request, 8, 0x01, 0x20), "8193 pages"},
		{"request short", TypePageRequest, request[:len(request)-1], "need"},
		{"request order", TypePageRequest, set(request, 20, 1), "not above"},
		{"request duplicate", TypePageRequest, set(request, 12, 2), "not above"},
		{"request pfn range", TypePageRequest, set(request, 12, 0, 0, 0, 0, 0, 1), "beyond"},
		{"served epoch 0", TypeServed, make([]byte, 20), "epoch 0"},
		{"served long", TypeServed, make([]byte, 21), "trailing"},
	}
	for _, tc := range tests {
		m, err := Decode(tc.t, tc.in)
		if !errors.Is(err, ErrMalformed) || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("%s: Decode(%v, %d bytes) = %v, %v; want ErrMalformed containing %q", tc.name, tc.t, len(tc.in), m, err, tc.sub)
		}
	}
	if _, err := Decode(0x3f, nil); !errors.Is(err, ErrUnknownType) {
		t.Errorf("Decode(0x3f, nil) = %v, want ErrUnknownType", err)
	}
}

// TestUnmarshalKeepsOnError checks a failed UnmarshalBinary leaves the
// message as it was.
func TestUnmarshalKeepsOnError(t *testing.T) {
	for _, m := range samples() {
		before := reflect.ValueOf(m).Elem().Interface()
		if err := m.UnmarshalBinary([]byte{0xff}); err == nil {
			t.Errorf("%T.UnmarshalBinary(ff) = nil, want an error", m)
		}
		if after := reflect.ValueOf(m).Elem().Interface(); !reflect.DeepEqual(before, after) {
			t.Errorf("%T.UnmarshalBinary(ff) changed the message to %+v", m, after)
		}
	}
}

func TestCheckName(t *testing.T) {
	for s, ok := range map[string]bool{
		"a": true, "primary-1": true, "node.example_2": true, "9lives": true, strings.Repeat("n", 64): true,
		"": false, "-a": false, ".a": false, "_a": false, "a b": false, "a/b": false, "ä": false,
		"../x": false, strings.Repeat("n", 65): false, "a\x00": false,
	} {
		if err := CheckName(s); (err == nil) != ok {
			t.Errorf("CheckName(%q) = %v, want ok=%v", s, err, ok)
		}
	}
}

func TestRolesAndCodes(t *testing.T) {
	for _, r := range []Role{RolePrimary, RoleIntermediary, RoleBackup} {
		got, err := ParseRole(r.String())
		if err != nil || got != r {
			t.Errorf("ParseRole(%q) = %v, %v; want %v", r.String(), got, err, r)
		}
	}
	for _, s := range []string{"", "Primary", "witness", "role(1)"} {
		if r, err := ParseRole(s); err == nil {
			t.Errorf("ParseRole(%q) = %v, want an error", s, r)
		}
	}
	if Role(0).Valid() || Role(4).Valid() || Code(0).Valid() || Code(9).Valid() || !CodeBadRequest.Valid() {
		t.Errorf("role 0/4 or code 0/9 reported valid, or bad-request not")
	}
	if got := (&Error{Code: CodeFenced, Reason: "epoch 7"}).Error(); got != "peer error (fenced): epoch 7" {
		t.Errorf("Error.Error() = %q", got)
	}
	if got := TypeCheckpointEnd.String() + " " + Type(0x99).String(); got != "CheckpointEnd type 0x99" {
		t.Errorf("Type.String() = %q", got)
	}
}

func TestDigester(t *testing.T) {
	begin := CheckpointBegin{Epoch: 4, Base: 3, Pages: 2, StateLen: 6}
	sum := func(begin CheckpointBegin, f func(d *Digester)) uint32 {
		d := NewDigester(begin)
		f(d)
		return d.Sum()
	}
	s1, s2, s3 := PageSum(1, page(1)), PageSum(2, page(2)), PageSum(2, page(3))
	base := sum(begin, func(d *Digester) {
		d.AddPage(1, s1)
		d.AddPage(2, s2)
		d.AddState([]byte("abcdef"))
	})
	same := map[string]uint32{
		"batch and chunks": sum(begin, func(d *Digester) {
			d.AddState([]byte("ab"))
			d.AddBatch(&PageBatch{Epoch: 4, Pages: []Page{{1, s1, page(1)}}})
			d.AddState([]byte("cdef"))
			d.AddBatch(&PageBatch{Epoch: 4, Pages: []Page{{2, s2, page(2)}}})
		}),
	}
	differ := map[string]uint32{
		"other epoch": sum(CheckpointBegin{Epoch: 5, Base: 3, Pages: 2, StateLen: 6}, func(d *Digester) {
			d.AddPage(1, s1)
			d.AddPage(2, s2)
			d.AddState([]byte("abcdef"))
		}),
		"other pfn": sum(begin, func(d *Digester) {
			d.AddPage(1, s1)
			d.AddPage(3, s2)
			d.AddState([]byte("abcdef"))
		}),
		"other data": sum(begin, func(d *Digester) {
			d.AddPage(1, s1)
			d.AddPage(2, s3)
			d.AddState([]byte("abcdef"))
		}),
		"page order": sum(begin, func(d *Digester) {
			d.AddPage(2, s2)
			d.AddPage(1, s1)
			d.AddState([]byte("abcdef"))
		}),
		"missing page": sum(begin, func(d *Digester) {
			d.AddPage(1, s1)
			d.AddState([]byte("abcdef"))
		}),
		"state": sum(begin, func(d *Digester) {
			d.AddPage(1, s1)
			d.AddPage(2, s2)
			d.AddState([]byte("abcdeF"))
		}),
	}
	for name, s := range same {
		if s != base {
			t.Errorf("digest %s = %x, want %x", name, s, base)
		}
	}
	for name, s := range differ {
		if s == base {
			t.Errorf("digest %s = %x, same as the original", name, s)
		}
	}
	d := NewDigester(begin)
	d.AddBatch(&PageBatch{Epoch: 4, Pages: []Page{{1, s1, page(1)}, {2, s2, page(2)}}})
	if d.Pages() != 2 {
		t.Errorf("Digester.Pages() = %d, want 2", d.Pages())
	}
}

// TestPageSums: a page's sum covers its PFN and its data, and VerifyPages
// names the first page whose data or PFN no longer matches its sum.
func TestPageSums(t *testing.T) {
	pages := []Page{{PFN: 1, Data: page(1)}, {PFN: 2, Data: page(2)}}
	for i := range pages {
		pages[i].Sum = PageSum(pages[i].PFN, pages[i].Data)
	}
	if err := VerifyPages(pages); err != nil {
		t.Fatalf("VerifyPages(good pages) = %v", err)
	}
	if PageSum(1, page(1)) == PageSum(2, page(1)) {
		t.Errorf("PageSum does not cover the PFN")
	}
	bad := []Page{pages[0], {PFN: 2, Sum: pages[1].Sum, Data: bytes.Clone(pages[1].Data)}}
	bad[1].Data[4095] ^= 1
	if err := VerifyPages(bad); !errors.Is(err, ErrChecksum) || !strings.Contains(err.Error(), "page 1 (PFN 0x2)") {
		t.Errorf("VerifyPages(a flipped bit) = %v, want ErrChecksum naming page 1", err)
	}
	moved := []Page{{PFN: 3, Sum: pages[0].Sum, Data: pages[0].Data}}
	if err := VerifyPages(moved); !errors.Is(err, ErrChecksum) {
		t.Errorf("VerifyPages(a page at another PFN) = %v, want ErrChecksum", err)
	}
}

// TestPlacedBatch: with a page place, a PageBatch's data is read straight
// into the placed memory (the message's pages lie there), the frame is
// written vectored from where the pages lie, and what is read equals what
// a Reader without a place reads. The frame's CRC does not cover page data
// (the sums do): a flipped data byte gets through the frame and is caught
// by VerifyPages; a flipped PFN or sum is caught by the frame CRC.
func TestPlacedBatch(t *testing.T) {
	const n = 40 // 160 KiB: written vectored
	mem := make([]byte, (n+1)*PageSize)
	for i := range mem {
		mem[i] = byte(i * 13)
	}
	pages := make([]Page, n)
	for i := range pages {
		d := mem[(i+1)*PageSize : (i+2)*PageSize] // one run, not at the start of mem
		pages[i] = Page{PFN: uint64(10 + 2*i), Sum: PageSum(uint64(10+2*i), d), Data: d}
	}
	m := &PageBatch{Epoch: 7, Pages: pages}
	var wrote [][]byte
	w := NewWriter(writerFunc(func(b []byte) (int, error) { wrote = append(wrote, bytes.Clone(b)); return len(b), nil }))
	if err := w.WriteMessage(m); err != nil {
		t.Fatal(err)
	}
	if len(wrote) != 3 || len(wrote[1]) != n*PageSize {
		t.Fatalf("vectored write made %d writes, want 3 (header and head, the pages in one run, trailer)", len(wrote))
	}
	frame := bytes.Join(wrote, nil)
	if want, _ := AppendFrame(nil, m); !bytes.Equal(frame, want) {
		t.Fatalf("vectored frame differs from AppendFrame's")
	}
	for _, src := range []func() io.Reader{
		func() io.Reader { return bytes.NewReader(frame) },
		func() io.Reader { return iotest.OneByteReader(bytes.NewReader(frame)) },
	} {
		dst := make([]byte, n*PageSize)
		r := NewReader(src())
		r.SetPagePlace(func(k int) []byte {
			if k != n {
				t.Errorf("place(%d), want %d pages", k, n)
			}
			return dst
		})
		got, err := r.ReadMessage()
		if err != nil || !reflect.DeepEqual(got, m) {
			t.Fatalf("placed ReadMessage = %v; want the batch back", err)
		}
		if &got.(*PageBatch).Pages[0].Data[0] != &dst[0] || !bytes.Equal(dst, mem[PageSize:]) {
			t.Fatalf("the pages were not read into the placed memory")
		}
	}
	// No memory placed: read and copied as usual.
	r := NewReader(bytes.NewReader(frame))
	r.SetPagePlace(func(int) []byte { return nil })
	if got, err := r.ReadMessage(); err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("ReadMessage with no memory placed = %v", err)
	}
	// A flipped data byte passes the frame, not the sums.
	flipped := bytes.Clone(frame)
	flipped[HeaderSize+16+n*12+5] ^= 1
	r = NewReader(bytes.NewReader(flipped))
	r.SetPagePlace(func(int) []byte { return make([]byte, n*PageSize) })
	got, err := r.ReadMessage()
	if err != nil {
		t.Fatalf("ReadMessage(flipped page data) = %v; the frame CRC leaves page data to the sums", err)
	}
	if err := VerifyPages(got.(*PageBatch).Pages); !errors.Is(err, ErrChecksum) {
		t.Errorf("VerifyPages(flipped page data) = %v, want ErrChecksum", err)
	}
	// A flipped sum or PFN does not pass the frame, placed or not.
	for _, off := range []int{HeaderSize + 16 + 3, HeaderSize + 16 + n*8 + 1} {
		for _, place := range []bool{false, true} {
			flipped := bytes.Clone(frame)
			flipped[off] ^= 1
			r := NewReader(bytes.NewReader(flipped))
			if place {
				r.SetPagePlace(func(int) []byte { return make([]byte, n*PageSize) })
			}
			if _, err := r.ReadMessage(); !errors.Is(err, ErrChecksum) {
				t.Errorf("ReadMessage(head byte %d flipped, placed %v) = %v, want ErrChecksum", off, place, err)
			}
		}
	}
	// A malformed batch is refused the same, placed or not, and the stream
	// stays in step.
	bad := bytes.Clone(frame[HeaderSize : len(frame)-TrailerSize])
	bad[12] = 1 // reserved
	stream := append(encodeRaw(Version, TypePageBatch, 0, bad), frame...)
	r = NewReader(bytes.NewReader(stream))
	r.SetPagePlace(func(int) []byte { return make([]byte, n*PageSize) })
	if _, err := r.ReadMessage(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("ReadMessage(reserved field set, placed) = %v, want ErrMalformed", err)
	}
	if got, err := r.ReadMessage(); err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("ReadMessage after a malformed batch = %v", err)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
