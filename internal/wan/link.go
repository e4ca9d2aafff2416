package wan

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNoPrivilege reports that this process may not create network
// namespaces: it does not run as root (effective uid 0), or `ip netns add`
// failed with "Operation not permitted" (root without CAP_SYS_ADMIN, as in an
// unprivileged container). Tests skip when errors.Is(err, ErrNoPrivilege).
var ErrNoPrivilege = errors.New("wan: creating a network namespace needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN")

// ErrMissingTool reports that `ip` or `tc` (Debian package iproute2) is not
// installed.
var ErrMissingTool = errors.New("wan: ip and tc from iproute2 are required")

// The names and addresses links use. See the package documentation.
const (
	// NSPrefix starts the name of every namespace New creates.
	NSPrefix = "us-wan-"
	// hostIfPrefix and nsIfPrefix start the veth ends' names, followed by
	// the link's slot number (at most 5 digits: within IFNAMSIZ).
	hostIfPrefix = "uwh"
	nsIfPrefix   = "uwn"
	// netnsDir is where iproute2 keeps named namespaces.
	netnsDir = "/run/netns"
)

// wanNet is the block links take their /30 subnets from: 10.213.0.0/16,
// 16384 slots. Slot s uses 10.213.0.0 + 4s: host end .1, namespace end .2.
var wanNet = netip.MustParsePrefix("10.213.0.0/16")

// slots is the number of /30 subnets in wanNet.
const slots = 1 << (32 - 16 - 2)

// Link is one emulated WAN link: a network namespace joined to the host by a
// shaped veth pair, plus the delaying relays started on it. Its methods are
// safe for concurrent use.
type Link struct {
	cfg      Config
	ns       string // namespace name
	slot     int
	hostIf   string
	nsIf     string
	hostAddr netip.Addr
	nsAddr   netip.Addr
	ip, tc   string // tool paths
	stats    counters

	// mu guards relays and closed.
	mu     sync.Mutex
	relays []*relay
	closed bool
}

// New creates the namespace, the veth pair and the shapers of a link
// described by cfg. The caller must Close it. Stale namespaces left by
// processes that died without closing their links are removed first.
func New(cfg Config) (*Link, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if euid := os.Geteuid(); euid != 0 {
		return nil, fmt.Errorf("%w: running as effective uid %d", ErrNoPrivilege, euid)
	}
	ipPath, err := lookTool("ip")
	if err != nil {
		return nil, err
	}
	tcPath, err := lookTool("tc")
	if err != nil {
		return nil, err
	}

	unlock, err := lockNetns()
	if err != nil {
		return nil, err
	}
	defer unlock()

	removeStale(ipPath)
	slot, err := freeSlot()
	if err != nil {
		return nil, err
	}
	base := wanNet.Addr().As4()
	off := slot * 4
	base[2], base[3] = byte(off>>8), byte(off)
	host, nsa := base, base
	host[3]++
	nsa[3] += 2
	l := &Link{
		cfg:      cfg,
		ns:       nsName(slot, os.Getpid(), cfg.Name),
		slot:     slot,
		hostIf:   hostIfPrefix + strconv.Itoa(slot),
		nsIf:     nsIfPrefix + strconv.Itoa(slot),
		hostAddr: netip.AddrFrom4(host),
		nsAddr:   netip.AddrFrom4(nsa),
		ip:       ipPath,
		tc:       tcPath,
	}
	if err := l.setUp(); err != nil {
		l.tearDown()
		return nil, err
	}
	return l, nil
}

// setUp creates the namespace and the veth pair, addresses and raises both
// ends, and shapes each end's egress.
func (l *Link) setUp() error {
	if out, err := exec.Command(l.ip, "netns", "add", l.ns).CombinedOutput(); err != nil {
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "Operation not permitted") {
			return fmt.Errorf("%w: ip netns add %s: %s", ErrNoPrivilege, l.ns, msg)
		}
		return fmt.Errorf("wan: ip netns add %s: %w: %s", l.ns, err, msg)
	}
	prefix := "/30"
	steps := [][]string{
		// Creating the pair with its peer already in the namespace leaves
		// no veth behind on the host if we die half-way: deleting the
		// namespace deletes both ends.
		{l.ip, "link", "add", l.hostIf, "type", "veth", "peer", "name", l.nsIf, "netns", l.ns},
		{l.ip, "addr", "add", l.hostAddr.String() + prefix, "dev", l.hostIf},
		{l.ip, "-n", l.ns, "addr", "add", l.nsAddr.String() + prefix, "dev", l.nsIf},
		{l.ip, "link", "set", l.hostIf, "up"},
		{l.ip, "-n", l.ns, "link", "set", l.nsIf, "up"},
		{l.ip, "-n", l.ns, "link", "set", "lo", "up"},
		append([]string{l.tc}, l.tbfArgs(l.hostIf)...),
		append([]string{l.tc, "-n", l.ns}, l.tbfArgs(l.nsIf)...),
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return err
		}
	}
	return nil
}

