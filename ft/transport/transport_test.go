package transport

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

func TestHandshakeAndExchange(t *testing.T) {
	p := newPKI(t)
	var lb logBuf
	l := listen(t, &Config{Credentials: p.node("int1", wire.RoleIntermediary), PeerRoles: []wire.Role{wire.RolePrimary}, Logger: lb.logger()})
	vmid := [16]byte{0xde, 0xad, 15: 1}
	cli := dial(t, l.Addr().String(), &Config{
		Credentials: p.node("pri1", wire.RolePrimary), PeerName: "int1", Logger: lb.logger(),
		Hello: wire.Hello{VMID: vmid, MemSize: 64 << 20},
	})
	srv := accept(t, l)

	wantSrvPeer := Peer{Name: "pri1", Role: wire.RolePrimary, Hello: wire.Hello{Version: wire.Version, Role: wire.RolePrimary, Name: "pri1", VMID: vmid, MemSize: 64 << 20}}
	if got := srv.Peer(); got != wantSrvPeer {
		t.Errorf("server Peer() = %+v, want %+v", got, wantSrvPeer)
	}
	if got := cli.Peer(); got.Name != "int1" || got.Role != wire.RoleIntermediary || got.Hello.Version != wire.Version {
		t.Errorf("client Peer() = %+v, want int1, intermediary", got)
	}
	if got, want := l.Addr().String(), "tcp://127.0.0.1:"; !strings.HasPrefix(got, want) || l.Addr().Port == 0 {
		t.Errorf("Listener.Addr() = %s, want %s<port>", got, want)
	}

	data := make([]byte, 3*wire.PageSize)
	for i := range data {
		data[i] = byte(i * 13)
	}
	begin := &wire.CheckpointBegin{Epoch: 1, Pages: 3, StateLen: 5, Flags: wire.FlagFullImage}
	batch := &wire.PageBatch{Epoch: 1, Pages: []wire.Page{{PFN: 1, Data: data[:4096]}, {PFN: 7, Data: data[4096:8192]}, {PFN: 9, Data: data[8192:]}}}
	state := &wire.StateBlob{Epoch: 1, Data: []byte("regs!")}
	d := wire.NewDigester(*begin)
	d.AddBatch(batch)
	d.AddState(state.Data)
	end := &wire.CheckpointEnd{Epoch: 1, Pages: 3, StateLen: 5, Digest: d.Sum()}
	sent := []wire.Message{begin, batch, state, end}
	for _, m := range sent {
		if err := cli.WriteMessage(m); err != nil {
			t.Fatalf("client WriteMessage(%v) = %v", m.Type(), err)
		}
	}
	rd := wire.NewDigester(*begin)
	for i, want := range sent {
		got, err := srv.ReadMessage()
		if err != nil {
			t.Fatalf("server ReadMessage() #%d = %v, want %v", i, err, want.Type())
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("server ReadMessage() #%d = %+v, want %+v", i, got, want)
		}
		switch m := got.(type) {
		case *wire.PageBatch:
			rd.AddBatch(m)
		case *wire.StateBlob:
			rd.AddState(m.Data)
		case *wire.CheckpointEnd:
			if rd.Sum() != m.Digest {
				t.Errorf("receiver digest %x, sender %x", rd.Sum(), m.Digest)
			}
		}
	}
	if err := srv.WriteMessage(&wire.Ack{Epoch: 1}); err != nil {
		t.Fatalf("server WriteMessage(Ack) = %v", err)
	}
	if m, err := cli.ReadMessage(); err != nil || !reflect.DeepEqual(m, &wire.Ack{Epoch: 1}) {
		t.Errorf("client ReadMessage() = %+v, %v; want Ack{1}", m, err)
	}
	// An invalid message is refused locally and the link stays up.
	if err := cli.WriteMessage(&wire.Ack{}); !errors.Is(err, wire.ErrMalformed) {
		t.Errorf("WriteMessage(Ack{0}) = %v, want wire.ErrMalformed", err)
	}
	// A clean close reads as io.EOF.
	if err := cli.WriteMessage(&wire.Bye{Reason: "done"}); err != nil {
		t.Fatalf("WriteMessage(Bye) = %v", err)
	}
	cli.Close()
	if m, err := srv.ReadMessage(); err != nil || m.Type() != wire.TypeBye {
		t.Errorf("server ReadMessage() = %v, %v; want Bye", m, err)
	}
	if _, err := srv.ReadMessage(); err != io.EOF {
		t.Errorf("server ReadMessage() after the peer closed = %v, want io.EOF", err)
	}
	lb.waitFor(t, "peer connected", "peer=pri1", "role=primary")
}

