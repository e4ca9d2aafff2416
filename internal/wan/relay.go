package wan

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// relayReadSize is the largest chunk the relay reads (and timestamps) at
	// once.
	relayReadSize = 64 << 10
	// relayWriteBatch bounds the due chunks the relay hands to one writev.
	relayWriteBatch = 256 << 10
	// relayDialTimeout bounds the relay's connect to its target.
	relayDialTimeout = 10 * time.Second
)

// Stats counts what a Link's relays carried.
type Stats struct {
	// Conns is the number of connections the relays accepted and connected
	// to their targets.
	Conns uint64
	// BytesToNS is the number of bytes relayed from host clients to targets
	// in the namespace (written to the shaped veth).
	BytesToNS uint64
	// BytesFromNS is the number of bytes relayed from targets back to host
	// clients.
	BytesFromNS uint64
}

// counters is the live form of Stats, shared by all relays of a Link.
type counters struct {
	conns, toNS, fromNS atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{Conns: c.conns.Load(), BytesToNS: c.toNS.Load(), BytesFromNS: c.fromNS.Load()}
}

// relay accepts TCP connections on ln and forwards each to target, delaying
// every byte by oneWay in each direction. It holds at most queueBytes (plus
// one read) per connection and direction.
type relay struct {
	ln         net.Listener
	target     string
	oneWay     time.Duration
	queueBytes int
	stats      *counters

	ctx    context.Context // cancelled by close; bounds dials
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop and every connection's goroutines

	// mu guards conns and closed.
	mu     sync.Mutex
	conns  map[*relayConn]struct{}
	closed bool
}

// newRelay starts a relay on ln. It owns ln from then on.
func newRelay(ln net.Listener, target string, oneWay time.Duration, queueBytes int, stats *counters) *relay {
	ctx, cancel := context.WithCancel(context.Background())
	r := &relay{ln: ln, target: target, oneWay: oneWay, queueBytes: queueBytes, stats: stats,
		ctx: ctx, cancel: cancel, conns: make(map[*relayConn]struct{})}
	r.wg.Add(1)
	go r.acceptLoop()
	return r
}

// addr is the address the relay listens on.
func (r *relay) addr() string { return r.ln.Addr().String() }

// close stops accepting, closes every connection and waits for all of the
// relay's goroutines. It is idempotent.
func (r *relay) close() {
	r.mu.Lock()
	already := r.closed
	r.closed = true
	conns := make([]*relayConn, 0, len(r.conns))
	for c := range r.conns {
		conns = append(conns, c)
	}
	r.mu.Unlock()
	if !already {
		r.cancel()
		r.ln.Close()
		for _, c := range conns {
			c.abort()
		}
	}
	r.wg.Wait()
}

func (r *relay) acceptLoop() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			// Accept fails for good only once the listener is closed;
			// anything else (EMFILE, ECONNABORTED) is worth retrying.
			if r.ctx.Err() != nil {
				return
			}
			select {
			case <-r.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		r.wg.Add(1)
		go r.connect(c.(*net.TCPConn))
	}
}

// connect dials the target for the accepted client and starts relaying.
// The dial itself is not delayed: only data and end-of-stream are.
func (r *relay) connect(client *net.TCPConn) {
	defer r.wg.Done()
	d := net.Dialer{Timeout: relayDialTimeout}
	up, err := d.DialContext(r.ctx, "tcp", r.target)
	if err != nil {
		// The client sees its connection close: what a real peer that
		// refuses or cannot be reached looks like from a relayed client.
		client.Close()
		return
	}
	c := &relayConn{client: client, upstream: up.(*net.TCPConn), done: make(chan struct{}),
		toNS: newDelayQueue(r.queueBytes), fromNS: newDelayQueue(r.queueBytes)}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		c.abort()
		return
	}
	r.conns[c] = struct{}{}
	r.mu.Unlock()
	r.stats.conns.Add(1)

	var pipes sync.WaitGroup
	var clean atomic.Int32 // directions that ended with a delivered end-of-stream
	pipe := func(src, dst *net.TCPConn, q *delayQueue, n *atomic.Uint64) {
		pipes.Add(2)
		go func() {
			defer pipes.Done()
			if err := q.fill(src); err != nil {
				c.abort()
			}
		}()
		go func() {
			defer pipes.Done()
			if err := q.drain(dst, r.oneWay, c.done, n); err != nil {
				c.abort()
				return
			}
			if clean.Add(1) == 2 {
				// Both directions delivered their end-of-stream:
				// the connection is over.
				c.abort()
			}
		}()
	}
	pipe(c.client, c.upstream, c.toNS, &r.stats.toNS)
	pipe(c.upstream, c.client, c.fromNS, &r.stats.fromNS)
	pipes.Wait()

	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
}

