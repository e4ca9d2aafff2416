package appliance

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Limits on what the command line may ask for.
const (
	maxTaps    = 8
	maxPorts   = 8
	maxThen    = 8
	maxArgs    = 256
	maxTimeout = 24 * time.Hour
)

// Help describes the kernel command line options, for `understudy
// appliance --help`.
const Help = `A node of a cluster gets its role, its flags and its keys from a config disk
(understudy node-config): a read-only virtio disk the uinit finds by its magic,
checks, and unpacks into /` + RunDir + ` (keys in /` + KeysDir + `, files as
/` + RunDir + `/NAME); it then runs "understudy ROLE --keys /` + KeysDir + ` --name NAME FLAGS".
With a config disk, understudy.role= may be left out or must name the disk's role,
and understudy.args= must be left out: the kernel command line is world-readable
and carries no secrets.

The role and its options come from the kernel command line:
  understudy.role=ROLE         run, intermediary, backup or test (required without
                               a config disk)
  understudy.args="ARGS"       run, intermediary, backup without a config disk: the
                               role's flags, as for "understudy ROLE ARGS"; group words
                               with single quotes
  understudy.exec="CMD ARGS"   test: a command to run ("understudy" is this binary);
                               without it, test only reports and ends
  understudy.then="CMD ARGS"   test: a command to run once the previous one exited 0
                               (repeatable, in order; each with the timeout)
  understudy.with="CMD ARGS"   test: a command to run beside the others from the start
                               (a client of the nested guest, say); the role waits for
                               it, stops it if the others fail, and fails if it fails
  understudy.timeout=DUR       test: stop each command after DUR (default 10m)
  understudy.probe=tcp:A:P     test: while the command runs, connect to A:P until
                               it answers, and print the answer's first line
  understudy.testdisk=PATH:TEXT  test: create a 1 MiB file PATH with TEXT at offset 0
                               and TEXT@524288 at 512 KiB, before the command runs
  understudy.stdin=TEXT        test: each command's stdin is a pipe; once its output
                               shows a nested guest waiting for a line ("` + boot.EchoPrompt + `",
                               or a restore's "` + boot.RestoredLine + `..."),
                               write TEXT and a newline to it
  understudy.signal="SIG:TEXT"  test: send SIG (USR1, USR2, HUP, INT or TERM) to the command
                               once its output has a line containing TEXT (1..128
                               printable ASCII characters)
  understudy.tap=NAME[,A/N]    create tap device NAME (with IPv4 address A/N), up;
                               repeatable
  understudy.bridge=BR:P[+P...][,A/N]
                               after the taps, create bridge BR with ports P (taps,
                               or the node's NIC eth0, waited for), give BR the IPv4
                               address A/N and set it all up: a nested guest on a
                               tap port is then on the node's Ethernet segment
  understudy.modules=M,M|none  modules to load instead of the image's list
  understudy.failpoint=STAGE@EPOCH
                               fault injection, for tests: the role's command (run,
                               intermediary, backup; test: exec and then, not with)
                               gets UNDERSTUDY_FAILPOINT=STAGE@EPOCH in its
                               environment, which makes a primary die (or corrupt a
                               checkpoint) at STAGE of epoch EPOCH; never in production
`

// config is what the kernel command line asks of the appliance.
type config struct {
	role     string
	args     []string   // role's flags, or test's command
	then     [][]string // test: commands to run after it, in order
	with     []string   // test: a command to run beside them; nil: none
	modules  []string   // nil: the image's list
	noMods   bool       // understudy.modules=none
	taps     []tapSpec
	bridge   *bridgeSpec    // nil: none
	probe    netip.AddrPort // valid when asked for
	testDisk *testDisk
	stdin    string      // "": the command's stdin is /dev/null
	failpt   string      // understudy.failpoint: the role's UNDERSTUDY_FAILPOINT; "": none
	signal   *signalSpec // nil: none
	timeout  time.Duration
	once     map[string]bool // the options given (but tap and then)
	disk     string          // the config disk the role's flags come from; "": none
	noDisk   string          // why there is none, for the error without a role
}