// TestConcurrentWriters writes from several goroutines at once (run with
// -race); every message arrives whole, exactly once.
func TestConcurrentWriters(t *testing.T) {
	p := newPKI(t)
	l := listen(t, &Config{Credentials: p.node("b", wire.RoleBackup)})
	cli := dial(t, l.Addr().String(), &Config{Credentials: p.node("i", wire.RoleIntermediary)})
	srv := accept(t, l)
	const writers, each = 3, 200 // one writer per role
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				if err := cli.WriteMessage(&wire.Status{Role: wire.Role(w + 1), Committed: uint64(w*each + i)}); err != nil {
					t.Errorf("WriteMessage() = %v", err)
					return
				}
			}
		})
	}
	seen := make(map[uint64]bool)
	for range writers * each {
		m, err := srv.ReadMessage()
		if err != nil {
			t.Fatalf("ReadMessage() after %d = %v", len(seen), err)
		}
		st := m.(*wire.Status)
		if seen[st.Committed] || st.Committed/each != uint64(st.Role-1) {
			t.Fatalf("ReadMessage() = %+v: duplicate or mixed up", st)
		}
		seen[st.Committed] = true
	}
	wg.Wait()
}

// rawTLS opens a TLS connection to addr with cfg's credentials, bypassing
// Dial's Hello exchange, so a test can send what it likes.
func rawTLS(t *testing.T, addr Addr, cfg *Config) *tls.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", net.JoinHostPort(addr.Host, fmt.Sprint(addr.Port)))
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(nc, cfg.tlsConfig(false, ""))
	t.Cleanup(func() { tc.Close() })
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("TLS handshake = %v", err)
	}
	return tc
}

// refixFrame recomputes both CRCs of a frame after a change.
func refixFrame(f []byte) {
	c := crc32.MakeTable(crc32.Castagnoli)
	binary.LittleEndian.PutUint32(f[12:], crc32.Checksum(f[:12], c))
	n := len(f) - wire.TrailerSize
	binary.LittleEndian.PutUint32(f[n:], crc32.Checksum(f[:n], c))
}