// relayConn is one relayed connection: a client of the relay and its
// connection to the target.
type relayConn struct {
	client, upstream *net.TCPConn
	toNS, fromNS     *delayQueue
	done             chan struct{} // closed by abort
	once             sync.Once
}

// abort ends the connection at once: both sockets close, queued bytes are
// dropped and the relay goroutines return.
func (c *relayConn) abort() {
	c.once.Do(func() {
		close(c.done)
		c.client.Close()
		c.upstream.Close()
		c.toNS.abort()
		c.fromNS.abort()
	})
}

// chunk is one read's bytes and the time they may leave the relay.
type chunk struct {
	data []byte
	due  time.Time
}

// delayQueue is one direction of a relayed connection: a FIFO of timestamped
// chunks holding at most max bytes (a single chunk larger than max is let in
// alone, so a queue never wedges).
type delayQueue struct {
	max int

	// mu guards every field below; cond signals any change to them.
	mu      sync.Mutex
	cond    sync.Cond
	chunks  []chunk // oldest first
	queued  int     // bytes in chunks plus bytes handed to the writer and not yet released
	eof     bool    // the source ended cleanly; nothing follows the queued chunks
	aborted bool
	high    int // the largest queued seen, for tests
}

func newDelayQueue(max int) *delayQueue {
	q := &delayQueue{max: max}
	q.cond.L = &q.mu
	return q
}

// errAborted reports that the connection was aborted while a queue operation
// waited.
var errAborted = errors.New("wan: relayed connection aborted")

// fill reads src until end-of-stream, timestamping each read as it arrives
// and queueing it; it blocks while the queue is full. It returns nil when src
// ended cleanly and everything read is queued.
func (q *delayQueue) fill(src io.Reader) error {
	buf := make([]byte, relayReadSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if perr := q.push(append([]byte(nil), buf[:n]...), time.Now()); perr != nil {
				return perr
			}
		}
		if err == io.EOF {
			q.mu.Lock()
			q.eof = true
			q.cond.Broadcast()
			q.mu.Unlock()
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// push queues data that arrived at t, waiting for room.
func (q *delayQueue) push(data []byte, t time.Time) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	for !q.aborted && q.queued > 0 && q.queued+len(data) > q.max {
		q.cond.Wait()
	}
	if q.aborted {
		return errAborted
	}
	q.chunks = append(q.chunks, chunk{data: data, due: t})
	q.queued += len(data)
	q.high = max(q.high, q.queued)
	q.cond.Broadcast()
	return nil
}

// drain writes every queued chunk to dst once delay has passed since it
// arrived, in order, batching chunks that are due together into one writev.
// When the source has ended and the queue is empty it half-closes dst (the
// peer reads end-of-stream, delayed like the data before it) and returns nil.
// It returns an error when dst fails or the connection is aborted (done).
func (q *delayQueue) drain(dst *net.TCPConn, delay time.Duration, done <-chan struct{}, n *atomic.Uint64) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		q.mu.Lock()
		for !q.aborted && len(q.chunks) == 0 && !q.eof {
			q.cond.Wait()
		}
		if q.aborted {
			q.mu.Unlock()
			return errAborted
		}
		if len(q.chunks) == 0 { // eof and drained
			q.mu.Unlock()
			return dst.CloseWrite()
		}
		due := q.chunks[0].due.Add(delay)
		q.mu.Unlock()

		if wait := time.Until(due); wait > 0 {
			timer.Reset(wait)
			select {
			case <-done:
				return errAborted
			case <-timer.C:
			}
		}

		// Take the head and every chunk behind it that is due by now.
		now := time.Now()
		q.mu.Lock()
		var batch net.Buffers
		size := 0
		for i := range q.chunks {
			ch := q.chunks[i]
			if i > 0 && (ch.due.Add(delay).After(now) || size+len(ch.data) > relayWriteBatch) {
				break
			}
			batch = append(batch, ch.data)
			size += len(ch.data)
			q.chunks[i] = chunk{} // drop the reference; the slice head moves on
		}
		q.chunks = q.chunks[len(batch):]
		q.mu.Unlock()

		_, err := batch.WriteTo(dst)
		q.release(size)
		if err != nil {
			return err
		}
		n.Add(uint64(size))
	}
}

// release returns written bytes' room to the queue.
func (q *delayQueue) release(size int) {
	q.mu.Lock()
	q.queued -= size
	q.cond.Broadcast()
	q.mu.Unlock()
}

// abort wakes and fails every waiter; queued bytes are dropped.
func (q *delayQueue) abort() {
	q.mu.Lock()
	q.aborted = true
	q.chunks = nil
	q.cond.Broadcast()
	q.mu.Unlock()
}

// highWater is the most bytes the queue has held at once.
func (q *delayQueue) highWater() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.high
}
