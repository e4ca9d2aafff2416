package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/internal/kvclient"
	"golang.org/x/sys/unix"
)

func TestParseConfigKV(t *testing.T) {
	c, err := parseConfig(mustParams(t, "guest.mode=kv guest.addr=192.0.2.2/24 guest.port=7000 guest.disk=/dev/vdb"))
	want := config{mode: modeKV, iface: "eth0", addr: netip.MustParsePrefix("192.0.2.2/24"), port: 7000, disk: "/dev/vdb", console: "/dev/ttyS0", timeout: 60 * time.Second}
	if err != nil || c != want {
		t.Errorf("parseConfig(kv) = %+v, %v, want %+v", c, err, want)
	}
	if m := c.modules(); !slices.Contains(m, "virtio_net") || !slices.Contains(m, "virtio_blk") {
		t.Errorf("kv mode loads %v, want virtio_net and virtio_blk", m)
	}
	if _, err := parseConfig(mustParams(t, "guest.mode=kv guest.disk=/dev/vdb")); err == nil || !strings.Contains(err.Error(), "guest.mode=kv needs guest.addr") {
		t.Errorf("parseConfig(kv without an address) = %v", err)
	}
}

// syncBuffer is a bytes.Buffer that goroutines may write at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func kvDisk(t *testing.T) string {
	p := filepath.Join(t.TempDir(), "vda.img")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestRunKV serves a disk file on loopback twice: what the first run
// acknowledged, the second recovers from the disk; POWEROFF ends each run.
func TestRunKV(t *testing.T) {
	disk := kvDisk(t)
	for round, want := range []string{"formatted: records=0 keys=0", "recovered: records=20 keys=20"} {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		var out syncBuffer
		done := make(chan error, 1)
		go func() { done <- runKV(&out, disk, ln, "lo") }()
		c, err := kvclient.Dial(context.Background(), ln.Addr().String(), kvclient.Options{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			k := fmt.Sprintf("key%d", i)
			if round == 0 {
				if _, err := c.Put(k, "v"+k); err != nil {
					t.Fatal(err)
				}
			} else if v, ok, err := c.Get(k); err != nil || !ok || v != "v"+k {
				t.Errorf("after a restart: Get(%s) = %q, %v, %v", k, v, ok, err)
			}
		}
		if err := c.PowerOff(); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatalf("runKV = %v; printed:\n%s", err, out.String())
		}
		for _, line := range []string{
			prefix + "kv: log on " + disk + " " + want + " capacity=2047 block=4096 direct=true\n",
			prefix + "kv: serving on " + ln.Addr().String() + " (lo) instance=" + c.Hello().Instance + "\n",
			prefix + "kv: connection 1 from 127.0.0.1:",
			prefix + "kv: connection 1 closed after 21 requests: POWEROFF\n",
			prefix + "kv: powering off on request: records=20 keys=20\n",
		} {
			if !strings.Contains(out.String(), line) {
				t.Errorf("round %d printed\n%s\nwithout %q", round, out.String(), line)
			}
		}
	}
}

func TestRunKVRefuses(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := runKV(io.Discard, t.TempDir(), ln, "lo"); err == nil || !strings.HasPrefix(err.Error(), "kv: ") {
		t.Errorf("runKV(a directory) = %v", err)
	}
	err = serveKV(io.Discard, config{mode: modeKV, iface: "nosuch9", addr: netip.MustParsePrefix("192.0.2.2/24"), port: 1, disk: kvDisk(t), timeout: 50 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "no network interface") {
		t.Errorf("serveKV(nosuch9) = %v, want no network interface", err)
	}
}

// TestServeKV runs kv mode whole (interface, disk, service) on the
// loopback interface of a fresh network namespace, as TestServe does.
func TestServeKV(t *testing.T) {
	disk := kvDisk(t)
	nsReady := make(chan int, 1)
	var out syncBuffer
	served := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			nsReady <- -1
			served <- err
			return
		}
		fd, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			nsReady <- -1
			served <- err
			return
		}
		nsReady <- fd
		served <- serveKV(&out, config{mode: modeKV, iface: "lo", addr: netip.MustParsePrefix("127.0.0.1/8"), port: 7777, disk: disk, timeout: 10 * time.Second})
	}()
	fd := <-nsReady
	if fd < 0 {
		t.Skipf("cannot make a network namespace here (needs CAP_SYS_ADMIN): %v", <-served)
	}
	got := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: this thread moves to the namespace
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			got <- err
			return
		}
		c, err := kvclient.Dial(context.Background(), "127.0.0.1:7777", kvclient.Options{RetryFor: 10 * time.Second, RetryEvery: 20 * time.Millisecond})
		if err != nil {
			got <- err
			return
		}
		if _, err := c.Put("in", "namespace"); err != nil {
			got <- err
			return
		}
		if v, err := c.Verify(); err != nil || !v.OK(1) {
			got <- fmt.Errorf("Verify() = %+v, %v", v, err)
			return
		}
		got <- c.PowerOff()
	}()
	if err := <-got; err != nil {
		t.Error(err)
	}
	if err := <-served; err != nil || !strings.Contains(out.String(), "kv: serving on 127.0.0.1:7777 (lo)") {
		t.Errorf("serveKV = %v, printed:\n%s", err, out.String())
	}
}
