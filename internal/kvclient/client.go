// Package kvclient is the client of the nested guest's key-value service
// (initramfs/guestinit/kvstore, guest.mode=kv). It keeps one long-lived TCP
// connection, records every write the service acknowledged, and says
// whether that connection survived: a test of a snapshot, a restore or a
// failover reads every acknowledged write back through it and asks whether
// the client ever had to reconnect.
//
// It speaks the protocol that package kvstore documents; it does not import
// that package, so that it runs where the service does not (the appliance
// node, a host test).
package kvclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Options configure a Client. Zero fields take the defaults in brackets.
type Options struct {
	DialTimeout    time.Duration // one connection attempt, the greeting included [5s]
	RetryFor       time.Duration // how long Dial, and a reconnection, keep trying [60s]
	RetryEvery     time.Duration // pause between attempts [200ms]
	RequestTimeout time.Duration // one request's answer; past it the connection counts as broken [60s]
	// Reconnect: when the connection breaks, dial again and send the
	// request again (a PUT sent twice stores the same value twice). Without
	// it a broken connection is an error wrapping ErrBroken.
	Reconnect bool
	// Logf, if set, is told about dials, greetings and breaks.
	Logf func(format string, args ...any)
}

func (o Options) withDefaults() Options {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.DialTimeout, 5*time.Second)
	def(&o.RetryFor, 60*time.Second)
	def(&o.RetryEvery, 200*time.Millisecond)
	def(&o.RequestTimeout, 60*time.Second)
	return o
}

// ErrBroken wraps the error of a request whose connection broke (reset,
// closed by the peer, or no answer within RequestTimeout) when the client
// does not reconnect, or could not.
var ErrBroken = errors.New("connection broken")

// ServerError is an "ERR ..." answer: the service refused the request, and
// the connection is fine.
type ServerError struct{ Msg string }

func (e *ServerError) Error() string { return "server: " + e.Msg }

// Hello is the service's greeting on a connection.
type Hello struct {
	Instance string // random per start of the service
	Conn     uint64 // the connection's number at the service
}

// Break is one time the connection broke.
type Break struct {
	At    time.Time
	Cause string // "reset", "closed" (EOF), "timeout" or "error"
	Err   error
}

// Ack is an acknowledged write.
type Ack struct {
	Value string
	Seq   uint64 // the service's sequence number for the write
}

// Verify is the answer to VERIFY.
type Verify struct {
	Records    uint64
	Keys       int
	Matched    int
	Mismatched int
	Direct     bool
}

// OK reports whether the device held exactly what the service's memory
// holds, with records PUT records.
func (v Verify) OK(records uint64) bool {
	return v.Mismatched == 0 && v.Matched == v.Keys && v.Records == records
}

// Client is a connection to the service. One goroutine sends requests, as
// one client would; the methods that report (Acked, AckedCount, Breaks,
// Reconnects, ConnectionSurvived, Hello, Instances) may be called from any
// goroutine meanwhile.
type Client struct {
	addr string
	opts Options

	conn net.Conn // used by the requesting goroutine only
	r    *bufio.Reader

	mu        sync.Mutex // guards the fields below
	hello     Hello
	dials     int
	breaks    []Break
	instances []string
	acked     map[string]Ack
}

// Dial connects to the service at addr (host:port), trying until
// opts.RetryFor has passed or ctx is done, and reads its greeting.
func Dial(ctx context.Context, addr string, opts Options) (*Client, error) {
	c := &Client{addr: addr, opts: opts.withDefaults(), acked: map[string]Ack{}}
	if err := c.dial(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *Client) logf(format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf(format, args...)
	}
}

// dial makes a connection, retrying.
func (c *Client) dial(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.RetryFor)
	defer cancel()
	var last error
	for attempt := 1; ; attempt++ {
		h, err := c.dialOnce(ctx)
		if err == nil {
			c.mu.Lock()
			c.hello = h
			c.dials++
			if len(c.instances) == 0 || c.instances[len(c.instances)-1] != h.Instance {
				c.instances = append(c.instances, h.Instance)
			}
			c.mu.Unlock()
			c.logf("kvclient: connected to %s (instance %s, conn %d, attempt %d)", c.addr, h.Instance, h.Conn, attempt)
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("dial %s: no connection after %d attempts: %w", c.addr, attempt, last)
		case <-time.After(c.opts.RetryEvery):
		}
	}
}

func (c *Client) dialOnce(ctx context.Context) (Hello, error) {
	dctx, cancel := context.WithTimeout(ctx, c.opts.DialTimeout)
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(dctx, "tcp", c.addr)
	if err != nil {
		return Hello{}, err
	}
	conn.SetDeadline(time.Now().Add(c.opts.DialTimeout))
	r := bufio.NewReader(conn)
	line, err := readLine(r)
	if err != nil {
		conn.Close()
		return Hello{}, fmt.Errorf("greeting: %w", err)
	}
	h, err := ParseHello(line)
	if err != nil {
		conn.Close()
		return Hello{}, err
	}
	conn.SetDeadline(time.Time{})
	c.conn, c.r = conn, r
	return h, nil
}