func frame(t *testing.T, m wire.Message) []byte {
	t.Helper()
	f, err := wire.AppendFrame(nil, m)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// readRefusal reads what a refusing server sends: an Error, then the end.
func readRefusal(t *testing.T, tc *tls.Conn) (*wire.Error, error) {
	t.Helper()
	r := wire.NewReader(tc)
	m, err := r.ReadMessage()
	if err != nil {
		return nil, err
	}
	e, ok := m.(*wire.Error)
	if !ok {
		t.Fatalf("refusing server sent %v, want an Error", m.Type())
	}
	if _, err := r.ReadMessage(); err == nil {
		t.Errorf("refusing server sent more after its Error")
	}
	return e, nil
}

// TestRefusedPeers tries peers that must be refused. Each refusal is
// logged, the listener never hands the peer out, and a good peer that
// comes next is accepted as usual.
func TestRefusedPeers(t *testing.T) {
	p := newPKI(t)
	foreign := newPKI(t)
	good := &Config{Credentials: p.node("pri", wire.RolePrimary)}
	hello := wire.Hello{Version: wire.Version, Role: wire.RolePrimary, Name: "pri"}
	tests := []struct {
		name   string
		server *Config // nil: an intermediary accepting any role
		try    func(t *testing.T, addr Addr)
		logs   []string
	}{
		{
			name: "no client certificate",
			try: func(t *testing.T, a Addr) {
				err := rawTLSProbe(a, nil)
				if err == nil || !strings.Contains(err.Error(), "certificate") {
					t.Errorf("TLS client without a certificate: err = %v, want a certificate alert", err)
				}
			},
			logs: []string{"refused peer", "didn't provide a certificate"},
		},
		{
			name: "foreign CA",
			try: func(t *testing.T, a Addr) {
				_, err := Dial(context.Background(), a.String(), &Config{Credentials: foreign.node("pri", wire.RolePrimary), Logger: (&logBuf{}).logger()})
				if err == nil {
					t.Errorf("Dial(with a foreign CA's certificate) = nil error, want refusal")
				}
			},
			logs: []string{"refused peer", "bad certificate"},
		},
		{
			name: "foreign CA, client trusting anything",
			try: func(t *testing.T, a Addr) {
				err := rawTLSProbe(a, []tls.Certificate{foreign.node("pri", wire.RolePrimary).cert})
				if err == nil || !strings.Contains(err.Error(), "certificate") {
					t.Errorf("TLS client with a foreign CA's certificate: err = %v, want a certificate alert", err)
				}
			},
			logs: []string{"refused peer", "certificate signed by unknown authority"},
		},
		{
			name: "expired certificate",
			try: func(t *testing.T, a Addr) {
				old := time.Now().Add(-48 * time.Hour)
				creds := p.creds(NodeSpec{Name: "pri", Role: wire.RolePrimary, NotBefore: old, Validity: 24 * time.Hour}, old.Add(time.Hour))
				_, err := Dial(context.Background(), a.String(), &Config{Credentials: creds})
				if err == nil {
					t.Errorf("Dial(with an expired certificate) = nil error, want refusal")
				}
			},
			logs: []string{"refused peer", "expired"},
		},
		{
			name: "plain TCP garbage",
			try: func(t *testing.T, a Addr) {
				nc, err := net.Dial("tcp", net.JoinHostPort(a.Host, fmt.Sprint(a.Port)))
				if err != nil {
					t.Fatal(err)
				}
				defer nc.Close()
				nc.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
				nc.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadAll(nc); err != nil {
					t.Errorf("server did not close a garbage-talking connection: %v", err)
				}
			},
			logs: []string{"refused peer", "TLS handshake"},
		},
		{
			name: "wrong version in Hello",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				h := hello
				h.Version = 1 // the version before this one
				tc.Write(frame(t, &h))
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeVersion {
					t.Errorf("server answer to Hello{Version: 1} = %+v, %v; want Error{CodeVersion}", e, err)
				}
			},
			logs: []string{"refused peer", "peer speaks protocol version 1"},
		},
		{
			name: "wrong version in frame header",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				f := frame(t, &hello)
				f[4] = 9
				refixFrame(f)
				tc.Write(f)
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeVersion {
					t.Errorf("server answer to a version 9 frame = %+v, %v; want Error{CodeVersion}", e, err)
				}
			},
			logs: []string{"refused peer", "unsupported protocol version 9"},
		},
		{
			name: "corrupt Hello frame",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				f := frame(t, &hello)
				f[HeaderSizeForTest] ^= 0xff
				tc.Write(f)
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeCorrupt {
					t.Errorf("server answer to a corrupt Hello = %+v, %v; want Error{CodeCorrupt}", e, err)
				}
			},
			logs: []string{"refused peer", "checksum mismatch"},
		},
		{
			name: "truncated Hello frame",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				tc.Write(frame(t, &hello)[:10])
				tc.CloseWrite()
				readRefusal(t, tc)
			},
			logs: []string{"refused peer", "unexpected EOF"},
		},
		{
			name: "message before Hello",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				tc.Write(frame(t, &wire.Ack{Epoch: 1}))
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeProtocol {
					t.Errorf("server answer to Ack before Hello = %+v, %v; want Error{CodeProtocol}", e, err)
				}
			},
			logs: []string{"refused peer", "sent Ack, want Hello"},
		},
		{
			name: "Hello names another node",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				h := hello
				h.Name = "mallory"
				tc.Write(frame(t, &h))
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeRefused {
					t.Errorf("server answer to a Hello naming another node = %+v, %v; want Error{CodeRefused}", e, err)
				}
			},
			logs: []string{"refused peer", `names node \"mallory\"`},
		},
		{
			name: "Hello claims a role the certificate does not allow",
			try: func(t *testing.T, a Addr) {
				tc := rawTLS(t, a, good)
				h := hello
				h.Role = wire.RoleBackup
				tc.Write(frame(t, &h))
				if e, err := readRefusal(t, tc); err != nil || e.Code != wire.CodeRefused {
					t.Errorf("server answer = %+v, %v; want Error{CodeRefused}", e, err)
				}
			},
			logs: []string{"refused peer", "announces the backup role but its certificate is for primary"},
		},
		{
			name:   "role not accepted here",
			server: &Config{Credentials: p.node("int", wire.RoleIntermediary), PeerRoles: []wire.Role{wire.RoleBackup}},
			try: func(t *testing.T, a Addr) {
				_, err := Dial(context.Background(), a.String(), good)
				var we *wire.Error
				if !errors.As(err, &we) || we.Code != wire.CodeRefused {
					t.Errorf("Dial(primary to a backups-only listener) = %v, want a wire.Error with CodeRefused", err)
				}
			},
			logs: []string{"refused peer", "this link accepts [backup]"},
		},
		{
			name: "silent peer times out",
			server: &Config{
				Credentials: p.node("int", wire.RoleIntermediary), HandshakeTimeout: time.Second,
			},
			try: func(t *testing.T, a Addr) {
				nc, err := net.Dial("tcp", net.JoinHostPort(a.Host, fmt.Sprint(a.Port)))
				if err != nil {
					t.Fatal(err)
				}
				defer nc.Close()
				nc.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadAll(nc); err != nil {
					t.Errorf("server did not drop a silent peer: %v", err)
				}
			},
			logs: []string{"refused peer", "handshake interrupted"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var lb logBuf
			srv := tc.server
			if srv == nil {
				srv = &Config{Credentials: p.node("int", wire.RoleIntermediary)}
			}
			srv.Logger = lb.logger()
			l := listen(t, srv)
			tc.try(t, l.Addr())
			lb.waitFor(t, tc.logs...)
			expectNoAccept(t, l)
			// A good peer still gets in, and it is the one Accept returns.
			okCfg := &Config{Credentials: p.node("bak", wire.RoleBackup)}
			dial(t, l.Addr().String(), okCfg)
			if c := accept(t, l); c.Peer().Name != "bak" {
				t.Errorf("Accept() after a refusal = %q, want the good peer bak", c.Peer().Name)
			}
		})
	}
}

