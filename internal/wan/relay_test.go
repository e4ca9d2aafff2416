package wan

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

// The relay core is tested here on loopback, without a namespace (it needs
// no privilege); the link tests run it across the shaped veth pair.

// loopbackServer serves serveConn on 127.0.0.1 until the test ends.
func loopbackServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { serveConn(c.(*net.TCPConn)) })
		}
	})
	return ln.Addr().String()
}

func startRelay(t *testing.T, target string, oneWay time.Duration, queue int) (*relay, *counters) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	st := new(counters)
	r := newRelay(ln, target, oneWay, queue, st)
	t.Cleanup(r.close)
	return r, st
}

// TestRelayDelay checks the added round trip: never less than twice the
// one-way delay. (How much more depends on the host's load; BenchmarkLink
// reports the round trip measured through a whole link.)
func TestRelayDelay(t *testing.T) {
	for _, oneWay := range []time.Duration{0, 5 * time.Millisecond, 25 * time.Millisecond} {
		r, _ := startRelay(t, loopbackServer(t), oneWay, 1<<20)
		d := rtts(t, r.addr(), 7)
		m := median(d)
		t.Logf("one way %v: RTT median %v", oneWay, m)
		for _, x := range d {
			if x < 2*oneWay {
				t.Errorf("one way %v: an exchange took %v, less than %v", oneWay, x, 2*oneWay)
			}
		}
	}
}

// TestRelayIntegrity echoes 16 MiB of random bytes in odd-sized writes through
// a delaying relay while reading concurrently, and checks every byte and the
// end-of-stream come back, and the counters.
func TestRelayIntegrity(t *testing.T) {
	r, st := startRelay(t, loopbackServer(t), 3*time.Millisecond, 256<<10)
	c := dial(t, r.addr())
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	const size = 16 << 20
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	var got []byte
	var rerr error
	var wg sync.WaitGroup
	wg.Go(func() { got, rerr = io.ReadAll(c) })
	if _, err := c.Write([]byte{modeEcho}); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < size; {
		n := min(1+rng.IntN(100<<10), size-off)
		if _, err := c.Write(data[off : off+n]); err != nil {
			t.Fatal(err)
		}
		off += n
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if rerr != nil {
		t.Fatalf("reading the echo: %v", rerr)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echo through the relay: %d bytes, sha256 %x; want %d bytes, sha256 %x", len(got), sha256.Sum256(got), size, sha256.Sum256(data))
	}
	// The relay closes its conns once both ends are done; then the counts
	// are final.
	deadline := time.Now().Add(5 * time.Second)
	for {
		s := st.snapshot()
		if s == (Stats{Conns: 1, BytesToNS: size + 1, BytesFromNS: size}) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("counters = %+v, want 1 connection, %d bytes out and %d back", s, size+1, size)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRelayBackpressure points a relay at a server that never reads, writes
// far more than every buffer on the path holds, and checks the relay's queue
// stays within its bound while the writer is held back.
func TestRelayBackpressure(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	stalled := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			stalled <- c
		}
	}()
	const queue = 256 << 10
	r, _ := startRelay(t, ln.Addr().String(), time.Millisecond, queue)
	c := dial(t, r.addr())
	defer c.Close()
	srv := <-stalled
	defer srv.Close()

	const total = 256 << 20 // well above the socket buffers on the path
	written := make(chan int64, 1)
	go func() {
		buf := make([]byte, 64<<10)
		var n int64
		for n < total {
			k, err := c.Write(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		written <- n
	}()
	time.Sleep(time.Second)
	select {
	case n := <-written:
		t.Fatalf("the writer finished %d bytes into a server that never reads", n)
	default:
	}
	r.mu.Lock()
	var q *delayQueue
	for rc := range r.conns {
		q = rc.toNS
	}
	r.mu.Unlock()
	if q == nil {
		t.Fatal("the relay has no connection")
	}
	if h := q.highWater(); h > queue || h < queue/2 {
		t.Errorf("queue high water %d bytes, want %d/2..%d (filled, and bounded)", h, queue, queue)
	}
	// Closing the relay ends the blocked writer.
	r.close()
	select {
	case <-written:
	case <-time.After(10 * time.Second):
		t.Fatal("the writer still blocks after the relay closed")
	}
}

// TestRelayDialFailure checks a client of a relay whose target refuses sees
// its connection end.
func TestRelayDialFailure(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	target := ln.Addr().String()
	ln.Close() // nothing listens there now
	r, st := startRelay(t, target, 0, 1<<20)
	c := dial(t, r.addr())
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("read from a relay whose target refuses = %d bytes, want an error", n)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Error("the relay kept a connection open whose target refused")
	}
	if s := st.snapshot(); s.Conns != 0 {
		t.Errorf("counters = %+v, want no connection", s)
	}
}

func TestConfigDefaults(t *testing.T) {
	c, err := Config{RateMbit: 100, RTT: 40 * time.Millisecond}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	// 100 Mbit/s is 12.5 MB/s: 4 ms is 50000 bytes, 20 ms 250000.
	if c.BurstBytes != 50000 || c.ShaperQueueBytes != 300000 || c.RelayQueueBytes != 1<<20 {
		t.Errorf("defaults = burst %d, shaper queue %d, relay queue %d; want 50000, 300000, %d", c.BurstBytes, c.ShaperQueueBytes, c.RelayQueueBytes, 1<<20)
	}
	c, err = Config{RateMbit: 1000, RTT: time.Second}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if want := 2 * 125000000 / 2; c.RelayQueueBytes != want {
		t.Errorf("relay queue at 1 Gbit/s and 1 s RTT = %d, want %d", c.RelayQueueBytes, want)
	}
}

func TestConfigInvalid(t *testing.T) {
	for _, c := range []Config{
		{},
		{RateMbit: -1},
		{RateMbit: 0.01},
		{RateMbit: MaxRateMbit + 1},
		{RateMbit: 100, RTT: -time.Millisecond},
		{RateMbit: 100, RTT: MaxRTT + 1},
		{RateMbit: 100, Name: "a/b"},
		{RateMbit: 100, Name: "a b"},
		{RateMbit: 100, Name: "0123456789012345678901234567890123"},
		{RateMbit: 100, BurstBytes: 100},
		{RateMbit: 100, ShaperQueueBytes: -5},
		{RateMbit: 100, RelayQueueBytes: 4096},
		{RateMbit: 100, RelayQueueBytes: MaxRelayQueueBytes + 1},
	} {
		if _, err := c.withDefaults(); err == nil {
			t.Errorf("Config%+v accepted, want an error", c)
		}
		if _, err := New(c); err == nil {
			t.Errorf("New(%+v) succeeded, want an error", c)
		}
	}
}

func TestNSName(t *testing.T) {
	for _, tc := range []struct {
		name      string
		slot, pid int
		ok        bool
	}{
		{nsName(0, 1234, ""), 0, 1234, true},
		{nsName(16383, 99, "bench-x"), 16383, 99, true},
		{"us-wan-16384-99", 0, 0, false},
		{"us-wan-01-99", 0, 0, false},
		{"us-wan-1", 0, 0, false},
		{"us-wan-1-0", 0, 0, false},
		{"us-wan--1-5", 0, 0, false},
		{"other-1-5", 0, 0, false},
	} {
		slot, pid, ok := parseNSName(tc.name)
		if ok != tc.ok || ok && (slot != tc.slot || pid != tc.pid) {
			t.Errorf("parseNSName(%q) = %d, %d, %v; want %d, %d, %v", tc.name, slot, pid, ok, tc.slot, tc.pid, tc.ok)
		}
	}
}