// ParseHello reads the greeting "HELLO understudy-kv 1 instance=HEX conn=N".
func ParseHello(line string) (Hello, error) {
	f := strings.Fields(line)
	if len(f) != 5 || f[0] != "HELLO" || f[1] != "understudy-kv" || f[2] != "1" {
		return Hello{}, fmt.Errorf("greeting %q: not the understudy-kv service, protocol 1", trim(line))
	}
	inst, ok := strings.CutPrefix(f[3], "instance=")
	if !ok || inst == "" {
		return Hello{}, fmt.Errorf("greeting %q: no instance", trim(line))
	}
	cs, ok := strings.CutPrefix(f[4], "conn=")
	n, err := strconv.ParseUint(cs, 10, 64)
	if !ok || err != nil {
		return Hello{}, fmt.Errorf("greeting %q: no connection number", trim(line))
	}
	return Hello{Instance: inst, Conn: n}, nil
}

// readLine reads one answer line, bounded.
func readLine(r *bufio.Reader) (string, error) {
	var b []byte
	for {
		part, err := r.ReadSlice('\n')
		b = append(b, part...)
		if len(b) > 4096 {
			return "", fmt.Errorf("answer longer than 4096 bytes")
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if err != nil {
			if err == io.EOF && len(b) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return "", err
		}
		return strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r"), nil
	}
}

func trim(s string) string {
	if len(s) > 60 {
		return s[:60] + "..."
	}
	return s
}

// cause names why a connection broke.
func cause(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "closed"
	case errors.Is(err, os.ErrDeadlineExceeded):
		return "timeout"
	}
	return "error"
}

// maxAttempts bounds how often one request is sent on a fresh connection.
const maxAttempts = 3

// do sends one request line and returns the answer line. A broken
// connection is closed, recorded, and (with Reconnect) replaced.
func (c *Client) do(req string) (string, error) {
	for attempt := 1; ; attempt++ {
		if c.conn == nil {
			return "", fmt.Errorf("%s: %w: client closed", req, ErrBroken)
		}
		c.conn.SetDeadline(time.Now().Add(c.opts.RequestTimeout))
		_, err := io.WriteString(c.conn, req+"\n")
		var line string
		if err == nil {
			line, err = readLine(c.r)
		}
		if err == nil {
			if msg, ok := strings.CutPrefix(line, "ERR "); ok {
				return "", &ServerError{msg}
			}
			return line, nil
		}
		b := Break{At: time.Now(), Cause: cause(err), Err: err}
		c.mu.Lock()
		c.breaks = append(c.breaks, b)
		conn := c.hello.Conn
		c.mu.Unlock()
		c.conn.Close()
		c.conn = nil
		c.logf("kvclient: connection %d to %s broke (%s): %v", conn, c.addr, b.Cause, err)
		if !c.opts.Reconnect || attempt == maxAttempts {
			return "", fmt.Errorf("%s: %w (%s): %v", firstWord(req), ErrBroken, b.Cause, err)
		}
		if derr := c.dial(context.Background()); derr != nil {
			return "", fmt.Errorf("%s: %w (%s), and %v", firstWord(req), ErrBroken, b.Cause, derr)
		}
	}
}

func firstWord(s string) string {
	w, _, _ := strings.Cut(s, " ")
	return w
}

// checkToken refuses what the service would refuse, before sending it.
func checkToken(what, s string, max int) error {
	if len(s) == 0 || len(s) > max {
		return fmt.Errorf("%s of %d bytes: want 1..%d", what, len(s), max)
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return fmt.Errorf("%s %q: want printable bytes without spaces", what, trim(s))
		}
	}
	return nil
}

// Limits of the protocol (kvstore.MaxKey and kvstore.MaxValue).
const (
	MaxKey   = 64
	MaxValue = 416
)

// Put stores value under key. Once it returns nil the write is durable at
// the service and recorded in Acked.
func (c *Client) Put(key, value string) (uint64, error) {
	if err := checkToken("key", key, MaxKey); err != nil {
		return 0, err
	}
	if err := checkToken("value", value, MaxValue); err != nil {
		return 0, err
	}
	line, err := c.do("PUT " + key + " " + value)
	if err != nil {
		return 0, err
	}
	s, ok := strings.CutPrefix(line, "OK ")
	seq, perr := strconv.ParseUint(s, 10, 64)
	if !ok || perr != nil || seq == 0 {
		return 0, fmt.Errorf("PUT: answer %q", trim(line))
	}
	c.mu.Lock()
	c.acked[key] = Ack{Value: value, Seq: seq}
	c.mu.Unlock()
	return seq, nil
}