// HeaderSizeForTest is the offset of a frame's payload.
const HeaderSizeForTest = wire.HeaderSize

// TestClientRefusesServer checks the dialing side's checks: a server with
// a foreign CA's certificate, one that is not the PeerName asked for, or
// one whose role is not accepted.
func TestClientRefusesServer(t *testing.T) {
	p := newPKI(t)
	foreign := newPKI(t)
	tests := []struct {
		name   string
		server *Credentials
		client Config
		want   string
	}{
		{"foreign CA", foreign.node("int", wire.RoleIntermediary), Config{}, "certificate signed by unknown authority"},
		{"wrong name", p.node("int", wire.RoleIntermediary), Config{PeerName: "int2"}, `is for "int", want "int2"`},
		{"wrong role", p.node("int", wire.RoleIntermediary), Config{PeerRoles: []wire.Role{wire.RoleBackup}}, "this link accepts [backup]"},
		{"expired", p.creds(NodeSpec{Name: "int", Role: wire.RoleIntermediary, NotBefore: time.Now().Add(-48 * time.Hour), Validity: 24 * time.Hour}, time.Now().Add(-47*time.Hour)), Config{}, "expired"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var lb, clb logBuf
			l := listen(t, &Config{Credentials: tc.server, Logger: lb.logger()})
			cfg := tc.client
			cfg.Credentials = p.node("pri", wire.RolePrimary)
			cfg.Logger = clb.logger()
			c, err := Dial(context.Background(), l.Addr().String(), &cfg)
			if err == nil {
				c.Close()
				t.Fatalf("Dial() = nil error, want %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Dial() = %v, want %q", err, tc.want)
			}
			clb.waitFor(t, "handshake with peer failed")
			lb.waitFor(t, "refused peer")
			expectNoAccept(t, l)
		})
	}
}

