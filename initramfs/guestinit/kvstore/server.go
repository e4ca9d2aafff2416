package kvstore

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
)

// MaxLine bounds a request line, its newline excluded.
const MaxLine = 1024

// MaxConns bounds the connections served at once; one more is told
// "ERR too many connections" and closed.
const MaxConns = 64

// ProgressEvery is how often the server logs its record count: "records=N"
// after every ProgressEvery-th PUT (tests and snapshots key on it; a
// console line per write would cost too much under emulation).
const ProgressEvery = 100

// ProtocolVersion is the protocol's version in the greeting.
const ProtocolVersion = 1

// Server serves a Store over TCP (see the package documentation for the
// protocol).
type Server struct {
	store    *Store
	logf     func(format string, args ...any)
	instance string

	mu       sync.Mutex // guards the fields below
	ln       net.Listener
	conns    map[net.Conn]bool
	nextConn uint64
	poweroff bool
	closed   bool // Close was called: no connection is added
	wg       sync.WaitGroup
}

// NewServer returns a server of store that tells logf about connections
// and, every ProgressEvery records, the record count (not each request);
// logf may be nil.
func NewServer(store *Store, logf func(format string, args ...any)) *Server {
	var b [8]byte
	_, _ = rand.Read(b[:])
	if logf == nil {
		logf = func(string, ...any) {}
	}
	return &Server{store: store, logf: logf, instance: hex.EncodeToString(b[:]), conns: map[net.Conn]bool{}}
}

// Instance is the random id the server gives in its greeting.
func (s *Server) Instance() string { return s.instance }

// ErrPowerOff is what Serve returns after a POWEROFF request.
var ErrPowerOff = errors.New("powering off on request")

// Serve accepts connections on ln until ln is closed, Close is called, or a
// client asks POWEROFF (then it returns ErrPowerOff). It closes ln and
// every connection before it returns.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	s.ln = ln
	closed := s.closed
	s.mu.Unlock()
	defer s.Close()
	if closed {
		return nil
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			off := s.poweroff
			s.mu.Unlock()
			if off {
				return ErrPowerOff
			}
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return nil
		}
		if len(s.conns) >= MaxConns {
			s.mu.Unlock()
			io.WriteString(c, "ERR too many connections\n")
			c.Close()
			continue
		}
		s.nextConn++
		id := s.nextConn
		s.conns[c] = true
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.serveConn(c, id)
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// Close stops the server: it closes the listener and every connection and
// waits for their goroutines. The store stays open.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	if s.ln != nil {
		s.ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) serveConn(c net.Conn, id uint64) {
	defer c.Close()
	s.logf("connection %d from %s", id, c.RemoteAddr())
	r := bufio.NewReaderSize(c, MaxLine+2)
	w := bufio.NewWriter(c)
	fmt.Fprintf(w, "HELLO understudy-kv %d instance=%s conn=%d\n", ProtocolVersion, s.instance, id)
	requests := 0
	for {
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				s.logf("connection %d closed after %d requests: %s", id, requests, err.Error())
				return
			}
		}
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, errLineTooLong) {
				fmt.Fprintf(w, "ERR %v\n", err)
				requests++
				continue
			}
			w.Flush()
			why := "closed by the client"
			if !errors.Is(err, io.EOF) {
				why = err.Error()
			}
			s.logf("connection %d closed after %d requests: %s", id, requests, why)
			return
		}
		requests++
		answer, act := s.handle(line)
		io.WriteString(w, answer)
		w.WriteByte('\n')
		switch act {
		case actQuit:
			w.Flush()
			s.logf("connection %d closed after %d requests: QUIT", id, requests)
			return
		case actPowerOff:
			w.Flush()
			s.logf("connection %d closed after %d requests: POWEROFF", id, requests)
			s.mu.Lock()
			s.poweroff = true
			if s.ln != nil {
				s.ln.Close()
			}
			s.mu.Unlock()
			return
		}
	}
}

var errLineTooLong = fmt.Errorf("line longer than %d bytes", MaxLine)

// readLine reads one line, without its "\n" or "\r\n". A line longer than
// MaxLine is read to its end and refused with errLineTooLong.
func readLine(r *bufio.Reader) (string, error) {
	b, err := r.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		for errors.Is(err, bufio.ErrBufferFull) {
			_, err = r.ReadSlice('\n')
		}
		if err != nil {
			return "", err
		}
		return "", errLineTooLong
	}
	if err != nil {
		return "", err // a last line without "\n" is not a request
	}
	b = b[:len(b)-1]
	if len(b) > 0 && b[len(b)-1] == '\r' {
		b = b[:len(b)-1]
	}
	if len(b) > MaxLine {
		return "", errLineTooLong
	}
	return string(b), nil
}

// What a connection does after an answer.
type action int

const (
	actNone     action = iota
	actQuit            // close the connection
	actPowerOff        // close the connection and stop the server
)

// handle answers one request line.
func (s *Server) handle(line string) (string, action) {
	f := strings.Split(line, " ")
	want := func(n int) bool { return len(f) == n }
	switch f[0] {
	case "PUT":
		if !want(3) {
			return "ERR usage: PUT key value", actNone
		}
		seq, err := s.store.Put(f[1], f[2])
		if err != nil {
			return "ERR " + oneLine(err), actNone
		}
		if seq%ProgressEvery == 0 {
			s.logf("records=%d", seq)
		}
		return fmt.Sprintf("OK %d", seq), actNone
	case "GET":
		if !want(2) {
			return "ERR usage: GET key", actNone
		}
		if !ValidToken(f[1], MaxKey) {
			return fmt.Sprintf("ERR key: want 1..%d printable bytes without spaces", MaxKey), actNone
		}
		e, ok := s.store.Get(f[1])
		if !ok {
			return "MISSING", actNone
		}
		return "VALUE " + e.Value, actNone
	case "COUNT":
		if !want(1) {
			return "ERR usage: COUNT", actNone
		}
		k, n := s.store.Count()
		return fmt.Sprintf("COUNT keys=%d records=%d", k, n), actNone
	case "SYNC":
		if !want(1) {
			return "ERR usage: SYNC", actNone
		}
		if err := s.store.Sync(); err != nil {
			return "ERR " + oneLine(err), actNone
		}
		return "OK synced", actNone
	case "VERIFY":
		if !want(1) {
			return "ERR usage: VERIFY", actNone
		}
		v, err := s.store.Verify()
		if err != nil {
			return "ERR " + oneLine(err), actNone
		}
		return fmt.Sprintf("VERIFIED records=%d keys=%d matched=%d mismatched=%d direct=%t", v.Records, v.Keys, v.Matched, v.Mismatched, v.Direct), actNone
	case "PING":
		if !want(1) {
			return "ERR usage: PING", actNone
		}
		return "PONG", actNone
	case "QUIT":
		if !want(1) {
			return "ERR usage: QUIT", actNone
		}
		return "BYE", actQuit
	case "POWEROFF":
		if !want(1) {
			return "ERR usage: POWEROFF", actNone
		}
		return "OK powering off", actPowerOff
	}
	if len(line) > 40 {
		line = line[:40] + "..."
	}
	return fmt.Sprintf("ERR unknown request %q (want PUT, GET, COUNT, SYNC, VERIFY, PING, QUIT or POWEROFF)", line), actNone
}

// oneLine keeps an error's text on one line.
func oneLine(err error) string {
	return strings.NewReplacer("\n", " ", "\r", " ").Replace(err.Error())
}
