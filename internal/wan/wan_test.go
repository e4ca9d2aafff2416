package wan

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestThroughput sends through the relay into the namespace and back out of
// it, each for 2.5 s: the shaper holds each direction to its rate (+15% for
// the token bucket's burst and the timing of the ends). How close to the
// rate a stream gets depends on the host's load: that figure is the
// measured_mbit of BenchmarkLink's line.
func TestThroughput(t *testing.T) {
	const rate = 100
	l := newLink(t, Config{RateMbit: rate, RTT: 40 * time.Millisecond})
	srv, _ := startServer(t, l)
	addr, err := l.Relay(srv)
	if err != nil {
		t.Fatal(err)
	}
	check := func(dir string, got float64) {
		t.Logf("%s: %.1f Mbit/s at a %d Mbit/s setting", dir, got, rate)
		if got <= 0 || got > 1.15*rate {
			t.Errorf("%s: %.1f Mbit/s, want some and at most %d + 15%%", dir, got, rate)
		}
	}
	up, sent := sinkRate(t, addr, 2500*time.Millisecond)
	check("host to namespace", up)
	check("namespace to host", sourceRate(t, addr, 2500*time.Millisecond))
	if st := l.Stats(); st.Conns != 2 || st.BytesToNS < uint64(sent)+1 || st.BytesFromNS == 0 {
		t.Errorf("Stats() = %+v, want 2 connections and at least %d bytes to the namespace", st, sent+1)
	}
}

// TestRTT times small request/response exchanges through the relay: each
// takes at least the configured round trip. How little more it takes
// depends on the host's load: that figure is the measured_rtt_ms of
// BenchmarkLink's line.
func TestRTT(t *testing.T) {
	const rtt = 40 * time.Millisecond
	l := newLink(t, Config{RateMbit: 100, RTT: rtt})
	srv, _ := startServer(t, l)
	addr, err := l.Relay(srv)
	if err != nil {
		t.Fatal(err)
	}
	d := rtts(t, addr, 9)
	m := median(d)
	t.Logf("RTT median %v of %v", m, d)
	// The relay never releases a byte early, so rtt is a hard lower bound.
	for _, x := range d {
		if x < rtt {
			t.Errorf("an exchange took %v, less than the RTT %v", x, rtt)
		}
	}
}

func netnsList(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	return string(out)
}

func hasNS(list, name string) bool {
	for _, line := range strings.Split(list, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}

// TestTwoLinks creates two links at once, checks they do not share names or
// addresses and each adds at least its own RTT, then closes one while the other keeps
// working, and checks Close leaves nothing behind.
func TestTwoLinks(t *testing.T) {
	cfgs := []Config{{RateMbit: 100, RTT: 20 * time.Millisecond, Name: "a"}, {RateMbit: 50, RTT: 60 * time.Millisecond, Name: "b"}}
	links := make([]*Link, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range links {
		wg.Go(func() { links[i], errs[i] = New(cfgs[i]) })
	}
	wg.Wait()
	for i, l := range links {
		if l != nil {
			t.Cleanup(func() { l.Close() })
		}
		if errors.Is(errs[i], ErrNoPrivilege) {
			t.Skipf("needs network namespaces: %v", errs[i])
		}
		if errs[i] != nil {
			t.Fatalf("New(%+v): %v", cfgs[i], errs[i])
		}
	}
	a, b := links[0], links[1]
	if a.Namespace() == b.Namespace() || a.NSAddr() == b.NSAddr() || a.HostAddr() == b.HostAddr() || a.hostIf == b.hostIf {
		t.Fatalf("links share a name or address: %s %s %s, %s %s %s", a.Namespace(), a.HostAddr(), a.NSAddr(), b.Namespace(), b.HostAddr(), b.NSAddr())
	}
	if !strings.HasSuffix(a.Namespace(), "-a") || !strings.HasPrefix(a.Namespace(), NSPrefix) {
		t.Errorf("Namespace() = %q, want %s...-a", a.Namespace(), NSPrefix)
	}
	list := netnsList(t)
	if !hasNS(list, a.Namespace()) || !hasNS(list, b.Namespace()) {
		t.Fatalf("ip netns list = %q, want %s and %s", list, a.Namespace(), b.Namespace())
	}
	addrs := make([]string, 2)
	cmds := make([]*exec.Cmd, 2)
	for i, l := range links {
		srv, cmd := startServer(t, l)
		cmds[i] = cmd
		r, err := l.Relay(srv)
		if err != nil {
			t.Fatal(err)
		}
		addrs[i] = r
		for _, x := range rtts(t, r, 5) {
			if x < cfgs[i].RTT {
				t.Errorf("link %s: an exchange took %v, less than its RTT %v", l.Namespace(), x, cfgs[i].RTT)
			}
		}
	}
	// The namespaces are separate: b's has no address of a's.
	if out, err := b.Command("ip", "-4", "-o", "addr").Output(); err != nil || strings.Contains(string(out), a.NSAddr().String()+"/") {
		t.Errorf("ip addr in %s: %v\n%s\nwant no %s", b.Namespace(), err, out, a.NSAddr())
	}

	// A connection open through a's relay ends when a closes.
	open := dial(t, addrs[0])
	defer open.Close()
	if err := a.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := a.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	open.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := open.Read(make([]byte, 1)); err == nil {
		t.Errorf("read on a relayed connection after Close = %d bytes, want an error", n)
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Errorf("relayed connection still open after Close")
	}
	if c, err := net.DialTimeout("tcp4", addrs[0], time.Second); err == nil {
		c.Close()
		t.Errorf("relay %s still accepts after Close", addrs[0])
	}
	if list := netnsList(t); hasNS(list, a.Namespace()) || !hasNS(list, b.Namespace()) {
		t.Errorf("ip netns list after closing %s = %q", a.Namespace(), list)
	}
	if _, err := net.InterfaceByName(a.hostIf); err == nil {
		t.Errorf("veth %s still exists after Close", a.hostIf)
	}
	// Close killed the server that ran in a's namespace.
	done := make(chan error, 1)
	go func() { done <- cmds[0].Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Errorf("the server in %s still runs after Close", a.Namespace())
	}
	if _, err := a.Relay(a.NSAddr().String() + ":1"); err == nil {
		t.Errorf("Relay after Close succeeded")
	}

	// b is unaffected.
	if m := median(rtts(t, addrs[1], 3)); m < cfgs[1].RTT {
		t.Errorf("link b after closing a: RTT %v, want at least %v", m, cfgs[1].RTT)
	}
}

// TestStaleRemoved leaves a namespace and veth pair as a process that died
// without Close would, and checks that New removes them.
func TestStaleRemoved(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (effective uid 0) to create network namespaces")
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	pid := dead.Process.Pid
	if processExists(pid) {
		t.Skipf("pid %d was reused at once", pid)
	}
	const slot = slots - 1
	ns, hostIf := nsName(slot, pid, "stale"), hostIfPrefix+strconv.Itoa(slot)
	for _, argv := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", hostIf, "type", "veth", "peer", "name", nsIfPrefix + strconv.Itoa(slot), "netns", ns},
	} {
		if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
			exec.Command("ip", "netns", "del", ns).Run()
			t.Fatalf("%v: %v: %s", argv, err, out)
		}
	}
	t.Cleanup(func() { removeNS("ip", ns, hostIf) })
	// A namespace of a live process with our prefix must survive.
	live := nsName(slot-1, os.Getpid(), "live")
	if out, err := exec.Command("ip", "netns", "add", live).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", live, err, out)
	}
	t.Cleanup(func() { removeNS("ip", live, hostIfPrefix+strconv.Itoa(slot-1)) })

	newLink(t, Config{RateMbit: 10})
	list := netnsList(t)
	if hasNS(list, ns) {
		t.Errorf("stale namespace %s survived New: %q", ns, list)
	}
	if _, err := net.InterfaceByName(hostIf); err == nil {
		t.Errorf("stale veth %s survived New", hostIf)
	}
	if !hasNS(list, live) {
		t.Errorf("namespace %s of a live process was removed", live)
	}
}