type tapSpec struct {
	name string
	addr netip.Prefix // invalid: no address
}

// bridgeSpec is a bridge to make: its ports and its own address.
type bridgeSpec struct {
	name  string
	ports []string
	addr  netip.Prefix // invalid: no address
}

// signalSpec is a signal to send the command once its output shows text.
type signalSpec struct {
	sig  syscall.Signal
	name string // "USR1"
	text string
}

// signals are the signals understudy.signal may send.
var signals = map[string]syscall.Signal{"USR1": syscall.SIGUSR1, "USR2": syscall.SIGUSR2, "HUP": syscall.SIGHUP, "INT": syscall.SIGINT, "TERM": syscall.SIGTERM}

// testDisk is a test disk to write (see boot.TestDiskOffsets).
type testDisk struct{ path, text string }

// parseConfig reads the understudy.* parameters of the kernel command line
// and checks them together (check). Everything else is the kernel's or
// u-root's and is ignored.
func parseConfig(ps boot.Params) (config, error) {
	c, err := parseParams(ps)
	if err != nil {
		return c, err
	}
	return c, c.check()
}

// parseParams reads the understudy.* parameters one by one; check then
// looks at them together, once the role is known (a config disk may name it).
func parseParams(ps boot.Params) (config, error) {
	c := config{timeout: 10 * time.Minute, once: map[string]bool{}}
	once := c.once
	for _, p := range ps.WithPrefix("understudy.") {
		if p.Key != "tap" && p.Key != "then" {
			if once[p.Key] {
				return c, fmt.Errorf("understudy.%s given twice", p.Key)
			}
			once[p.Key] = true
		}
		if !p.HasValue || strings.TrimSpace(p.Value) == "" {
			return c, fmt.Errorf("understudy.%s needs a value", p.Key)
		}
		v := p.Value
		var err error
		switch p.Key {
		case "role":
			switch v {
			case "run", "intermediary", "backup", "test":
				c.role = v
			default:
				return c, fmt.Errorf("understudy.role=%q: want run, intermediary, backup or test", v)
			}
		case "args", "exec":
			if c.args, err = splitArgs(v); err != nil {
				return c, fmt.Errorf("understudy.%s: %w", p.Key, err)
			}
		case "with":
			if c.with, err = splitArgs(v); err != nil {
				return c, fmt.Errorf("understudy.with: %w", err)
			}
			if len(c.with) == 0 || c.with[0] == "" {
				return c, errors.New("understudy.with needs a command")
			}
		case "then":
			if len(c.then) == maxThen {
				return c, fmt.Errorf("understudy.then: more than %d commands", maxThen)
			}
			argv, err := splitArgs(v)
			if err != nil {
				return c, fmt.Errorf("understudy.then: %w", err)
			}
			if len(argv) == 0 || argv[0] == "" {
				return c, errors.New("understudy.then needs a command")
			}
			c.then = append(c.then, argv)
		case "timeout":
			c.timeout, err = time.ParseDuration(v)
			if err != nil || c.timeout <= 0 || c.timeout > maxTimeout {
				return c, fmt.Errorf("understudy.timeout=%q: want a duration up to %v, as 10m", v, maxTimeout)
			}
		case "modules":
			if v == "none" {
				c.noMods = true
				continue
			}
			for _, m := range strings.Split(v, ",") {
				if !validModName(m) {
					return c, fmt.Errorf("understudy.modules: %q is not a module name", m)
				}
				c.modules = append(c.modules, boot.NormalizeModuleName(m))
			}
		case "tap":
			if len(c.taps) == maxTaps {
				return c, fmt.Errorf("understudy.tap: more than %d tap devices", maxTaps)
			}
			t, err := parseTapSpec(v)
			if err != nil {
				return c, err
			}
			for _, o := range c.taps {
				if o.name == t.name {
					return c, fmt.Errorf("understudy.tap: %s given twice", t.name)
				}
			}
			c.taps = append(c.taps, t)
		case "bridge":
			if c.bridge, err = parseBridgeSpec(v); err != nil {
				return c, err
			}
		case "probe":
			rest, ok := strings.CutPrefix(v, "tcp:")
			if c.probe, err = netip.ParseAddrPort(rest); !ok || err != nil || c.probe.Port() == 0 {
				return c, fmt.Errorf("understudy.probe=%q: want tcp:ADDRESS:PORT, as tcp:192.0.2.2:7777", v)
			}
		case "testdisk":
			p, text, ok := strings.Cut(v, ":")
			if !ok || !path.IsAbs(p) || path.Clean(p) != p || p == "/" || len(p) > 256 || !validToken(text) {
				return c, fmt.Errorf("understudy.testdisk=%q: want /ABSOLUTE/PATH:TEXT, TEXT of 1..64 letters, digits, '.', '_' or '-'", v)
			}
			c.testDisk = &testDisk{path: p, text: text}
		case "signal":
			name, text, _ := strings.Cut(v, ":")
			sig, ok := signals[name]
			if !ok || text == "" || len(text) > 128 || strings.Trim(text, printable) != "" {
				return c, fmt.Errorf("understudy.signal=%q: want SIG:TEXT, SIG one of USR1, USR2, HUP, INT, TERM, TEXT 1..128 printable ASCII characters", v)
			}
			c.signal = &signalSpec{sig: sig, name: name, text: text}
		case "failpoint":
			if !validFailpoint(v) {
				return c, fmt.Errorf("understudy.failpoint=%q: want STAGE@EPOCH, STAGE 1..32 lowercase letters or '-' (as stun or corrupt-disk), EPOCH a positive integer", v)
			}
			c.failpt = v
		case "stdin":
			if !validToken(v) {
				return c, fmt.Errorf("understudy.stdin=%q: want TEXT of 1..64 letters, digits, '.', '_' or '-'", v)
			}
			c.stdin = v
		default:
			return c, fmt.Errorf("unknown option understudy.%s", p.Key)
		}
	}
	return c, nil
}

