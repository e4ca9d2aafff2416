package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// DefaultHandshakeTimeout bounds the TLS handshake and Hello exchange when
// Config.HandshakeTimeout is 0.
const DefaultHandshakeTimeout = 10 * time.Second

// Bounds on unauthenticated connections (see admission.go): at most
// maxPending in the handshake at once, at most maxPerSource of them from one
// source address.
const (
	maxPending   = 128
	maxPerSource = 8
)

// errorWriteTimeout bounds sending an Error to a peer that is being dropped.
const errorWriteTimeout = time.Second

// Config configures one end of a link.
type Config struct {
	// Credentials are this node's key, certificate and cluster CA. Required.
	Credentials *Credentials
	// Hello is what this node announces. Version and Name are filled in from
	// wire.Version and the credentials; Role defaults to the certificate's
	// role and must match it if the certificate names one.
	Hello wire.Hello
	// PeerName, if set, is the only peer accepted: its certificate's common
	// name must equal it.
	PeerName string
	// PeerRoles, if set, are the roles accepted from peers.
	PeerRoles []wire.Role
	// HandshakeTimeout bounds the TLS handshake and the Hello exchange
	// (DefaultHandshakeTimeout if 0).
	HandshakeTimeout time.Duration
	// Logger receives refusals and link errors (slog.Default() if nil).
	Logger *slog.Logger
	// Heartbeat, if positive, makes the link send a Heartbeat whenever it
	// has written nothing for this long, so that an idle link still shows
	// the peer this node is alive.
	Heartbeat time.Duration
	// PeerTimeout, if positive, is how long ReadMessage waits for any
	// message (heartbeats included) before it declares the peer lost
	// (ErrPeerSilent) and closes the link. It catches a peer whose host
	// died or whose link was cut without a reset, which no read ever
	// reports otherwise. Set it to several Heartbeat intervals of the peer.
	PeerTimeout time.Duration
}

// Liveness defaults for the fault-tolerance roles: a heartbeat every 100 ms,
// and a peer is lost after two seconds of silence.
const (
	DefaultHeartbeat   = 100 * time.Millisecond
	DefaultPeerTimeout = 2 * time.Second
)

// ErrPeerSilent is returned by ReadMessage when a link with a PeerTimeout
// carried nothing for that long.
var ErrPeerSilent = errors.New("peer silent")

func (c *Config) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

func (c *Config) handshakeTimeout() time.Duration {
	if c.HandshakeTimeout > 0 {
		return c.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// hello returns the Hello this node sends.
func (c *Config) hello() (wire.Hello, error) {
	if c == nil || c.Credentials == nil {
		return wire.Hello{}, errors.New("transport: no credentials")
	}
	h := c.Hello
	h.Version = wire.Version
	h.Name = c.Credentials.Name()
	cr := c.Credentials.Role()
	switch {
	case h.Role == 0 && cr == 0:
		return wire.Hello{}, fmt.Errorf("transport: certificate %q allows any role, so Config.Hello.Role must say which", h.Name)
	case h.Role == 0:
		h.Role = cr
	case cr != 0 && h.Role != cr:
		return wire.Hello{}, fmt.Errorf("transport: Config.Hello.Role is %v but certificate %q is for the %v role", h.Role, h.Name, cr)
	}
	if _, err := h.MarshalBinary(); err != nil {
		return wire.Hello{}, fmt.Errorf("transport: Config.Hello: %w", err)
	}
	return h, nil
}

// tlsConfig returns the TLS configuration of a server or client end. Both
// require TLS 1.3 and a peer certificate that chains to the cluster CA.
func (c *Config) tlsConfig(server bool, serverName string) *tls.Config {
	creds := c.Credentials
	usage := x509.ExtKeyUsageServerAuth
	if server {
		usage = x509.ExtKeyUsageClientAuth
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{creds.cert},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return c.verifyPeerCert(cs, usage)
		},
	}
	if server {
		tc.ClientAuth = tls.RequireAndVerifyClientCert
		tc.ClientCAs = creds.roots
		tc.SessionTicketsDisabled = true
	} else {
		// Peers are identified by their certificate's common name and
		// role, not by the host name they were dialed at (a vsock address
		// has none), so the standard host-name check is replaced:
		// VerifyConnection verifies the chain to the cluster CA itself.
		tc.InsecureSkipVerify = true
		tc.ServerName = serverName
	}
	return tc
}

// verifyPeerCert checks the peer's certificate: signed by the cluster CA
// for usage, valid now, a well-formed name and role, and PeerName if set.
func (c *Config) verifyPeerCert(cs tls.ConnectionState, usage x509.ExtKeyUsage) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("peer sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	if err := verifyLeaf(leaf, c.Credentials.roots, usage, time.Now()); err != nil {
		return fmt.Errorf("peer certificate %q: %w", leaf.Subject.CommonName, err)
	}
	if err := wire.CheckName(leaf.Subject.CommonName); err != nil {
		return fmt.Errorf("peer certificate: %w", err)
	}
	if _, err := certRole(leaf); err != nil {
		return fmt.Errorf("peer certificate: %w", err)
	}
	if c.PeerName != "" && leaf.Subject.CommonName != c.PeerName {
		return fmt.Errorf("peer certificate is for %q, want %q", leaf.Subject.CommonName, c.PeerName)
	}
	return nil
}