// TestUnprivileged runs New in a process without the privilege to create
// network namespaces and checks it gets ErrNoPrivilege: as uid 65534, and as
// root of a new user namespace (which lacks CAP_SYS_ADMIN over the host's
// mounts, so `ip netns add` fails with EPERM).
func TestUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		// This process itself is the unprivileged case.
		_, err := New(Config{RateMbit: 10})
		if err == nil || !strings.Contains(err.Error(), "effective uid") {
			t.Fatalf("New as uid %d: %v, want ErrNoPrivilege", os.Geteuid(), err)
		}
		return
	}
	// The child runs the test binary through a descriptor, so that it needs
	// no search permission on the directories above it.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, tc := range []struct {
		name string
		attr *syscall.SysProcAttr
		want string
	}{
		{"uid 65534", &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}, "effective uid 65534"},
		{"root of a user namespace", &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER,
			UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}},
			GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: 0, Size: 1}}}, "Operation not permitted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command("/proc/self/fd/3")
			cmd.ExtraFiles = []*os.File{f}
			cmd.Env = append(os.Environ(), helperEnv+"=new")
			cmd.SysProcAttr = tc.attr
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				// The host forbids the child's credentials (for
				// example user namespaces are disabled): there is
				// nothing to check.
				t.Skipf("starting the child: %v", err)
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("%v: %s", err, out.String())
			}
			s := out.String()
			t.Logf("%s", strings.TrimSpace(s))
			if !strings.HasPrefix(s, "noprivilege=true ") || !strings.Contains(s, tc.want) {
				t.Errorf("New said %q, want ErrNoPrivilege mentioning %q", s, tc.want)
			}
		})
	}
}

func TestRelayTargetChecked(t *testing.T) {
	l := newLink(t, Config{RateMbit: 10})
	for _, target := range []string{"127.0.0.1:80", l.HostAddr().String() + ":80", l.NSAddr().String(), l.NSAddr().String() + ":0", "[::1]:80", "localhost:80"} {
		if _, err := l.Relay(target); err == nil {
			t.Errorf("Relay(%q) succeeded, want an error", target)
		}
	}
}

// BenchmarkLink measures a 100 Mbit/s, 40 ms link through its relay and
// prints one result line.
func BenchmarkLink(b *testing.B) {
	const rate, rtt = 100, 40 * time.Millisecond
	l := newLink(b, Config{RateMbit: rate, RTT: rtt})
	srv, _ := startServer(b, l)
	addr, err := l.Relay(srv)
	if err != nil {
		b.Fatal(err)
	}
	var mbit float64
	var r time.Duration
	for b.Loop() {
		mbit, _ = sinkRate(b, addr, 2500*time.Millisecond)
		r = median(rtts(b, addr, 9))
	}
	fmt.Printf("bench wan-link: rate_mbit=%d measured_mbit=%.1f rtt_ms=%d measured_rtt_ms=%.1f\n",
		rate, mbit, rtt.Milliseconds(), float64(r)/1e6)
}
