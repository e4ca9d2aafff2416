// Package wan emulates a slow, distant network link with real kernel
// networking, for tests and benchmarks that put a backup far from the
// intermediary (issue #6): a bandwidth limit from `tc ... tbf` and a round
// trip from a delaying TCP relay. It is test tooling: nothing in the
// product's data path imports it.
//
// # Topology
//
//	host network namespace                       namespace us-wan-<slot>-<pid>[-<name>]
//	client ──► relay 127.0.0.1:port ──► uwh<slot> ══ veth ══ uwn<slot> ──► server
//	           (RTT/2 each way)        10.213.x.y+1          10.213.x.y+2
//	                                   tbf egress            tbf egress
//
// New creates the namespace and a veth pair with one end in it, gives the
// pair a /30 from 10.213.0.0/16 (slot s uses 10.213.0.0 + 4s; host end .1,
// namespace end .2), raises both ends and the namespace's loopback, and
// shapes the egress of each end with a tbf qdisc at Config.RateMbit, so both
// directions are limited. The host kernel here has no netem (no delay
// qdisc), so the delay comes from Link.Relay: a TCP relay on the host that
// forwards each accepted connection to a server inside the namespace over
// the veth pair and releases every chunk it reads RTT/2 after it arrived,
// in order, in each direction, end-of-stream included. Each direction of a
// relayed connection holds at most Config.RelayQueueBytes; beyond that the
// relay stops reading and TCP backpressure reaches the sender, so memory is
// bounded and the shaper, not the relay, sets the throughput (the default
// queue is twice the bandwidth-delay product). Inside the appliance under
// QEMU, netem is available and tests there may use it instead.
//
// Link.Command runs a program inside the namespace (`ip netns exec`), for
// example a backup listening on NSAddr:
//
//	l, err := wan.New(wan.Config{RateMbit: 100, RTT: 40 * time.Millisecond})
//	if errors.Is(err, wan.ErrNoPrivilege) {
//		t.Skip(err)
//	}
//	...
//	t.Cleanup(func() { l.Close() })
//	backup := l.Command(bin, "backup", "--listen", "tcp://"+l.NSAddr().String()+":7000")
//	... start it, wait until it listens ...
//	addr, err := l.Relay(l.NSAddr().String() + ":7000")
//	// the intermediary on the host connects to addr
//
// A process may instead enter the namespace on a locked OS thread with
// setns(2) on /run/netns/<Namespace()>, listen there, and return.
//
// # Requirements
//
// Root with CAP_SYS_ADMIN and CAP_NET_ADMIN, and `ip` and `tc` (iproute2;
// .ci/run installs it), and the kernel's veth and sch_tbf. New returns an
// error wrapping ErrNoPrivilege when the effective uid is not 0, or when
// `ip netns add` fails with "Operation not permitted" (for example root of
// an unprivileged user namespace or container); tests skip then, and only
// then. Missing tools wrap ErrMissingTool; every other failure is an error
// that quotes the failing command and its output.
//
// # Names, coexistence and cleanup
//
// Namespaces are named us-wan-<slot>-<pid>[-<Config.Name>], the veth ends
// uwh<slot> (host) and uwn<slot> (namespace). New holds an flock on
// /run/lock/understudy-wan.lock (not /run/netns: `ip netns add` locks that
// itself) while it picks the lowest slot whose /30 overlaps no address on
// the host's interfaces and whose number no us-wan- namespace or uwh
// interface uses, and creates the link, so links in one process or in
// several coexist. Close stops the relays and their connections, kills any
// process still in the namespace, deletes the veth pair and the namespace;
// it is idempotent. A process killed before Close leaves its namespace
// behind: the next New, in any process, removes every us-wan- namespace
// whose creating pid no longer exists (together with its veth pair and the
// processes still in it). A reused pid keeps a stale namespace alive until
// that pid exits; `ip netns list` shows any leftovers and
// `ip netns del <name>` removes one by hand.
//
// # What is and is not emulated
//
// The relay terminates TCP on both sides (like a performance-enhancing
// proxy): each byte sees the round trip, but TCP's congestion control does
// not; a window-limited sender behaves as on a short link with a delay
// line. Connection setup is not delayed, only data and end-of-stream.
// There is no loss or jitter beyond what the shaper's queue
// (Config.ShaperQueueBytes) causes. tbf counts whole Ethernet frames, so a
// TCP stream's goodput is RateMbit × 1448/1514 (about 95.6 Mbit/s at 100).
// Connections start from the host (the relay listens on 127.0.0.1); a
// server in the namespace reaching the host over HostAddr crosses the shaper
// but no delay.
//
// Measured on the development host (2 cores, kernel 6.18): 95.6 Mbit/s in
// each direction at RateMbit 100, and a 40.6 ms median round trip at RTT
// 40 ms. BenchmarkLink prints
//
//	bench wan-link: rate_mbit=100 measured_mbit=X rtt_ms=40 measured_rtt_ms=Y
//
// when run as go test -run '^$' -bench . -benchtime 1x ./internal/wan/.
package wan