// checkHello checks the peer's Hello against its verified certificate and
// the accepted roles; the code says what to tell the peer.
func (c *Config) checkHello(h *wire.Hello, cert *x509.Certificate) (wire.Code, error) {
	certName := cert.Subject.CommonName
	certRole, _ := certRole(cert) // verified in the TLS handshake
	switch {
	case h.Version != wire.Version:
		return wire.CodeVersion, fmt.Errorf("peer speaks protocol version %d, this node speaks %d", h.Version, wire.Version)
	case h.Name != certName:
		return wire.CodeRefused, fmt.Errorf("peer Hello names node %q but its certificate is for %q", h.Name, certName)
	case certRole != 0 && h.Role != certRole:
		return wire.CodeRefused, fmt.Errorf("peer %q announces the %v role but its certificate is for %v", certName, h.Role, certRole)
	case len(c.PeerRoles) > 0 && !slices.Contains(c.PeerRoles, h.Role):
		return wire.CodeRefused, fmt.Errorf("peer %q is a %v; this link accepts %v", certName, h.Role, c.PeerRoles)
	}
	return 0, nil
}

// Peer is the verified identity of the node at the other end of a Conn.
type Peer struct {
	Name  string     // the certificate's common name
	Role  wire.Role  // the role it announced (and its certificate allows)
	Hello wire.Hello // everything it announced
}

// Conn is an authenticated link to one peer that carries wire messages.
//
// One goroutine may read while others write; WriteMessage is safe for
// concurrent use. Without a PeerTimeout a read deadline that expires leaves
// the link usable, so reading can go on after it is extended; with one, the
// link manages the read deadline itself and a silent peer ends the link.
// With a Heartbeat, heartbeats are sent when the link is idle; ReadMessage
// never returns the peer's heartbeats. Anything else that goes wrong
// (a corrupt, truncated or malformed frame, a failed or timed-out write)
// is logged and closes the link, and the error is returned.
type Conn interface {
	// ReadMessage returns the next message. At a clean end of the stream it
	// returns io.EOF.
	ReadMessage() (wire.Message, error)
	// WriteMessage sends m as one frame. A message that breaks the layout
	// rules fails with wire.ErrMalformed (or wire.ErrTooLarge) and sends
	// nothing; the link stays up.
	WriteMessage(m wire.Message) error
	// Peer returns the verified identity of the peer.
	Peer() Peer
	SetDeadline(t time.Time) error
	SetReadDeadline(t time.Time) error
	SetWriteDeadline(t time.Time) error
	LocalAddr() net.Addr
	RemoteAddr() net.Addr
	// CloseWithError sends the peer an Error (best effort, within a
	// second), then closes the link.
	CloseWithError(code wire.Code, reason string) error
	Close() error
}