// roleEnv is what the role's command gets in its environment besides the
// uinit's: UNDERSTUDY_FAILPOINT if understudy.failpoint asks for it.
func (c config) roleEnv() []string {
	if c.failpt == "" {
		return nil
	}
	return []string{failpointEnv + "=" + c.failpt}
}

// check checks the options together, against the role.
func (c config) check() error {
	once := c.once
	switch {
	case c.role == "":
		return errors.New("no understudy.role= on the kernel command line" + c.noDisk)
	case c.role == "test" && once["args"]:
		return errors.New("understudy.role=test takes understudy.exec=, not understudy.args=")
	case c.role != "test" && once["exec"]:
		return fmt.Errorf("understudy.exec= is for understudy.role=test; %s takes understudy.args=", c.role)
	case c.role != "test" && (once["probe"] || once["testdisk"] || once["timeout"] || once["stdin"] || once["signal"] || once["with"] || len(c.then) > 0):
		return fmt.Errorf("understudy.probe, testdisk, stdin, signal, then, with and timeout are for understudy.role=test, not %s", c.role)
	case c.role == "test" && (c.probe.IsValid() || c.testDisk != nil || c.stdin != "" || c.signal != nil || len(c.then) > 0 || c.with != nil || c.failpt != "") && len(c.args) == 0:
		return errors.New("understudy.probe, testdisk, stdin, signal, then, with and failpoint need a command: understudy.exec=")
	}
	return nil
}

