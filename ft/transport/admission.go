package transport

import (
	"net"
	"sync"
)

// admission bounds the connections a Listener holds in the handshake, that
// is, peers not yet authenticated, so that strangers cannot lock out the
// peers the node expects:
//
//   - at most perSource of them come from one source address; a source's
//     newest connection makes room by dropping its own oldest one, so a
//     source can only crowd out itself;
//   - at most max in all; past that a new connection makes room by dropping
//     the oldest connection of the source that holds the most, among sources
//     that never authenticated here. Sources from which a peer has
//     authenticated before (the peers this node expects, such as a primary
//     that reconnects) are never dropped to make room for others, and a
//     connection from such a source always gets in.
//
// A valid peer's handshake takes milliseconds, so with these rules a
// stranger that cannot authenticate, however many connections it opens from
// however many addresses, cannot keep an expected peer from connecting.
type admission struct {
	max, perSource int

	mu      sync.Mutex
	pending []*pending      // oldest first
	bySrc   map[string]int  // connections pending per source
	known   map[string]bool // sources that authenticated here (bounded)
}

// maxKnown bounds the remembered sources that authenticated.
const maxKnown = 256

// pending is one connection in the handshake.
type pending struct {
	nc      net.Conn
	src     string
	evicted bool // dropped to make room
}

func newAdmission(max, perSource int) admission {
	return admission{max: max, perSource: perSource, bySrc: map[string]int{}, known: map[string]bool{}}
}

// source returns a connection's source address without its port.
func source(nc net.Conn) string {
	a := nc.RemoteAddr()
	if a == nil {
		return ""
	}
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
}

// admit takes nc into the handshake, dropping (closing) what must make room
// for it, which it returns. It refuses nc (ok false) only when every
// connection pending comes from expected sources and nc does not.
func (a *admission) admit(nc net.Conn) (p *pending, evicted []*pending, ok bool) {
	p = &pending{nc: nc, src: source(nc)}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.bySrc[p.src] >= a.perSource {
		evicted = append(evicted, a.evictLocked(func(q *pending) bool { return q.src == p.src }))
	} else if len(a.pending) >= a.max {
		v := a.busiestStrangerLocked()
		if v == nil && a.known[p.src] {
			v = a.pending[0] // all are expected: the oldest goes
		}
		if v == nil {
			return nil, nil, false
		}
		evicted = append(evicted, a.evictLocked(func(q *pending) bool { return q == v }))
	}
	a.pending = append(a.pending, p)
	a.bySrc[p.src]++
	return p, evicted, true
}

// busiestStrangerLocked returns the oldest pending connection of the
// source that never authenticated and holds the most pending connections
// (nil if there is none).
func (a *admission) busiestStrangerLocked() *pending {
	var v *pending
	for _, q := range a.pending {
		if a.known[q.src] {
			continue
		}
		if v == nil || a.bySrc[q.src] > a.bySrc[v.src] {
			v = q
		}
	}
	return v
}

// evictLocked drops the oldest pending connection that match selects (there
// is one) and returns it.
func (a *admission) evictLocked(match func(*pending) bool) *pending {
	for i, q := range a.pending {
		if match(q) {
			a.removeLocked(i)
			q.evicted = true
			q.nc.Close() // ends its handshake
			return q
		}
	}
	return nil
}

func (a *admission) removeLocked(i int) {
	q := a.pending[i]
	a.pending = append(a.pending[:i], a.pending[i+1:]...)
	if a.bySrc[q.src]--; a.bySrc[q.src] <= 0 {
		delete(a.bySrc, q.src)
	}
}

// done ends p's handshake; authenticated says it succeeded, which makes
// its source an expected one. It reports whether p was dropped for room.
func (a *admission) done(p *pending, authenticated bool) (evicted bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if authenticated && !a.known[p.src] {
		if len(a.known) >= maxKnown {
			clear(a.known)
		}
		a.known[p.src] = true
	}
	if p.evicted {
		return true
	}
	for i, q := range a.pending {
		if q == p {
			a.removeLocked(i)
			break
		}
	}
	return false
}