// conn is the Conn over a TLS connection.
type conn struct {
	tc   *tls.Conn
	peer Peer
	log  *slog.Logger
	r    *wire.Reader // used by the one reader

	wmu sync.Mutex // guards w and writes to tc
	w   *wire.Writer

	closeOnce sync.Once
	closeErr  error

	peerTimeout time.Duration
	lastWrite   atomic.Int64 // Unix nanoseconds of the last write
	lastRead    atomic.Int64 // Unix nanoseconds of the last message read
	closed      chan struct{}
}

func newConn(tc *tls.Conn, log *slog.Logger) *conn {
	return &conn{tc: tc, log: log, r: wire.NewReader(tc), w: wire.NewWriter(tc), closed: make(chan struct{})}
}

// startLiveness arms the peer timeout and starts the heartbeat sender.
func (c *conn) startLiveness(cfg *Config) {
	now := time.Now().UnixNano()
	c.lastWrite.Store(now)
	c.lastRead.Store(now)
	c.peerTimeout = cfg.PeerTimeout
	if cfg.Heartbeat > 0 {
		go c.heartbeats(cfg.Heartbeat)
	}
}

// heartbeats sends a Heartbeat whenever nothing was written for interval,
// until the link closes.
func (c *conn) heartbeats(interval time.Duration) {
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	var seq uint64
	for {
		select {
		case <-c.closed:
			return
		case now := <-t.C:
			if now.Sub(time.Unix(0, c.lastWrite.Load())) < interval {
				continue
			}
			if !c.wmu.TryLock() {
				continue // a write is in progress: the link is not idle
			}
			seq++
			err := c.writeLocked(&wire.Heartbeat{Seq: seq, Sent: now.UnixNano()})
			c.wmu.Unlock()
			if err != nil {
				return
			}
		}
	}
}

// Idle returns how long ago the last message arrived from the peer.
func (c *conn) Idle() time.Duration { return time.Since(time.Unix(0, c.lastRead.Load())) }

func (c *conn) Peer() Peer                         { return c.peer }
func (c *conn) LocalAddr() net.Addr                { return c.tc.LocalAddr() }
func (c *conn) RemoteAddr() net.Addr               { return c.tc.RemoteAddr() }
func (c *conn) SetDeadline(t time.Time) error      { return c.tc.SetDeadline(t) }
func (c *conn) SetReadDeadline(t time.Time) error  { return c.tc.SetReadDeadline(t) }
func (c *conn) SetWriteDeadline(t time.Time) error { return c.tc.SetWriteDeadline(t) }

// SetPagePlace makes ReadMessage read the page data of page batches into
// the memory place gives (see wire.Reader.SetPagePlace); nil ends it. Call
// it from the goroutine that reads.
func (c *conn) SetPagePlace(place func(pages int) []byte) { c.r.SetPagePlace(place) }

func (c *conn) ReadMessage() (wire.Message, error) {
	for {
		if c.peerTimeout > 0 {
			c.tc.SetReadDeadline(time.Now().Add(c.peerTimeout))
		}
		m, err := c.r.ReadMessage()
		if err != nil {
			return nil, c.readFailed(err)
		}
		c.lastRead.Store(time.Now().UnixNano())
		if _, ok := m.(*wire.Heartbeat); ok {
			continue
		}
		return m, nil
	}
}

// readFailed handles a failed read: it closes the link unless a read
// deadline of the caller's expired, and returns the error to report.
func (c *conn) readFailed(err error) error {
	switch {
	case isTimeout(err) && c.peerTimeout > 0:
		silent := time.Since(time.Unix(0, c.lastRead.Load())).Round(time.Millisecond)
		c.log.Warn("transport: peer silent; closing the link", "silent", silent)
		c.Close()
		return fmt.Errorf("transport: %w: nothing from %q for %v", ErrPeerSilent, c.peer.Name, silent)
	case isTimeout(err):
		return err
	case err == io.EOF:
		c.Close()
		return io.EOF
	case errors.Is(err, net.ErrClosed):
		return err
	}
	if code, ok := wireErrorCode(err); ok {
		c.log.Error("transport: bad frame from peer; closing the link", "err", err)
		c.CloseWithError(code, err.Error())
	} else {
		c.log.Warn("transport: link read failed; closing it", "err", err)
		c.Close()
	}
	return fmt.Errorf("transport: read from %q: %w", c.peer.Name, err)
}