func parseTapSpec(v string) (tapSpec, error) {
	name, addr, hasAddr := strings.Cut(v, ",")
	t := tapSpec{name: name}
	if err := virtio.CheckIfName(name); err != nil {
		return t, fmt.Errorf("understudy.tap: %w", err)
	}
	if hasAddr {
		p, err := netip.ParsePrefix(addr)
		if err != nil || !p.Addr().Is4() || p.Bits() == 0 || p.Bits() == 32 {
			return t, fmt.Errorf("understudy.tap=%q: want NAME,A.B.C.D/N with N in 1..31", v)
		}
		t.addr = p
	}
	return t, nil
}

func parseBridgeSpec(v string) (*bridgeSpec, error) {
	bad := fmt.Errorf("understudy.bridge=%q: want BRIDGE:PORT[+PORT...][,A.B.C.D/N], as br0:eth0+tap0,192.0.2.11/24", v)
	spec, addr, hasAddr := strings.Cut(v, ",")
	name, ports, ok := strings.Cut(spec, ":")
	if !ok || ports == "" {
		return nil, bad
	}
	b := &bridgeSpec{name: name}
	if err := virtio.CheckIfName(name); err != nil {
		return nil, fmt.Errorf("understudy.bridge: %w", err)
	}
	for _, p := range strings.Split(ports, "+") {
		if err := virtio.CheckIfName(p); err != nil {
			return nil, fmt.Errorf("understudy.bridge: port: %w", err)
		}
		if p == name || slices.Contains(b.ports, p) {
			return nil, fmt.Errorf("understudy.bridge=%q: port %s given twice or is the bridge", v, p)
		}
		if len(b.ports) == maxPorts {
			return nil, fmt.Errorf("understudy.bridge: more than %d ports", maxPorts)
		}
		b.ports = append(b.ports, p)
	}
	if hasAddr {
		p, err := netip.ParsePrefix(addr)
		if err != nil || !p.Addr().Is4() || p.Bits() == 0 || p.Bits() == 32 {
			return nil, bad
		}
		b.addr = p
	}
	return b, nil
}

// printable is every printable ASCII character, space included.
const printable = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"

func validModName(s string) bool {
	if s == "" || len(s) > 56 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// failpointEnv is the environment variable understudy.failpoint sets for
// the role's command (package ft reads it; see ft/failpoint.go).
const failpointEnv = "UNDERSTUDY_FAILPOINT"

// validFailpoint reports whether s has the form STAGE@EPOCH: STAGE a word
// of 1..32 lowercase letters and '-' beginning with a letter, EPOCH a
// positive decimal integer of 64 bits. Which stages exist is package ft's
// to say, not this parser's: the stage list grows with the tests.
func validFailpoint(s string) bool {
	stage, epoch, ok := strings.Cut(s, "@")
	if !ok || stage == "" || len(stage) > 32 || stage[0] < 'a' || stage[0] > 'z' {
		return false
	}
	for _, r := range stage {
		if !(r >= 'a' && r <= 'z' || r == '-') {
			return false
		}
	}
	if epoch == "" || strings.Trim(epoch, "0123456789") != "" {
		return false
	}
	e, err := strconv.ParseUint(epoch, 10, 64)
	return err == nil && e > 0
}

func validToken(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// splitArgs splits a command line into words at spaces; single quotes group
// words with spaces ('console=ttyS0 quiet'). The kernel command line has
// already removed double quotes, so there is no other quoting.
func splitArgs(s string) ([]string, error) {
	var (
		args    []string
		cur     strings.Builder
		inWord  bool
		inQuote bool
	)
	for _, r := range s {
		switch {
		case r == '\'':
			inQuote = !inQuote
			inWord = true
		case (r == ' ' || r == '\t') && !inQuote:
			if inWord {
				args = append(args, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteRune(r)
			inWord = true
		}
		if len(args) > maxArgs {
			return nil, fmt.Errorf("more than %d words", maxArgs)
		}
	}
	if inQuote {
		return nil, errors.New("a single quote is not closed")
	}
	if inWord {
		args = append(args, cur.String())
	}
	if len(args) > maxArgs {
		return nil, fmt.Errorf("more than %d words", maxArgs)
	}
	return args, nil
}