// TestClientRefusesWrongVersion has a server answer with a Hello of another
// protocol version: the client refuses it and tells the server why.
func TestClientRefusesWrongVersion(t *testing.T) {
	p := newPKI(t)
	srvCfg := &Config{Credentials: p.node("int", wire.RoleIntermediary)}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan wire.Message, 1)
	go func() {
		defer close(got)
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(nc, srvCfg.tlsConfig(true, ""))
		defer tc.Close()
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		r, w := wire.NewReader(tc), wire.NewWriter(tc)
		if _, err := r.ReadMessage(); err != nil {
			return
		}
		w.WriteMessage(&wire.Hello{Version: 3, Role: wire.RoleIntermediary, Name: "int"})
		if m, err := r.ReadMessage(); err == nil {
			got <- m
		}
	}()
	var clb logBuf
	_, err = Dial(context.Background(), "tcp://"+ln.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary), Logger: clb.logger()})
	if err == nil || !strings.Contains(err.Error(), "peer speaks protocol version 3, this node speaks 2") {
		t.Errorf("Dial(server speaking version 3) = %v, want a version refusal", err)
	}
	if m := <-got; m == nil || m.(*wire.Error).Code != wire.CodeVersion {
		t.Errorf("server heard %+v, want Error{CodeVersion}", m)
	}
	clb.waitFor(t, "handshake with peer failed", "version 3")
}