// Get returns key's value, and whether the service has the key.
func (c *Client) Get(key string) (string, bool, error) {
	if err := checkToken("key", key, MaxKey); err != nil {
		return "", false, err
	}
	line, err := c.do("GET " + key)
	if err != nil {
		return "", false, err
	}
	if line == "MISSING" {
		return "", false, nil
	}
	v, ok := strings.CutPrefix(line, "VALUE ")
	if !ok || checkToken("value", v, MaxValue) != nil {
		return "", false, fmt.Errorf("GET: answer %q", trim(line))
	}
	return v, true, nil
}

// Count returns the service's number of keys and of PUT records.
func (c *Client) Count() (keys int, records uint64, err error) {
	line, err := c.do("COUNT")
	if err != nil {
		return 0, 0, err
	}
	return parseCount(line)
}

// parseCount reads "COUNT keys=K records=R".
func parseCount(line string) (keys int, records uint64, err error) {
	kv, err := fields(line, "COUNT", "keys", "records")
	if err != nil {
		return 0, 0, err
	}
	return int(kv["keys"]), kv["records"], nil
}

// Sync asks the service for sync(2) and a flush of its disk.
func (c *Client) Sync() error {
	line, err := c.do("SYNC")
	if err == nil && line != "OK synced" {
		err = fmt.Errorf("SYNC: answer %q", trim(line))
	}
	return err
}

// Verify asks the service to re-read its log from the disk, past the page
// cache, and compare it with memory.
func (c *Client) Verify() (Verify, error) {
	line, err := c.do("VERIFY")
	if err != nil {
		return Verify{}, err
	}
	return parseVerify(line)
}

// parseVerify reads "VERIFIED records=R keys=K matched=M mismatched=X direct=B".
func parseVerify(line string) (Verify, error) {
	d, rest, _ := strings.Cut(line, " direct=")
	if rest != "true" && rest != "false" {
		return Verify{}, fmt.Errorf("VERIFY: answer %q", trim(line))
	}
	kv, err := fields(d, "VERIFIED", "records", "keys", "matched", "mismatched")
	if err != nil {
		return Verify{}, err
	}
	return Verify{Records: kv["records"], Keys: int(kv["keys"]), Matched: int(kv["matched"]), Mismatched: int(kv["mismatched"]), Direct: rest == "true"}, nil
}

// fields parses "WORD k1=N k2=N ..." with exactly the keys given, in order.
func fields(line, word string, keys ...string) (map[string]uint64, error) {
	f := strings.Fields(line)
	if len(f) != len(keys)+1 || f[0] != word {
		return nil, fmt.Errorf("%s: answer %q", word, trim(line))
	}
	kv := map[string]uint64{}
	for i, k := range keys {
		s, ok := strings.CutPrefix(f[i+1], k+"=")
		n, err := strconv.ParseUint(s, 10, 63)
		if !ok || err != nil {
			return nil, fmt.Errorf("%s: answer %q", word, trim(line))
		}
		kv[k] = n
	}
	return kv, nil
}

// Ping checks that the service answers.
func (c *Client) Ping() error {
	line, err := c.do("PING")
	if err == nil && line != "PONG" {
		err = fmt.Errorf("PING: answer %q", trim(line))
	}
	return err
}

// PowerOff asks the service to stop (the guest then powers off). The
// connection is closed after the answer.
func (c *Client) PowerOff() error {
	line, err := c.do("POWEROFF")
	if err == nil && line != "OK powering off" {
		err = fmt.Errorf("POWEROFF: answer %q", trim(line))
	}
	c.Close()
	return err
}

// Close says QUIT (without waiting long for the answer) and closes the
// connection.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	c.conn.SetDeadline(time.Now().Add(time.Second))
	io.WriteString(c.conn, "QUIT\n")
	_, _ = readLine(c.r)
	err := c.conn.Close()
	c.conn = nil
	return err
}

// Acked returns every write the service acknowledged through this client:
// the last acknowledged value of each key.
func (c *Client) Acked() map[string]Ack {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]Ack, len(c.acked))
	for k, v := range c.acked {
		m[k] = v
	}
	return m
}

// AckedCount is len(Acked()), without the copy.
func (c *Client) AckedCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.acked)
}

// Breaks returns every time the connection broke.
func (c *Client) Breaks() []Break {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Break(nil), c.breaks...)
}

// Reconnects is how many connections were made after the first.
func (c *Client) Reconnects() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dials - 1
}

// ConnectionSurvived reports whether the first connection never broke: every
// request went over it.
func (c *Client) ConnectionSurvived() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.breaks) == 0 && c.dials == 1
}

// Hello is the greeting of the current connection.
func (c *Client) Hello() Hello {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.hello
}

// Instances lists the service instances seen, in order (one unless the
// service restarted).
func (c *Client) Instances() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.instances...)
}
