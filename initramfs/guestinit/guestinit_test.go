package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

func mustParams(t testing.TB, s string) boot.Params {
	ps, err := boot.ParseCmdline(s)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func TestParseConfig(t *testing.T) {
	c, err := parseConfig(mustParams(t, "console=ttyS0 panic=-1"))
	if err != nil || c.mode != modePoweroff || c.modules() != nil {
		t.Errorf("parseConfig(no guest.*) = %+v, %v, want poweroff and no modules", c, err)
	}
	c, err = parseConfig(mustParams(t, "guest.mode=net guest.addr=192.0.2.2/24 guest.port=8080 guest.iface=eth1 guest.timeout=5s"))
	want := config{mode: modeNet, iface: "eth1", addr: netip.MustParsePrefix("192.0.2.2/24"), port: 8080, disk: "/dev/vda", console: "/dev/ttyS0", timeout: 5 * time.Second}
	if err != nil || c != want {
		t.Errorf("parseConfig(net) = %+v, %v, want %+v", c, err, want)
	}
	c, err = parseConfig(mustParams(t, "guest.mode=disk guest.disk=/dev/vdb"))
	if err != nil || c.mode != modeDisk || c.disk != "/dev/vdb" || c.modules()[2] != "virtio_blk" {
		t.Errorf("parseConfig(disk) = %+v, %v", c, err)
	}
	c, err = parseConfig(mustParams(t, "guest.mode=halt"))
	if err != nil || c.mode != modeHalt || c.modules() != nil {
		t.Errorf("parseConfig(halt) = %+v, %v", c, err)
	}
	c, err = parseConfig(mustParams(t, "guest.mode=echo guest.console=/dev/ttyS1"))
	if err != nil || c.mode != modeEcho || c.console != "/dev/ttyS1" || c.modules() != nil {
		t.Errorf("parseConfig(echo) = %+v, %v", c, err)
	}
	for _, tt := range []struct{ in, want string }{
		{"guest.mode=dance", "want poweroff, halt, net, disk, echo, kv or storm"},
		{"guest.console=ttyS0", "under /dev"},
		{"guest.mode=net", "needs guest.addr"},
		{"guest.mode=net guest.addr=192.0.2.2", "prefix length"},
		{"guest.addr=2001:db8::1/64", "IPv4"},
		{"guest.addr=192.0.2.2/32", "1..31"},
		{"guest.port=0", "1..65535"},
		{"guest.port=65536", "1..65535"},
		{"guest.iface=a/b", "guest.iface"},
		{"guest.disk=/etc/passwd", "under /dev"},
		{"guest.disk=/dev/../etc/x", "under /dev"},
		{"guest.timeout=-1s", "duration"},
		{"guest.timeout=2h", "duration"},
		{"guest.mode=net guest.mode=disk", "given twice"},
		{"guest.mode", "needs a value"},
		{"guest.colour=red", "unknown parameter guest.colour"},
	} {
		if _, err := parseConfig(mustParams(t, tt.in)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseConfig(%q) = %v, want an error containing %q", tt.in, err, tt.want)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{"guest.mode=net guest.addr=192.0.2.2/24", "guest.mode=disk guest.disk=/dev/vda", "guest.port=1 guest.timeout=1s", "guest.x", "guest.mode=storm guest.duration=5s guest.tag=0x10000 guest.child_mib=2 guest.child_ms=10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := boot.ParseCmdline(s)
		if err != nil {
			return
		}
		c, err := parseConfig(ps)
		if err != nil {
			return
		}
		if c.port == 0 || c.timeout <= 0 || !strings.HasPrefix(c.disk, "/dev/") || !strings.HasPrefix(c.console, "/dev/") || virtio.CheckIfName(c.iface) != nil {
			t.Fatalf("parseConfig(%q) accepted %+v", s, c)
		}
		if c.mode == modeNet && !c.addr.Addr().Is4() {
			t.Fatalf("parseConfig(%q): net mode without an IPv4 address: %+v", s, c)
		}
		storm := c.duration >= time.Second && c.duration <= time.Hour && c.tag%pageSize == 0 && c.tag >= minTagVA && c.tag < maxTagVA &&
			c.childMiB >= 1 && c.childMiB <= maxChildMiB && c.childMs >= minChildMs && c.childMs <= maxChildMs
		none := c.duration == 0 && c.tag == 0 && c.childMiB == 0 && c.childMs == 0
		if (c.mode == modeStorm && !storm) || (c.mode != modeStorm && !none) {
			t.Fatalf("parseConfig(%q) accepted %+v", s, c)
		}
	})
}

func TestReadDisk(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, 1<<20)
	copy(img, "first line\nsecond")
	copy(img[512<<10:], "at 512K\x00junk")
	if err := os.WriteFile(p, img, 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	c := config{mode: modeDisk, disk: p, timeout: time.Second}
	if err := readDisk(&out, c); err != nil {
		t.Fatal(err)
	}
	want := prefix + `disk ` + p + ` offset 0: "first line"` + "\n" + prefix + `disk ` + p + ` offset 524288: "at 512K"` + "\n"
	if out.String() != want {
		t.Errorf("readDisk printed %q, want %q", out.String(), want)
	}
	c.disk = filepath.Join(t.TempDir(), "none")
	c.timeout = 50 * time.Millisecond
	if err := readDisk(io.Discard, c); err == nil || !strings.Contains(err.Error(), "did not appear") {
		t.Errorf("readDisk(missing) = %v, want a timeout naming the device", err)
	}
}

// TestServe runs serve on the loopback interface of a fresh network
// namespace and connects to it from another thread in that namespace.
func TestServe(t *testing.T) {
	type result struct {
		out string
		err error
	}
	nsReady := make(chan int, 1)
	served := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			nsReady <- -1
			served <- result{err: err}
			return
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			nsReady <- -1
			served <- result{err: err}
			return
		}
		nsReady <- fd
		var out bytes.Buffer
		err = serve(&out, config{mode: modeNet, iface: "lo", addr: netip.MustParsePrefix("127.0.0.1/8"), port: 7777, timeout: 10 * time.Second})
		served <- result{out.String(), err}
	}()
	fd := <-nsReady
	if fd < 0 {
		r := <-served
		t.Skipf("cannot make a network namespace here (needs CAP_SYS_ADMIN): %v", r.err)
	}
	got := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: this thread moves to the namespace
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			got <- result{err: err}
			return
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			conn, err := net.DialTimeout("tcp4", "127.0.0.1:7777", time.Second)
			if err != nil {
				if time.Now().After(deadline) {
					got <- result{err: err}
					return
				}
				time.Sleep(20 * time.Millisecond)
				continue
			}
			b, err := io.ReadAll(conn)
			conn.Close()
			got <- result{string(b), err}
			return
		}
	}()
	r := <-got
	if r.err != nil || r.out != answer {
		t.Errorf("client read %q, %v, want %q", r.out, r.err, answer)
	}
	s := <-served
	if s.err != nil || !strings.Contains(s.out, "listening on 127.0.0.1:7777 (lo)") || !strings.Contains(s.out, "answered 127.0.0.1:") {
		t.Errorf("serve = %v, printed %q", s.err, s.out)
	}
}