// tbfArgs are the tc arguments that shape dev's egress to the link's rate.
func (l *Link) tbfArgs(dev string) []string {
	return []string{"qdisc", "replace", "dev", dev, "root", "tbf",
		"rate", strconv.FormatInt(int64(l.cfg.RateMbit*1e6), 10) + "bit",
		"burst", strconv.Itoa(l.cfg.BurstBytes),
		"limit", strconv.Itoa(l.cfg.ShaperQueueBytes)}
}

// Close stops the relays (closing their connections), kills every process
// still running in the namespace, deletes the veth pair and the namespace.
// It is idempotent; later calls return nil.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	relays := l.relays
	l.relays = nil
	l.mu.Unlock()
	for _, r := range relays {
		r.close()
	}
	return l.tearDown()
}

// tearDown removes whatever setUp created; missing pieces are no error.
func (l *Link) tearDown() error {
	return removeNS(l.ip, l.ns, l.hostIf)
}

// removeNS kills the processes in namespace ns, deletes the host veth end
// hostIf (and with it its peer) and deletes the namespace. Pieces that do not
// exist are skipped.
func removeNS(ipPath, ns, hostIf string) error {
	var errs []error
	if _, err := os.Stat(netnsDir + "/" + ns); err == nil {
		if out, err := exec.Command(ipPath, "netns", "pids", ns).Output(); err == nil {
			for _, f := range strings.Fields(string(out)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
					// ESRCH (already gone) is what we want anyway.
					_ = unix.Kill(pid, unix.SIGKILL)
				}
			}
		}
	}
	if _, err := net.InterfaceByName(hostIf); err == nil {
		if err := run(ipPath, "link", "del", hostIf); err != nil {
			errs = append(errs, err)
		}
	}
	if _, err := os.Stat(netnsDir + "/" + ns); err == nil {
		if err := run(ipPath, "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Relay starts a delaying relay to target, an IP:port inside the namespace
// whose IP is NSAddr, and returns the host address it listens on
// (127.0.0.1:port). Every connection accepted there is connected to target
// through the shaped veth pair; bytes in each direction leave the relay
// RTT/2 after they reached it, in order, and end-of-stream (a half-close)
// is delayed the same way. The relay holds at most RelayQueueBytes per
// connection and direction and otherwise lets TCP backpressure act. The dial
// to target is not delayed. The relay runs until Close.
func (l *Link) Relay(target string) (string, error) {
	ap, err := netip.ParseAddrPort(target)
	if err != nil {
		return "", fmt.Errorf("wan: relay target %q: want IP:port: %w", target, err)
	}
	if ap.Addr() != l.nsAddr || ap.Port() == 0 {
		return "", fmt.Errorf("wan: relay target %s: want %s:port (the namespace end), or traffic would not cross the shaped link", target, l.nsAddr)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return "", fmt.Errorf("wan: relay to %s: link %s is closed", target, l.ns)
	}
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("wan: relay to %s: %w", target, err)
	}
	r := newRelay(ln, target, l.cfg.RTT/2, l.cfg.RelayQueueBytes, &l.stats)
	l.relays = append(l.relays, r)
	return r.addr(), nil
}

// Command returns a command that runs name with args inside the namespace
// (`ip netns exec NS name args...`; ip execs name in place, so the
// command's process is name's). The process is killed when the Go thread
// that started it exits (Pdeathsig) and at the latest by Close.
func (l *Link) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(l.ip, append([]string{"netns", "exec", l.ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// NSAddr is the namespace end's IPv4 address; a server in the namespace
// listens there.
func (l *Link) NSAddr() netip.Addr { return l.nsAddr }

// HostAddr is the host end's IPv4 address; the namespace reaches the host
// there (without delay: relays run host-to-namespace only).
func (l *Link) HostAddr() netip.Addr { return l.hostAddr }

// Namespace is the network namespace's name, as `ip netns list` shows it.
func (l *Link) Namespace() string { return l.ns }

// Config is the link's configuration with defaults filled in.
func (l *Link) Config() Config { return l.cfg }

// Stats is what the link's relays have carried so far.
func (l *Link) Stats() Stats { return l.stats.snapshot() }

// nsName is the namespace name of a link in slot created by pid.
func nsName(slot, pid int, label string) string {
	n := NSPrefix + strconv.Itoa(slot) + "-" + strconv.Itoa(pid)
	if label != "" {
		n += "-" + label
	}
	return n
}

// parseNSName is the inverse of nsName without the label; ok is false for
// names that New did not make.
func parseNSName(name string) (slot, pid int, ok bool) {
	rest, found := strings.CutPrefix(name, NSPrefix)
	if !found {
		return 0, 0, false
	}
	parts := strings.SplitN(rest, "-", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	slot, err1 := strconv.Atoi(parts[0])
	pid, err2 := strconv.Atoi(parts[1])
	if err1 != nil || err2 != nil || slot < 0 || slot >= slots || pid <= 0 || strconv.Itoa(slot) != parts[0] || strconv.Itoa(pid) != parts[1] {
		return 0, 0, false
	}
	return slot, pid, true
}

// lookTool finds an iproute2 tool in PATH or in the sbin directories that a
// non-login root shell may lack in PATH.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		p := d + "/" + name
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: %s not found in PATH or /usr/sbin, /sbin (install iproute2)", ErrMissingTool, name)
}

// lockPath is the lock file that serializes New and stale cleanup across
// processes. It is not /run/netns itself: `ip netns add` flocks that
// directory, and New runs it while holding this lock.
const lockPath = "/run/lock/understudy-wan.lock"

// lockNetns takes an exclusive flock on lockPath, so that stale-namespace
// cleanup and slot choice in concurrent processes do not race. The returned
// function releases it. The kernel releases it too when the process dies.
func lockNetns() (func(), error) {
	if err := os.MkdirAll(filepath.Dir(lockPath), 0o755); err != nil {
		return nil, fmt.Errorf("wan: lock: %w", err)
	}
	f, err := os.OpenFile(lockPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("wan: lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("wan: lock %s: %w", lockPath, err)
	}
	return func() { f.Close() }, nil // closing the only descriptor releases the flock
}

// removeStale deletes the namespaces (and veth pairs) of links whose creating
// process no longer exists. It runs under lockNetns. Failures are ignored: a
// stale namespace that cannot be removed only keeps its slot busy.
func removeStale(ipPath string) {
	ents, err := os.ReadDir(netnsDir)
	if err != nil {
		return
	}
	for _, e := range ents {
		slot, pid, ok := parseNSName(e.Name())
		if !ok || pid == os.Getpid() || processExists(pid) {
			continue
		}
		_ = removeNS(ipPath, e.Name(), hostIfPrefix+strconv.Itoa(slot))
	}
}

// processExists reports whether pid names a live process (kill(pid, 0)
// succeeds or is refused for lack of permission).
func processExists(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || err == unix.EPERM
}

// freeSlot picks the lowest slot whose /30 overlaps no address or network on
// the host's interfaces, whose host interface name is free and whose number
// no namespace in /run/netns uses. It runs under lockNetns.
func freeSlot() (int, error) {
	busy := make([]bool, slots)
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if slot, _, ok := parseNSName(e.Name()); ok {
				busy[slot] = true
			}
		}
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return 0, fmt.Errorf("wan: listing host addresses: %w", err)
	}
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		ones, _ := ipn.Mask.Size()
		p := netip.PrefixFrom(ip, ones).Masked()
		if !p.Overlaps(wanNet) {
			continue
		}
		if p.Bits() <= wanNet.Bits() {
			return 0, fmt.Errorf("wan: the host network %s covers %s, which links take their addresses from", p, wanNet)
		}
		// Mark every slot p overlaps.
		first := slotOf(p.Addr())
		n := 1
		if p.Bits() < 30 {
			n = 1 << (30 - p.Bits())
		}
		for s := first; s < first+n && s < slots; s++ {
			busy[s] = true
		}
	}
	for s := range slots {
		if busy[s] {
			continue
		}
		if _, err := net.InterfaceByName(hostIfPrefix + strconv.Itoa(s)); err == nil {
			continue
		}
		return s, nil
	}
	return 0, fmt.Errorf("wan: all %d /30 subnets of %s are in use", slots, wanNet)
}

// slotOf is the slot whose /30 holds a, an address in wanNet.
func slotOf(a netip.Addr) int {
	b := a.As4()
	return (int(b[2])<<8 | int(b[3])) / 4
}

// run runs a tool and turns a failure into an error that quotes the command
// line and its output.
func run(argv ...string) error {
	var out bytes.Buffer
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("wan: %s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}
