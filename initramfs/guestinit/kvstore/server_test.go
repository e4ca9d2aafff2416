package kvstore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/kvclient"
)

// serveEnv, when set, makes the test binary a service process (see
// TestMain): "DISK ADDR".
const serveEnv = "KVSTORE_TEST_SERVE"

func TestMain(m *testing.M) {
	if v := os.Getenv(serveEnv); v != "" {
		os.Exit(serveMain(v))
	}
	os.Exit(m.Run())
}

// serveMain is the service process of the tests that kill and restart it:
// what guest.mode=kv runs, on a file and the loopback interface.
func serveMain(v string) int {
	disk, addr, _ := strings.Cut(v, " ")
	s, err := Open(disk)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	info := s.Info()
	fmt.Printf("serving %s records=%d direct=%t\n", ln.Addr(), info.Records, info.Direct)
	err = NewServer(s, func(f string, a ...any) { fmt.Fprintf(os.Stderr, f+"\n", a...) }).Serve(ln)
	fmt.Fprintln(os.Stderr, err)
	return 2
}

// startServer serves a store on a fresh file on loopback, in this process.
func startServer(t *testing.T) (addr string, srv *Server, done <-chan error) {
	t.Helper()
	s := mustOpen(t, newDisk(t, t.TempDir(), 1<<20))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv = NewServer(s, nil)
	ch := make(chan error, 1)
	go func() { ch <- srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), srv, ch
}

// TestProtocol speaks the protocol over TCP, line by line, with the
// requests a client may get wrong.
func TestProtocol(t *testing.T) {
	addr, srv, _ := startServer(t)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r := bufio.NewReader(conn)
	hello, err := r.ReadString('\n')
	if want := fmt.Sprintf("HELLO understudy-kv 1 instance=%s conn=1\n", srv.Instance()); err != nil || hello != want {
		t.Fatalf("greeting %q, %v, want %q", hello, err, want)
	}
	if _, err := kvclient.ParseHello(strings.TrimSpace(hello)); err != nil {
		t.Errorf("kvclient.ParseHello(%q) = %v", hello, err)
	}
	long := strings.Repeat("x", MaxLine+1)
	for _, tt := range []struct{ req, want string }{
		{"PING", "PONG"},
		{"GET k", "MISSING"},
		{"PUT k v1", "OK 1"},
		{"PUT k v2\r", "OK 2"},
		{"GET k", "VALUE v2"},
		{"PUT other " + strings.Repeat("v", MaxValue), "OK 3"},
		{"PUT k", "ERR usage: PUT key value"},
		{"PUT k v extra", "ERR usage: PUT key value"},
		{"PUT  v", "ERR key: want 1..64 printable bytes without spaces"},
		{"PUT k\tv x", "ERR key: want 1..64 printable bytes without spaces"},
		{"PUT k " + strings.Repeat("v", MaxValue+1), "ERR value: want 1..416 printable bytes without spaces"},
		{"PUT " + strings.Repeat("k", MaxKey+1) + " v", "ERR key: want 1..64 printable bytes without spaces"},
		{"PUT k \xff", "ERR value: want 1..416 printable bytes without spaces"},
		{"GET", "ERR usage: GET key"},
		{"GET a\x00", "ERR key: want 1..64 printable bytes without spaces"},
		{"put k v", `ERR unknown request "put k v" (want PUT, GET, COUNT, SYNC, VERIFY, PING, QUIT or POWEROFF)`},
		{"", `ERR unknown request "" (want PUT, GET, COUNT, SYNC, VERIFY, PING, QUIT or POWEROFF)`},
		{long, fmt.Sprintf("ERR line longer than %d bytes", MaxLine)},
		{"COUNT now", "ERR usage: COUNT"},
		{"COUNT", "COUNT keys=2 records=3"},
		{"SYNC", "OK synced"},
		{"VERIFY", "VERIFIED records=3 keys=2 matched=2 mismatched=0 direct=true"},
		{"QUIT", "BYE"},
	} {
		if _, err := io.WriteString(conn, tt.req+"\n"); err != nil {
			t.Fatal(err)
		}
		got, err := r.ReadString('\n')
		if err != nil || got != tt.want+"\n" {
			t.Errorf("%.50q answered %q, %v, want %q", tt.req, got, err, tt.want)
		}
	}
	if b, err := io.ReadAll(r); err != nil || len(b) != 0 {
		t.Errorf("after QUIT: read %q, %v, want the connection closed", b, err)
	}
}

