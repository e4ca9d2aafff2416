package wan_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/understudy-vmm/understudy/internal/wan"
)

// listenIn opens a TCP listener inside the network namespace ns: a socket
// belongs to the namespace of the thread that created it.
func listenIn(ns, addr string) (net.Listener, error) {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer self.Close()
	target, err := os.Open("/run/netns/" + ns)
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	ln, lerr := net.Listen("tcp4", addr)
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: it dies with this goroutine.
		return nil, errors.Join(lerr, err)
	}
	runtime.UnlockOSThread()
	return ln, lerr
}

// ExampleNew builds a 100 Mbit/s link with a 40 ms round trip, serves a
// greeting inside its namespace and fetches it through the delaying relay.
// A real test would start its server with Link.Command instead.
func ExampleNew() {
	l, err := wan.New(wan.Config{RateMbit: 100, RTT: 40 * time.Millisecond, Name: "example"})
	if errors.Is(err, wan.ErrNoPrivilege) {
		fmt.Println("skipped:", err)
		return
	}
	if err != nil {
		panic(err)
	}
	defer l.Close()

	ln, err := listenIn(l.Namespace(), l.NSAddr().String()+":0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.WriteString(c, "hello")
			c.Close()
		}
	}()

	addr, err := l.Relay(ln.Addr().String())
	if err != nil {
		panic(err)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		panic(err)
	}
	defer c.Close()
	t0 := time.Now()
	b, _ := io.ReadAll(c)
	fmt.Printf("%q after %v or more\n", b, time.Since(t0).Truncate(10*time.Millisecond))
}
