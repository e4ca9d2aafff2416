package ft

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// What the role runners (RunPrimary, RunIntermediary, RunBackup) share: the
// roles, the links' configuration, the one accept loop of a listening role,
// metrics and status lines.

// Role is a node's part in protecting a guest.
type Role uint8

// The roles. A node certificate may restrict its holder to one of them.
const (
	RolePrimary      = Role(wire.RolePrimary)
	RoleIntermediary = Role(wire.RoleIntermediary)
	RoleBackup       = Role(wire.RoleBackup)
)

// ParseRole parses "primary", "intermediary" or "backup".
func ParseRole(s string) (Role, error) {
	r, err := wire.ParseRole(s)
	return Role(r), err
}

// String returns the role's name, as ParseRole reads it.
func (r Role) String() string { return wire.Role(r).String() }

// Wire returns r as the wire format and ft/transport (a certificate's
// NodeSpec) name it.
func (r Role) Wire() wire.Role { return wire.Role(r) }

// discardLog is the logger of a role given none.
var discardLog = slog.New(slog.DiscardHandler)

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return discardLog
	}
	return l
}

// LinkConfig is what a role's authenticated links share.
type LinkConfig struct {
	// Credentials are this node's key and certificate and the cluster CA
	// (transport.LoadCredentials). Required.
	Credentials *transport.Credentials
	// Heartbeat and PeerTimeout are the links' liveness settings (see
	// transport.Config; 0 turns them off).
	Heartbeat, PeerTimeout time.Duration
	// Log receives link events (refused peers, link errors) and the role's
	// own detail (refused checkpoints, policies); nil: discarded.
	Log *slog.Logger
}

// transport returns the transport configuration of a node of role with
// guest memory memSize that accepts peers of the roles peers.
func (l LinkConfig) transport(role wire.Role, memSize uint64, peers ...wire.Role) *transport.Config {
	return &transport.Config{Credentials: l.Credentials, Hello: wire.Hello{Role: role, MemSize: memSize}, PeerRoles: peers,
		Heartbeat: l.Heartbeat, PeerTimeout: l.PeerTimeout, Logger: orDiscard(l.Log)}
}

func (l LinkConfig) check() error {
	if l.Credentials == nil {
		return fmt.Errorf("no credentials for the links")
	}
	return nil
}

// dialer returns a Dialer for addr with cfg, each attempt bounded.
func dialer(addr string, cfg *transport.Config) Dialer {
	return func(ctx context.Context) (MessageConn, error) {
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return transport.Dial(dctx, addr, cfg)
	}
}

// firstThen returns a Dialer that hands out first, then dials.
func firstThen(first MessageConn, dial Dialer) Dialer {
	return func(ctx context.Context) (MessageConn, error) {
		if c := first; c != nil {
			first = nil
			return c, nil
		}
		return dial(ctx)
	}
}

// ServeMetrics serves collect's metrics over HTTP at addr ("": none), for
// a role or for what runs beside a guest (the large-page controller). The
// returned function stops the server.
func ServeMetrics(addr string, collect func() []Metric, log *slog.Logger) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics at %s: %w", addr, err)
	}
	srv := &http.Server{Handler: MetricsHandler(collect), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	log.Info(fmt.Sprintf("metrics at http://%s/metrics", ln.Addr()))
	return func() { srv.Close() }, nil
}

// logStatus logs line() every d until the returned function is called
// (never if d is not positive).
func logStatus(d time.Duration, log *slog.Logger, line func() string) func() {
	return Every(d, func() { log.Info(line()) })
}

// Every calls fn every d, from a goroutine of its own, until the returned
// function is called (never if d is not positive); that function waits for
// a call in progress and may be called more than once.
func Every(d time.Duration, fn func()) func() {
	if d <= 0 {
		return func() {}
	}
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fn()
			}
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done); <-finished }) }
}

// gate is a listening role's one accept loop. A peer arriving while the
// role waits for one (next) is handed to it. A peer the role will want
// (keep) arriving while it does not wait yet is held, one at a time, for
// its next call of next: a primary that reconnects at once after a refusal
// may be quicker than the role that refused it. Any other peer is refused
// with the reason refuse gives, and the refusal is logged: a role never
// keeps a link it does not serve.
type gate struct {
	ln      transport.Listener
	log     *slog.Logger
	refuse  func(transport.Peer) (wire.Code, string)
	keep    func(transport.Peer) bool // nil: hold no peer
	conns   chan transport.Conn
	held    chan transport.Conn // at most one peer kept for next
	done    chan struct{}       // closed when the loop has ended
	err     error               // why it ended (read after done)
	stop    context.CancelFunc
	stopped sync.Once
}

// newGate starts accepting on ln until ctx ends or Close is called.
func newGate(ctx context.Context, ln transport.Listener, log *slog.Logger, refuse func(transport.Peer) (wire.Code, string), keep func(transport.Peer) bool) *gate {
	ctx, stop := context.WithCancel(ctx)
	g := &gate{ln: ln, log: log, refuse: refuse, keep: keep, conns: make(chan transport.Conn), held: make(chan transport.Conn, 1), done: make(chan struct{}), stop: stop}
	go g.loop(ctx)
	return g
}

func (g *gate) loop(ctx context.Context) {
	defer close(g.done)
	for {
		c, err := g.ln.Accept(ctx)
		if err != nil {
			g.err = err
			return
		}
		select {
		case g.conns <- c: // someone waits for a peer
			continue
		default:
		}
		if g.keep != nil && g.keep(c.Peer()) {
			select {
			case g.held <- c:
				g.log.Info(fmt.Sprintf("%v %q connected again; held until it can be served", c.Peer().Role, c.Peer().Name))
				continue
			default:
			}
		}
		g.turnAway(c)
	}
}

// turnAway refuses c with refuse's reason and logs it.
func (g *gate) turnAway(c transport.Conn) {
	p := c.Peer()
	code, reason := g.refuse(p)
	g.log.Warn(fmt.Sprintf("refused %v %q: %s", p.Role, p.Name, reason))
	go c.CloseWithError(code, reason)
}

// next waits for the next peer: the one held, if any, first.
func (g *gate) next(ctx context.Context) (transport.Conn, error) {
	select {
	case c := <-g.held:
		return c, nil
	default:
	}
	select {
	case c := <-g.held:
		return c, nil
	case c := <-g.conns:
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-g.done:
		return nil, g.err
	}
}

// Close stops accepting, waits for the loop to end and refuses a peer
// still held.
func (g *gate) Close() {
	g.stopped.Do(func() {
		g.stop()
		<-g.done
		select {
		case c := <-g.held:
			g.turnAway(c)
		default:
		}
	})
}

// closeConn closes a MessageConn that can be closed.
func closeConn(c MessageConn) {
	if cl, ok := c.(io.Closer); ok {
		cl.Close()
	}
}