// TestManyConnections: clients on their own connections write at once;
// every write is there, in memory and on the disk.
func TestManyConnections(t *testing.T) {
	addr, _, _ := startServer(t)
	const clients, each = 8, 40
	acked := make([]map[string]kvclient.Ack, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{})
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			for j := range each {
				if _, err := c.Put(fmt.Sprintf("c%d-%d", i, j), fmt.Sprintf("v%d", j)); err != nil {
					errs <- err
					return
				}
			}
			acked[i] = c.Acked()
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	seqs := map[uint64]bool{}
	for _, m := range acked {
		for k, a := range m {
			seqs[a.Seq] = true
			if v, ok, err := c.Get(k); err != nil || !ok || v != a.Value {
				t.Errorf("Get(%s) = %q, %v, %v, want %q", k, v, ok, err, a.Value)
			}
		}
	}
	if len(seqs) != clients*each {
		t.Errorf("%d distinct sequence numbers acknowledged, want %d", len(seqs), clients*each)
	}
	if keys, n, err := c.Count(); err != nil || keys != clients*each || n != clients*each {
		t.Errorf("Count() = %d, %d, %v, want %d", keys, n, err, clients*each)
	}
	if v, err := c.Verify(); err != nil || !v.OK(clients*each) {
		t.Errorf("Verify() = %+v, %v", v, err)
	}
}

func TestTooManyConnections(t *testing.T) {
	addr, _, _ := startServer(t)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := range MaxConns + 1 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		line, err := bufio.NewReader(c).ReadString('\n')
		want := "HELLO "
		if i == MaxConns {
			want = "ERR too many connections"
		}
		if err != nil || !strings.HasPrefix(line, want) {
			t.Fatalf("connection %d: %q, %v, want %q", i+1, line, err, want)
		}
	}
}

func TestPowerOff(t *testing.T) {
	addr, _, done := startServer(t)
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.PowerOff(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, ErrPowerOff) {
		t.Errorf("Serve after POWEROFF = %v, want ErrPowerOff", err)
	}
}

// service is a service process (the test binary, see TestMain).
type service struct {
	cmd    *exec.Cmd
	stderr strings.Builder
}

func startService(t *testing.T, disk, addr string) *service {
	t.Helper()
	s := &service{cmd: exec.Command(os.Args[0])}
	s.cmd.Env = append(os.Environ(), serveEnv+"="+disk+" "+addr)
	s.cmd.Stderr = &s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "serving ") {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		t.Fatalf("service on %s: %q, %v; stderr: %s", disk, line, err, s.stderr.String())
	}
	t.Logf("service pid %d: %s", s.cmd.Process.Pid, strings.TrimSpace(line))
	t.Cleanup(func() { s.kill() })
	return s
}

func (s *service) kill() {
	if s.cmd.ProcessState == nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
	}
}

// freeAddr returns a loopback address no one listens on.
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// writer puts key i = prefix-i until stop is closed and at least min were
// acknowledged; each acknowledgement is announced on acks.
func writer(c *kvclient.Client, prefix string, min int, stop <-chan struct{}, acks chan<- int) error {
	defer close(acks)
	for i := 0; ; i++ {
		select {
		case <-stop:
			if i >= min {
				return nil
			}
		default:
		}
		if _, err := c.Put(fmt.Sprintf("%s-%d", prefix, i), fmt.Sprintf("value-%d-%s", i, strings.Repeat("x", i%50))); err != nil {
			return err
		}
		select {
		case acks <- c.AckedCount():
		default:
		}
	}
}

// checkAcked reads every acknowledged write back through c and verifies
// the disk.
func checkAcked(t *testing.T, c *kvclient.Client) {
	t.Helper()
	acked := c.Acked()
	for k, a := range acked {
		if v, ok, err := c.Get(k); err != nil || !ok || v != a.Value {
			t.Errorf("Get(%s) = %q, %v, %v, want the acknowledged %q", k, v, ok, err, a.Value)
		}
	}
	_, records, err := c.Count()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(); err != nil {
		t.Fatal(err)
	}
	if v, err := c.Verify(); err != nil || !v.OK(records) || v.Keys < len(acked) {
		t.Errorf("Verify() = %+v, %v, want all of %d records and at least %d keys matched", v, err, records, len(acked))
	}
}