// TestCorruptFrameAfterHandshake sends bad frames on an established link:
// the receiver logs an error, tells the peer why and closes the link.
func TestCorruptFrameAfterHandshake(t *testing.T) {
	p := newPKI(t)
	tests := []struct {
		name string
		send func(t *testing.T, tc *tls.Conn)
		want error
		code wire.Code
		log  string
	}{
		{"checksum", func(t *testing.T, tc *tls.Conn) {
			f := frame(t, &wire.Ack{Epoch: 3})
			f[wire.HeaderSize+1] ^= 1
			tc.Write(f)
		}, wire.ErrChecksum, wire.CodeCorrupt, "bad frame from peer"},
		{"garbage", func(t *testing.T, tc *tls.Conn) {
			tc.Write([]byte("this is not a frame at all"))
		}, wire.ErrBadMagic, wire.CodeProtocol, "bad frame from peer"},
		{"malformed body", func(t *testing.T, tc *tls.Conn) {
			f := frame(t, &wire.Ack{Epoch: 3})
			binary.LittleEndian.PutUint64(f[wire.HeaderSize:], 0)
			refixFrame(f)
			tc.Write(f)
		}, wire.ErrMalformed, wire.CodeProtocol, "bad frame from peer"},
		{"oversize", func(t *testing.T, tc *tls.Conn) {
			f := frame(t, &wire.Ack{Epoch: 3})
			binary.LittleEndian.PutUint32(f[8:], wire.MaxPayload+1)
			refixFrame(f)
			tc.Write(f)
		}, wire.ErrTooLarge, wire.CodeProtocol, "bad frame from peer"},
		{"truncated", func(t *testing.T, tc *tls.Conn) {
			tc.Write(frame(t, &wire.Ack{Epoch: 3})[:20])
			tc.CloseWrite()
		}, io.ErrUnexpectedEOF, 0, "link read failed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var lb logBuf
			l := listen(t, &Config{Credentials: p.node("int", wire.RoleIntermediary), Logger: lb.logger()})
			cli := dial(t, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary)})
			srv := accept(t, l)
			raw := cli.(*conn).tc
			tc.send(t, raw)
			srv.SetReadDeadline(time.Now().Add(5 * time.Second))
			m, err := srv.ReadMessage()
			if !errors.Is(err, tc.want) {
				t.Fatalf("ReadMessage() after a %s frame = %v, %v; want %v", tc.name, m, err, tc.want)
			}
			lb.waitFor(t, tc.log, "peer=pri")
			if _, err := srv.ReadMessage(); err == nil {
				t.Errorf("ReadMessage() on a link closed for a bad frame = nil error")
			}
			if err := srv.WriteMessage(&wire.Ack{Epoch: 1}); err == nil {
				t.Errorf("WriteMessage() on a link closed for a bad frame = nil error")
			}
			// The peer hears why (if it can still read), then the end.
			cli.SetReadDeadline(time.Now().Add(5 * time.Second))
			m, err = cli.ReadMessage()
			if tc.code != 0 {
				if e, ok := m.(*wire.Error); !ok || e.Code != tc.code {
					t.Errorf("peer ReadMessage() = %+v, %v; want Error{%v}", m, err, tc.code)
				}
				_, err = cli.ReadMessage()
			}
			if err == nil {
				t.Errorf("peer ReadMessage() after the link was closed = nil error")
			}
		})
	}
}

func TestDeadlines(t *testing.T) {
	p := newPKI(t)
	l := listen(t, &Config{Credentials: p.node("int", wire.RoleIntermediary)})
	cli := dial(t, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary)})
	srv := accept(t, l)

	// A read deadline expires, and the link stays usable.
	start := time.Now()
	srv.SetReadDeadline(start.Add(50 * time.Millisecond))
	if _, err := srv.ReadMessage(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadMessage() past its deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Errorf("ReadMessage() with a 50ms deadline returned after %v", d)
	}
	// Even in the middle of a frame: half now, a timeout, the rest later.
	f := frame(t, &wire.Ack{Epoch: 5})
	raw := cli.(*conn).tc
	raw.Write(f[:10])
	srv.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := srv.ReadMessage(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadMessage() of half a frame = %v, want os.ErrDeadlineExceeded", err)
	}
	raw.Write(f[10:])
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := srv.ReadMessage(); err != nil || !reflect.DeepEqual(m, &wire.Ack{Epoch: 5}) {
		t.Fatalf("ReadMessage() after the timeout = %+v, %v; want Ack{5}", m, err)
	}
	// A write deadline in the past fails the write and closes the link.
	cli.SetWriteDeadline(time.Now().Add(-time.Second))
	if err := cli.WriteMessage(&wire.Ack{Epoch: 2}); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("WriteMessage() past its deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	if _, err := srv.ReadMessage(); err == nil {
		t.Errorf("ReadMessage() from a peer whose write timed out = nil error, want the link closed")
	}
}