// wireErrorCode says which Error code answers a wire error, if it is one.
func wireErrorCode(err error) (wire.Code, bool) {
	switch {
	case errors.Is(err, wire.ErrVersion):
		return wire.CodeVersion, true
	case errors.Is(err, wire.ErrChecksum):
		return wire.CodeCorrupt, true
	case errors.Is(err, wire.ErrBadMagic), errors.Is(err, wire.ErrUnknownType),
		errors.Is(err, wire.ErrTooLarge), errors.Is(err, wire.ErrMalformed):
		return wire.CodeProtocol, true
	}
	return 0, false
}

func isTimeout(err error) bool {
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}

func (c *conn) WriteMessage(m wire.Message) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(m)
}

// writeLocked writes m; c.wmu is held.
func (c *conn) writeLocked(m wire.Message) error {
	c.lastWrite.Store(time.Now().UnixNano())
	if err := c.w.WriteMessage(m); err != nil {
		if errors.Is(err, wire.ErrMalformed) || errors.Is(err, wire.ErrTooLarge) {
			return err // nothing was sent
		}
		if !errors.Is(err, net.ErrClosed) {
			c.log.Warn("transport: link write failed; closing it", "type", m.Type(), "err", err)
		}
		c.Close()
		return fmt.Errorf("transport: write to %q: %w", c.peer.Name, err)
	}
	return nil
}

func (c *conn) CloseWithError(code wire.Code, reason string) error {
	sendError(c.tc, &c.wmu, c.w, code, reason)
	return c.Close()
}

// sendError sends an Error on a link that is about to close, unless another
// write is in progress.
func sendError(nc net.Conn, mu *sync.Mutex, w *wire.Writer, code wire.Code, reason string) {
	if !mu.TryLock() {
		return
	}
	defer mu.Unlock()
	nc.SetWriteDeadline(time.Now().Add(errorWriteTimeout))
	w.WriteMessage(&wire.Error{Code: code, Reason: clipReason(reason)})
}

// clipReason makes s a valid Error reason: UTF-8, at most MaxReasonLen bytes.
func clipReason(s string) string {
	s = strings.ToValidUTF8(s, "?")
	if len(s) <= wire.MaxReasonLen {
		return s
	}
	s = s[:wire.MaxReasonLen]
	for !utf8.ValidString(s) {
		s = s[:len(s)-1]
	}
	return s
}

func (c *conn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.closeErr = c.tc.Close()
	})
	return c.closeErr
}

// Listener accepts authenticated links.
type Listener interface {
	// Accept returns the next peer that completed the handshake. Peers that
	// fail it are logged and dropped; Accept never sees them.
	Accept(ctx context.Context) (Conn, error)
	// Addr is the address listened on, with the port filled in.
	Addr() Addr
	// Close stops listening, drops links not yet accepted and waits for
	// handshakes in progress to end. Accepted links stay open.
	Close() error
}

type listener struct {
	ln    net.Listener
	addr  Addr
	cfg   *Config
	hello wire.Hello
	tls   *tls.Config
	log   *slog.Logger

	ctx    context.Context // canceled by Close
	cancel context.CancelFunc
	ready  chan *conn
	adm    admission // connections in the handshake
	wg     sync.WaitGroup
}