func TestServeNoLink(t *testing.T) {
	err := serve(io.Discard, config{mode: modeNet, iface: "nosuch9", addr: netip.MustParsePrefix("192.0.2.2/24"), port: 1, timeout: 50 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "no network interface") {
		t.Errorf("serve(nosuch9) = %v, want no network interface", err)
	}
}

// TestEchoConsole runs echo mode on a pseudo-terminal: the line typed at
// the master after the prompt comes back quoted, through the terminal's
// line discipline (canonical mode, CR LF as the terminal sends it).
func TestEchoConsole(t *testing.T) {
	master, pts := testutil.OpenPTY(t)
	slave := pts.Name()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := echoConsole(pw, config{mode: modeEcho, console: slave, timeout: 10 * time.Second})
		pw.CloseWithError(err)
		done <- err
	}()
	var out bytes.Buffer
	buf := make([]byte, 256)
	for !strings.Contains(out.String(), "\n") {
		n, err := pr.Read(buf)
		out.Write(buf[:n])
		if err != nil {
			t.Fatalf("echo mode printed %q, then %v", out.String(), err)
		}
	}
	if want := boot.EchoPrompt + " on " + slave + "\n"; out.String() != want {
		t.Fatalf("prompt %q, want %q", out.String(), want)
	}
	if _, err := master.Write([]byte("hello there\r")); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(pr)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if want := prefix + `echo: got "hello there"` + "\n"; string(rest) != want {
		t.Errorf("echo printed %q, want %q", rest, want)
	}
}

func TestEchoConsoleTimeout(t *testing.T) {
	_, pts := testutil.OpenPTY(t)
	slave := pts.Name()
	start := time.Now()
	err := echoConsole(io.Discard, config{mode: modeEcho, console: slave, timeout: 100 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "read a line from "+slave) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("echoConsole with nothing typed = %v, want a deadline error", err)
	}
	// It waited for its timeout; how much longer a loaded host took is not
	// its behaviour.
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Errorf("echoConsole gave up after %v, before its 100 ms timeout", d)
	}
	if err := echoConsole(io.Discard, config{mode: modeEcho, console: filepath.Join(t.TempDir(), "none")}); err == nil {
		t.Error("echoConsole on a missing device succeeded")
	}
}

// TestEchoForever: the console loop of guest.mode=kv answers every line
// typed, each after a new prompt, with no time limit.
func TestEchoForever(t *testing.T) {
	master, pts := testutil.OpenPTY(t)
	slave := pts.Name()
	pr, pw := io.Pipe()
	go func() { pw.CloseWithError(echoForever(pw, slave)) }()
	r := bufio.NewReader(pr)
	prompt := boot.EchoPrompt + " on " + slave + "\n"
	for _, line := range []string{"first", "second line", "third"} {
		if got, err := r.ReadString('\n'); err != nil || got != prompt {
			t.Fatalf("before %q: printed %q, %v, want the prompt %q", line, got, err, prompt)
		}
		if _, err := master.Write([]byte(line + "\r")); err != nil {
			t.Fatal(err)
		}
		if got, err := r.ReadString('\n'); err != nil || got != fmt.Sprintf("%secho: got %q\n", prefix, line) {
			t.Fatalf("after %q: printed %q, %v", line, got, err)
		}
	}
	if got, err := r.ReadString('\n'); err != nil || got != prompt {
		t.Fatalf("after the last line: printed %q, %v, want the prompt again", got, err)
	}
	master.Close() // the loop's read fails and it returns
	if _, err := io.ReadAll(r); err == nil || !strings.Contains(err.Error(), "read a line from "+slave) {
		t.Errorf("after the terminal closed: %v, want the read error", err)
	}
}