func TestListenerLifecycle(t *testing.T) {
	p := newPKI(t)
	l, err := Listen("tcp://127.0.0.1:0", &Config{Credentials: p.node("int", wire.RoleIntermediary)})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := l.Accept(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Accept(canceled ctx) = %v, want context.Canceled", err)
	}
	// A handshake in progress does not hold Close up.
	nc, err := net.Dial("tcp", strings.TrimPrefix(l.Addr().String(), "tcp://"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	done := make(chan error)
	go func() { _, err := l.Accept(context.Background()); done <- err }()
	start := time.Now()
	if err := l.Close(); err != nil {
		t.Errorf("Close() = %v", err)
	}
	// The handshake would end only at its timeout: Close did not wait for it.
	if d := time.Since(start); d >= DefaultHandshakeTimeout {
		t.Errorf("Close() with a handshake in progress took %v, the handshake's whole timeout", d)
	}
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept() during Close = %v, want net.ErrClosed", err)
	}
	if _, err := l.Accept(context.Background()); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept() after Close = %v, want net.ErrClosed", err)
	}
	if _, err := Dial(context.Background(), l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary)}); err == nil {
		t.Errorf("Dial() to a closed listener = nil error")
	}
}

func TestDialCancel(t *testing.T) {
	p := newPKI(t)
	// A listener that accepts TCP but never speaks TLS.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Dial(ctx, "tcp://"+ln.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary), Logger: (&logBuf{}).logger()})
	// The context ended the dial, not the handshake's own timeout.
	if d := time.Since(start); err == nil || d >= DefaultHandshakeTimeout {
		t.Errorf("Dial(silent server, 100ms ctx) = %v after %v, want an error before the handshake timeout (%v)", err, d, DefaultHandshakeTimeout)
	}
}

func TestConfigErrors(t *testing.T) {
	p := newPKI(t)
	anyRole := p.node("any", 0)
	pri := p.node("pri", wire.RolePrimary)
	tests := []struct {
		addr string
		cfg  *Config
		want string
	}{
		{"tcp://127.0.0.1:1", nil, "no credentials"},
		{"tcp://127.0.0.1:1", &Config{}, "no credentials"},
		{"tcp://127.0.0.1:1", &Config{Credentials: anyRole}, "allows any role"},
		{"tcp://127.0.0.1:1", &Config{Credentials: pri, Hello: wire.Hello{Role: wire.RoleBackup}}, "is for the primary role"},
		{"tcp://127.0.0.1:1", &Config{Credentials: pri, Hello: wire.Hello{MemSize: 5}}, "multiple of 4096"},
		{"udp://127.0.0.1:1", &Config{Credentials: pri}, "unknown network"},
		{"tcp://:7000", &Config{Credentials: pri}, "no host to dial"},
		{"tcp://127.0.0.1:0", &Config{Credentials: pri}, "cannot dial port 0"},
		{"vsock://4294967295:5", &Config{Credentials: pri}, "any-CID"},
	}
	for _, tc := range tests {
		_, err := Dial(context.Background(), tc.addr, tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Dial(%s, %+v) = %v, want %q", tc.addr, tc.cfg, err, tc.want)
		}
	}
	if _, err := Listen("tcp://127.0.0.1:0", &Config{Credentials: anyRole}); err == nil {
		t.Errorf("Listen(any-role certificate, no Hello role) = nil error")
	}
	if _, err := Listen("tcp://nope:0:0", &Config{Credentials: pri}); err == nil {
		t.Errorf("Listen(bad address) = nil error")
	}
	// An any-role certificate works once the Hello says which role.
	l := listen(t, &Config{Credentials: anyRole, Hello: wire.Hello{Role: wire.RoleBackup}})
	dial(t, l.Addr().String(), &Config{Credentials: pri, PeerRoles: []wire.Role{wire.RoleBackup}})
	if c := accept(t, l); c.Peer().Role != wire.RolePrimary {
		t.Errorf("Peer().Role = %v, want primary", c.Peer().Role)
	}
}

// rawTLSProbe connects to a with a plain TLS 1.3 client that trusts any
// server and presents certs, and returns the error of the handshake or of
// the first read (where a refused client certificate shows up).
func rawTLSProbe(a Addr, certs []tls.Certificate) error {
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: certs}
	tc, err := tls.Dial("tcp", net.JoinHostPort(a.Host, fmt.Sprint(a.Port)), cfg)
	if err != nil {
		return err
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	_, err = tc.Read(make([]byte, 1))
	return err
}