// Listen listens on addr ("tcp://HOST:PORT" or "vsock://CID:PORT") for
// peers with credentials of the same cluster.
func Listen(addr string, cfg *Config) (Listener, error) {
	a, err := ParseAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("transport: listen: %w", err)
	}
	hello, err := cfg.hello()
	if err != nil {
		return nil, err
	}
	ln, bound, err := listenRaw(a)
	if err != nil {
		return nil, fmt.Errorf("transport: listen on %v: %w", a, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &listener{
		ln: ln, addr: bound, cfg: cfg, hello: hello, tls: cfg.tlsConfig(true, ""),
		log: cfg.logger().With("listen", bound.String()),
		ctx: ctx, cancel: cancel, ready: make(chan *conn), adm: newAdmission(maxPending, maxPerSource),
	}
	l.wg.Add(1)
	go l.acceptLoop()
	return l, nil
}

func listenRaw(a Addr) (net.Listener, Addr, error) {
	switch a.Network {
	case NetworkTCP:
		ln, err := net.Listen("tcp", net.JoinHostPort(a.Host, strconv.FormatUint(uint64(a.Port), 10)))
		if err != nil {
			return nil, Addr{}, err
		}
		if ta, ok := ln.Addr().(*net.TCPAddr); ok {
			a.Port = uint32(ta.Port)
		}
		return ln, a, nil
	case NetworkVsock:
		return listenVsock(a)
	}
	return nil, Addr{}, fmt.Errorf("unknown network %q", a.Network)
}

func (l *listener) Addr() Addr { return l.addr }

func (l *listener) Accept(ctx context.Context) (Conn, error) {
	if l.ctx.Err() != nil {
		return nil, fmt.Errorf("transport: accept on %v: %w", l.addr, net.ErrClosed)
	}
	select {
	case c := <-l.ready:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-l.ctx.Done():
		return nil, fmt.Errorf("transport: accept on %v: %w", l.addr, net.ErrClosed)
	}
}

func (l *listener) Close() error {
	l.cancel()
	err := l.ln.Close()
	l.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (l *listener) acceptLoop() {
	defer l.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		nc, err := l.ln.Accept()
		if err != nil {
			if l.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			l.log.Warn("transport: accept failed", "err", err)
			select {
			case <-time.After(backoff):
				backoff = min(2*backoff, time.Second)
			case <-l.ctx.Done():
				return
			}
			continue
		}
		backoff = 5 * time.Millisecond
		p, evicted, ok := l.adm.admit(nc)
		for _, e := range evicted {
			l.log.Debug("transport: too many unauthenticated peers; dropped the oldest connection of the busiest source",
				"remote", e.nc.RemoteAddr().String())
		}
		if !ok {
			l.log.Warn("transport: too many unauthenticated peers waiting; dropping a connection", "remote", nc.RemoteAddr().String())
			nc.Close()
			continue
		}
		l.wg.Add(1)
		go l.serve(p)
	}
}

// serve runs the server side of the handshake on p's connection and hands
// the link to Accept, or logs the refusal and drops it.
func (l *listener) serve(p *pending) {
	defer l.wg.Done()
	nc := p.nc
	log := l.log.With("remote", nc.RemoteAddr().String())
	c, err := handshake(l.ctx, nc, l.tls, l.cfg, l.hello, true, log)
	// Authenticated or not, it no longer waits in the handshake; a source
	// that authenticated is one this node expects again.
	evicted := l.adm.done(p, err == nil)
	if err != nil {
		switch {
		case l.ctx.Err() != nil:
			log.Debug("transport: handshake abandoned: listener closed", "err", err)
		case evicted:
			log.Debug("transport: handshake abandoned: dropped for room", "err", err)
		default:
			log.Warn("transport: refused peer", "err", err)
		}
		nc.Close()
		return
	}
	select {
	case l.ready <- c:
		log.Info("transport: peer connected", "peer", c.peer.Name, "role", c.peer.Role.String())
	case <-l.ctx.Done():
		c.Close()
	}
}

// Dial connects to addr and runs the handshake: TLS 1.3 with certificates
// checked both ways, then Hello each way. A refusal is logged and returned;
// if the peer said why, the error wraps its *wire.Error.
func Dial(ctx context.Context, addr string, cfg *Config) (Conn, error) {
	a, err := ParseAddr(addr)
	if err == nil {
		err = a.checkDial()
	}
	if err != nil {
		return nil, fmt.Errorf("transport: dial: %w", err)
	}
	hello, err := cfg.hello()
	if err != nil {
		return nil, err
	}
	nc, err := dialRaw(ctx, a)
	if err != nil {
		return nil, fmt.Errorf("transport: dial %v: %w", a, err)
	}
	serverName := a.Host
	if cfg.PeerName != "" {
		serverName = cfg.PeerName
	}
	log := cfg.logger().With("remote", a.String())
	c, err := handshake(ctx, nc, cfg.tlsConfig(false, serverName), cfg, hello, false, log)
	if err != nil {
		nc.Close()
		log.Warn("transport: handshake with peer failed", "err", err)
		return nil, fmt.Errorf("transport: dial %v: %w", a, err)
	}
	return c, nil
}

func dialRaw(ctx context.Context, a Addr) (net.Conn, error) {
	switch a.Network {
	case NetworkTCP:
		var d net.Dialer
		return d.DialContext(ctx, "tcp", net.JoinHostPort(a.Host, strconv.FormatUint(uint64(a.Port), 10)))
	case NetworkVsock:
		return dialVsock(ctx, a)
	}
	return nil, fmt.Errorf("unknown network %q", a.Network)
}

// handshake runs TLS and the Hello exchange on nc within the handshake
// timeout. The client sends its Hello first; the server answers with its
// own Hello, or with an Error saying why it refuses.
func handshake(ctx context.Context, nc net.Conn, tcfg *tls.Config, cfg *Config, hello wire.Hello, server bool, log *slog.Logger) (*conn, error) {
	ctx, cancel := context.WithTimeout(ctx, cfg.handshakeTimeout())
	defer cancel()
	// Cancellation unblocks whatever I/O is in progress.
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	var tc *tls.Conn
	if server {
		tc = tls.Server(nc, tcfg)
	} else {
		tc = tls.Client(nc, tcfg)
	}
	c := newConn(tc, log)
	err := tc.HandshakeContext(ctx)
	if err != nil {
		err = fmt.Errorf("TLS handshake: %w", err)
	} else {
		err = c.exchangeHello(cfg, hello, server)
	}
	if !stop() {
		return nil, fmt.Errorf("handshake interrupted (timeout %v): %w (%v)", cfg.handshakeTimeout(), context.Cause(ctx), err)
	}
	if err != nil {
		return nil, err
	}
	if err := nc.SetDeadline(time.Time{}); err != nil {
		return nil, err
	}
	c.log = log.With("peer", c.peer.Name, "role", c.peer.Role.String())
	c.startLiveness(cfg)
	return c, nil
}

// exchangeHello runs the Hello exchange after the TLS handshake: the
// client sends Hello, the server checks it and answers Hello (or Error),
// the client checks that and answers Ready (or Error). So Dial returns only
// links the server has accepted, and Accept only links the client has.
func (c *conn) exchangeHello(cfg *Config, hello wire.Hello, server bool) error {
	cert := c.tc.ConnectionState().PeerCertificates[0]
	name := cert.Subject.CommonName
	refuse := func(code wire.Code, err error) error {
		sendError(c.tc, &c.wmu, c.w, code, err.Error())
		return err
	}
	// read reads the next message the exchange expects.
	read := func(want wire.Type) (wire.Message, error) {
		m, err := c.r.ReadMessage()
		if err != nil {
			if code, ok := wireErrorCode(err); ok {
				return nil, refuse(code, fmt.Errorf("read %v: %w", want, err))
			}
			return nil, fmt.Errorf("read %v: %w", want, err)
		}
		if e, ok := m.(*wire.Error); ok {
			return nil, fmt.Errorf("peer %q refused: %w", name, e)
		}
		if m.Type() != want {
			return nil, refuse(wire.CodeProtocol, fmt.Errorf("peer %q sent %v, want %v", name, m.Type(), want))
		}
		return m, nil
	}
	if !server {
		if err := c.w.WriteMessage(&hello); err != nil {
			return fmt.Errorf("send Hello: %w", err)
		}
	}
	m, err := read(wire.TypeHello)
	if err != nil {
		return err
	}
	h := m.(*wire.Hello)
	if code, err := cfg.checkHello(h, cert); err != nil {
		return refuse(code, err)
	}
	if server {
		if err := c.w.WriteMessage(&hello); err != nil {
			return fmt.Errorf("send Hello: %w", err)
		}
		if _, err := read(wire.TypeReady); err != nil {
			return err
		}
	} else if err := c.w.WriteMessage(&wire.Ready{}); err != nil {
		return fmt.Errorf("send Ready: %w", err)
	}
	c.peer = Peer{Name: h.Name, Role: h.Role, Hello: *h}
	return nil
}