// TestKillRestart kills the service process with SIGKILL while a client
// writes over one connection, three times, and starts it again on the same
// disk and address: the client reconnects (a new connection, to a new
// instance), and every write it saw acknowledged is there, through the
// service and, after the last kill, in the file itself.
func TestKillRestart(t *testing.T) {
	disk, addr := newDisk(t, t.TempDir(), 4<<20), freeAddr(t)
	svc := startService(t, disk, addr)
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{Reconnect: true, RetryFor: 30 * time.Second, RetryEvery: 20 * time.Millisecond, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop, acks := make(chan struct{}), make(chan int, 1)
	werr := make(chan error, 1)
	go func() { werr <- writer(c, "k", 0, stop, acks) }()
	const kills = 3
	for round := range kills {
		// Kill once this round's writes are flowing, while one is in flight.
		for n := range acks {
			if n >= (round+1)*60 {
				break
			}
		}
		svc.kill()
		t.Logf("killed the service: %s", strings.TrimSpace(svc.stderr.String()))
		svc = startService(t, disk, addr)
	}
	for n := range acks {
		if n >= (kills+1)*60 {
			break
		}
	}
	close(stop)
	if err := <-werr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	if c.ConnectionSurvived() || c.Reconnects() < kills || len(c.Instances()) != kills+1 {
		t.Errorf("after %d kills: survived=%v reconnects=%d instances=%v, want %d reconnects to %d instances", kills, c.ConnectionSurvived(), c.Reconnects(), c.Instances(), kills, kills+1)
	}
	for _, b := range c.Breaks() {
		if b.Cause != "reset" && b.Cause != "closed" {
			t.Errorf("break %v: cause %q, want reset or closed", b.Err, b.Cause)
		}
	}
	checkAcked(t, c)

	// The file itself, opened by this process after the last kill.
	acked := c.Acked()
	svc.kill()
	s := mustOpen(t, disk)
	for k, a := range acked {
		if e, ok := s.Get(k); !ok || e.Value != a.Value || e.Seq < a.Seq {
			t.Errorf("on the disk: %s = %+v, %v, want %q from seq %d on", k, e, ok, a.Value, a.Seq)
		}
	}
	t.Logf("%d acknowledged writes, %d records on the disk, %d breaks", len(acked), s.Info().Records, len(c.Breaks()))
}

// TestStopContinue stops the service process (SIGSTOP) in mid-stream and
// lets it go on: the client's connection survives the pause, as it must
// across a snapshot and restore of the guest.
func TestStopContinue(t *testing.T) {
	disk, addr := newDisk(t, t.TempDir(), 4<<20), freeAddr(t)
	svc := startService(t, disk, addr)
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{Reconnect: true, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	stop, acks := make(chan struct{}), make(chan int, 1)
	werr := make(chan error, 1)
	go func() { werr <- writer(c, "k", 0, stop, acks) }()
	for n := range acks {
		if n >= 50 {
			break
		}
	}
	if err := svc.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the writer's request waits unanswered
	before := c.AckedCount()
	if err := svc.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	for n := range acks {
		if n >= before+50 {
			break
		}
	}
	close(stop)
	if err := <-werr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	if !c.ConnectionSurvived() || c.Reconnects() != 0 || len(c.Breaks()) != 0 {
		t.Errorf("after a pause: survived=%v reconnects=%d breaks=%v, want the connection kept", c.ConnectionSurvived(), c.Reconnects(), c.Breaks())
	}
	checkAcked(t, c)
}

// TestClose: Close ends Serve, and a Serve after Close returns at once and
// closes its listener.
func TestClose(t *testing.T) {
	addr, srv, done := startServer(t)
	c, err := kvclient.Dial(context.Background(), addr, kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	srv.Close()
	if err := <-done; err != nil {
		t.Errorf("Serve after Close = %v, want nil", err)
	}
	if err := c.Ping(); !errors.Is(err, kvclient.ErrBroken) {
		t.Errorf("Ping() after Close = %v, want a broken connection", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(ln); err != nil {
		t.Errorf("Serve on a closed server = %v", err)
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("the listener of a closed server: Accept() = %v, want closed", err)
	}
}

// TestProgressLog: the server logs "records=N" after every ProgressEvery-th
// PUT and nothing per request otherwise.
func TestProgressLog(t *testing.T) {
	s := mustOpen(t, newDisk(t, t.TempDir(), 1<<20))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var lines []string
	srv := NewServer(s, func(f string, a ...any) {
		mu.Lock()
		lines = append(lines, fmt.Sprintf(f, a...))
		mu.Unlock()
	})
	go srv.Serve(ln)
	c, err := kvclient.Dial(context.Background(), ln.Addr().String(), kvclient.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2*ProgressEvery + 1 {
		if _, err := c.Put(fmt.Sprintf("k%d", i), "v"); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	srv.Close()
	mu.Lock()
	defer mu.Unlock()
	var progress []string
	for _, l := range lines {
		if strings.HasPrefix(l, "records=") {
			progress = append(progress, l)
		}
	}
	want := []string{fmt.Sprintf("records=%d", ProgressEvery), fmt.Sprintf("records=%d", 2*ProgressEvery)}
	if !slices.Equal(progress, want) {
		t.Errorf("progress lines %q, want %q (all lines: %q)", progress, want, lines)
	}
}
