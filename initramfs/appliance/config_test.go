package appliance

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

func applianceParams(t testing.TB, s string) boot.Params {
	t.Helper()
	ps, err := boot.ParseCmdline(s)
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func TestParseApplianceConfig(t *testing.T) {
	c, err := parseConfig(applianceParams(t, `console=ttyS0 quiet understudy.role=test `+
		`understudy.exec="understudy run --kernel /boot/vmlinuz --cmdline 'console=ttyS0 guest.mode=net'" `+
		`understudy.tap=tap0,192.0.2.1/24 understudy.tap=tap1 understudy.probe=tcp:192.0.2.2:7777 `+
		`understudy.bridge=br0:eth0+tap0,192.0.2.11/24 understudy.signal="USR1:kv: connection 1 from" understudy.then="a b" understudy.then=c understudy.testdisk=/tmp/d.img:tok-1 understudy.timeout=90s understudy.modules=kvm,kvm-amd understudy.stdin=line-1`))
	if err != nil {
		t.Fatal(err)
	}
	want := config{
		role:     "test",
		args:     []string{"understudy", "run", "--kernel", "/boot/vmlinuz", "--cmdline", "console=ttyS0 guest.mode=net"},
		modules:  []string{"kvm", "kvm_amd"},
		taps:     []tapSpec{{"tap0", netip.MustParsePrefix("192.0.2.1/24")}, {name: "tap1"}},
		then:     [][]string{{"a", "b"}, {"c"}},
		signal:   &signalSpec{syscall.SIGUSR1, "USR1", "kv: connection 1 from"},
		bridge:   &bridgeSpec{"br0", []string{"eth0", "tap0"}, netip.MustParsePrefix("192.0.2.11/24")},
		probe:    netip.MustParseAddrPort("192.0.2.2:7777"),
		testDisk: &testDisk{"/tmp/d.img", "tok-1"},
		stdin:    "line-1",
		timeout:  90 * time.Second,
		once: map[string]bool{"role": true, "exec": true, "probe": true, "bridge": true, "signal": true,
			"testdisk": true, "timeout": true, "modules": true, "stdin": true},
	}
	if !reflect.DeepEqual(c, want) {
		t.Errorf("parseApplianceConfig = %+v, want %+v", c, want)
	}
	c, err = parseConfig(applianceParams(t, `understudy.role=backup understudy.args="--keys /k --listen tcp://0.0.0.0:7000" understudy.modules=none`))
	if err != nil || c.role != "backup" || len(c.args) != 4 || !c.noMods || c.timeout != 10*time.Minute {
		t.Errorf("parseConfig(backup) = %+v, %v", c, err)
	}
}

func TestParseApplianceConfigErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"console=ttyS0", "no understudy.role"},
		{"understudy.role=primary", "want run, intermediary, backup or test"},
		{"understudy.role=run understudy.role=run", "given twice"},
		{"understudy.role", "needs a value"},
		{`understudy.role="  "`, "needs a value"},
		{"understudy.role=test understudy.colour=red", "unknown option understudy.colour"},
		{"understudy.role=test understudy.args=x", "takes understudy.exec="},
		{"understudy.role=run understudy.exec=x", "is for understudy.role=test"},
		{"understudy.role=run understudy.probe=tcp:192.0.2.2:1", "are for understudy.role=test"},
		{"understudy.role=test understudy.probe=tcp:192.0.2.2:1", "need a command"},
		{`understudy.role=test understudy.exec="a 'b"`, "single quote is not closed"},
		{"understudy.role=test understudy.timeout=-1s", "want a duration"},
		{"understudy.role=test understudy.timeout=25h", "want a duration"},
		{"understudy.role=test understudy.timeout=soon", "want a duration"},
		{"understudy.role=test understudy.modules=kvm,,tun", "not a module name"},
		{"understudy.role=test understudy.modules=../x", "not a module name"},
		{"understudy.role=test understudy.tap=a/b", "not a valid interface name"},
		{"understudy.role=test understudy.tap=tap0,192.0.2.1", "want NAME,A.B.C.D/N"},
		{"understudy.role=test understudy.tap=tap0,2001:db8::1/64", "want NAME,A.B.C.D/N"},
		{"understudy.role=test understudy.tap=tap0 understudy.tap=tap0", "tap0 given twice"},
		{"understudy.role=test understudy.tap=a understudy.tap=b understudy.tap=c understudy.tap=d understudy.tap=e understudy.tap=f understudy.tap=g understudy.tap=h understudy.tap=i", "more than 8"},
		{"understudy.role=test understudy.then=x", "need a command"},
		{"understudy.role=test understudy.signal=USR1:x", "need a command"},
		{"understudy.role=run understudy.signal=USR1:x", "are for understudy.role=test"},
		{"understudy.role=test understudy.exec=x understudy.signal=KILL:x", "want SIG:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.signal=USR1", "want SIG:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.signal=USR1:", "want SIG:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.signal=USR1:\u00e9", "want SIG:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.signal=USR1:" + strings.Repeat("a", 129), "want SIG:TEXT"},
		{"understudy.role=run understudy.then=x", "are for understudy.role=test"},
		{`understudy.role=test understudy.exec=x understudy.then=" "`, "needs a value"},
		{`understudy.role=test understudy.exec=x understudy.then="''"`, "needs a command"},
		{"understudy.role=test understudy.exec=x understudy.then=a understudy.then=a understudy.then=a understudy.then=a understudy.then=a understudy.then=a understudy.then=a understudy.then=a understudy.then=a", "more than 8 commands"},
		{"understudy.role=test understudy.bridge=br0", "want BRIDGE:PORT"},
		{"understudy.role=test understudy.bridge=br0:", "want BRIDGE:PORT"},
		{"understudy.role=test understudy.bridge=br0:eth0,192.0.2.11", "want BRIDGE:PORT"},
		{"understudy.role=test understudy.bridge=br0:eth0+eth0", "given twice or is the bridge"},
		{"understudy.role=test understudy.bridge=br0:br0", "given twice or is the bridge"},
		{"understudy.role=test understudy.bridge=br0:a/b", "not a valid interface name"},
		{"understudy.role=test understudy.bridge=a/b:eth0", "not a valid interface name"},
		{"understudy.role=test understudy.bridge=br0:a+b+c+d+e+f+g+h+i", "more than 8 ports"},
		{"understudy.role=test understudy.bridge=br0:eth0 understudy.bridge=br1:eth1", "given twice"},
		{"understudy.role=test understudy.exec=x understudy.probe=192.0.2.2:1", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.probe=tcp:192.0.2.2:0", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.probe=tcp:host:80", "want tcp:ADDRESS:PORT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=rel/d.img:t", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/../d:t", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/d:a/b", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.testdisk=/tmp/d", "want /ABSOLUTE/PATH:TEXT"},
		{"understudy.role=test understudy.exec=x understudy.stdin=a/b", "want TEXT of 1..64"},
		{"understudy.role=test understudy.stdin=abc", "need a command"},
		{"understudy.role=run understudy.stdin=abc", "are for understudy.role=test"},
	} {
		_, err := parseConfig(applianceParams(t, tt.in))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseConfig(%q) = %v, want an error containing %q", tt.in, err, tt.want)
		}
	}
}

func TestSplitArgs(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{"  a  b\tc ", []string{"a", "b", "c"}},
		{"run --cmdline 'console=ttyS0 quiet' x", []string{"run", "--cmdline", "console=ttyS0 quiet", "x"}},
		{"a''b ''", []string{"ab", ""}},
		{"x'y z'w", []string{"xy zw"}},
	} {
		got, err := splitArgs(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("splitArgs(%q) = %q, %v, want %q", tt.in, got, err, tt.want)
		}
	}
	if _, err := splitArgs(strings.Repeat("a ", maxArgs+1)); err == nil {
		t.Errorf("splitArgs(%d words) = nil error", maxArgs+1)
	}
}

func FuzzSplitArgs(f *testing.F) {
	for _, s := range []string{"run --cmdline 'a b'", "'", "a''b", " \t "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		args, err := splitArgs(s)
		if err != nil {
			return
		}
		if len(args) > maxArgs {
			t.Fatalf("splitArgs(%q) gave %d words", s, len(args))
		}
		// Quoting every word and splitting again gives the same words.
		var q []string
		for _, a := range args {
			if strings.Contains(a, "'") {
				return
			}
			q = append(q, "'"+a+"'")
		}
		back, err := splitArgs(strings.Join(q, " "))
		if err != nil || (len(args) > 0 && !reflect.DeepEqual(back, args)) {
			t.Fatalf("splitArgs round trip of %q: %q, %v", args, back, err)
		}
	})
}

func FuzzParseApplianceConfig(f *testing.F) {
	for _, s := range []string{
		"understudy.role=test",
		`understudy.role=test understudy.exec="understudy run --cmdline 'a b'" understudy.probe=tcp:192.0.2.2:7777 understudy.tap=tap0,192.0.2.1/24`,
		"understudy.role=run understudy.args=--help understudy.modules=kvm,tun",
		"understudy.role=test understudy.exec=true understudy.testdisk=/tmp/x:t understudy.timeout=1s",
		"understudy.role=backup understudy.modules=none",
		"understudy.role=test understudy.tap=tap0 understudy.bridge=br0:eth0+tap0,192.0.2.11/24",
		"understudy.role=run understudy.failpoint=corrupt-disk@3",
		"understudy.role=test understudy.exec=x understudy.failpoint=stun@18446744073709551615",
	} {
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
		switch c.role {
		case "run", "intermediary", "backup", "test":
		default:
			t.Fatalf("accepted role %q", c.role)
		}
		if c.timeout <= 0 || c.timeout > maxTimeout || len(c.taps) > maxTaps || len(c.args) > maxArgs || len(c.then) > maxThen || (len(c.then) > 0 && len(c.args) == 0) {
			t.Fatalf("accepted %+v", c)
		}
		for _, tp := range c.taps {
			if virtio.CheckIfName(tp.name) != nil {
				t.Fatalf("accepted tap name %q", tp.name)
			}
		}
		if b := c.bridge; b != nil {
			if virtio.CheckIfName(b.name) != nil || len(b.ports) == 0 || len(b.ports) > maxPorts {
				t.Fatalf("accepted bridge %+v", b)
			}
			for _, p := range b.ports {
				if virtio.CheckIfName(p) != nil || p == b.name {
					t.Fatalf("accepted bridge port %q", p)
				}
			}
		}
		for _, m := range c.modules {
			if !validModName(m) {
				t.Fatalf("accepted module %q", m)
			}
		}
		if d := c.testDisk; d != nil && (!filepath.IsAbs(d.path) || filepath.Clean(d.path) != d.path || !validToken(d.text)) {
			t.Fatalf("accepted test disk %+v", d)
		}
		if sg := c.signal; sg != nil && (signals[sg.name] != sg.sig || sg.text == "" || len(sg.text) > 128 || strings.Trim(sg.text, printable) != "") {
			t.Fatalf("accepted signal %+v", sg)
		}
		if c.stdin != "" && !validToken(c.stdin) {
			t.Fatalf("accepted stdin %q", c.stdin)
		}
		if c.failpt != "" {
			// What ft's parser needs: one '@', a lowercase stage, an
			// epoch that is a positive uint64.
			stage, epoch, ok := strings.Cut(c.failpt, "@")
			e, err := strconv.ParseUint(epoch, 10, 64)
			if !ok || stage == "" || strings.Trim(stage, "abcdefghijklmnopqrstuvwxyz-") != "" || err != nil || e == 0 {
				t.Fatalf("accepted failpoint %q", c.failpt)
			}
			if c.role == "test" && len(c.args) == 0 {
				t.Fatalf("accepted failpoint %q for a test role without a command", c.failpt)
			}
		}
	})
}

func TestParseApplianceFailpoint(t *testing.T) {
	for _, v := range []string{"stun@1", "transfer@3", "corrupt-disk@12", "corrupt-state@2", "sent@18446744073709551615", "a@007"} {
		for _, role := range []string{"run", "intermediary", "backup", "test understudy.exec=x"} {
			c, err := parseConfig(applianceParams(t, "understudy.role="+role+" understudy.failpoint="+v))
			if err != nil || c.failpt != v {
				t.Errorf("parseConfig(role %s, failpoint %q) = %q, %v; want it accepted", role, v, c.failpt, err)
				continue
			}
			if env := c.roleEnv(); len(env) != 1 || env[0] != "UNDERSTUDY_FAILPOINT="+v {
				t.Errorf("roleEnv() = %q, want [UNDERSTUDY_FAILPOINT=%s]", env, v)
			}
		}
	}
	if c, err := parseConfig(applianceParams(t, "understudy.role=run")); err != nil || c.roleEnv() != nil {
		t.Errorf("without understudy.failpoint: roleEnv() = %q, %v; want nil", c.roleEnv(), err)
	}
	for _, v := range []string{"stun", "@3", "stun@", "stun@0", "stun@-1", "stun@+1", "stun@1.5", "stun@0x10", "stun@18446744073709551616",
		"Stun@1", "stun_x@1", "-stun@1", "stun 1@1", "stun@1@2", "st\u00fcn@1", "stun@\u0661", strings.Repeat("a", 33) + "@1", "stun@ 1"} {
		in := `understudy.role=run understudy.failpoint="` + v + `"`
		_, err := parseConfig(applianceParams(t, in))
		if err == nil || !strings.Contains(err.Error(), "want STAGE@EPOCH") || strings.Contains(err.Error(), "\n") {
			t.Errorf("parseConfig(%q) = %v, want one line containing %q", in, err, "want STAGE@EPOCH")
		}
	}
	for _, tt := range []struct{ in, want string }{
		{"understudy.role=run understudy.failpoint=stun@1 understudy.failpoint=sent@2", "given twice"},
		{"understudy.role=run understudy.failpoint", "needs a value"},
		{"understudy.role=test understudy.failpoint=stun@1", "need a command"},
	} {
		if _, err := parseConfig(applianceParams(t, tt.in)); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("parseConfig(%q) = %v, want an error containing %q", tt.in, err, tt.want)
		}
	}
}

// TestApplianceFailpointEnv: understudy.failpoint reaches the role's
// command, and only it, as UNDERSTUDY_FAILPOINT (through a stand-in for
// this binary that prints the variable); a bad value runs nothing.
func TestApplianceFailpointEnv(t *testing.T) {
	if v, ok := os.LookupEnv(failpointEnv); ok {
		t.Skipf("the test's own environment has %s=%s", failpointEnv, v)
	}
	dir := t.TempDir()
	self := filepath.Join(dir, "understudy")
	if err := os.WriteFile(self, []byte("#!/bin/sh\necho \"$1 fp=[$UNDERSTUDY_FAILPOINT]\"\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	o := Options{Root: dir, CPUInfo: filepath.Join(dir, "cpuinfo"), KVM: filepath.Join(dir, "nokvm"), Self: self}
	for _, role := range []string{"run", "intermediary", "backup"} {
		code, out := runAppliance(t, o, "understudy.role="+role+" understudy.failpoint=corrupt-state@4")
		if code != 7 {
			t.Errorf("role %s: status %d, want the command's 7:\n%s", role, code, out)
		}
		wantLines(t, out, Tag+"exec: UNDERSTUDY_FAILPOINT=corrupt-state@4 understudy "+role, role+" fp=[corrupt-state@4]\n")
		code, out = runAppliance(t, o, "understudy.role="+role)
		if code != 7 || !strings.Contains(out, role+" fp=[]\n") || strings.Contains(out, "UNDERSTUDY_FAILPOINT") {
			t.Errorf("role %s without understudy.failpoint: status %d, want 7 and no variable:\n%s", role, code, out)
		}
	}
	// The test role: its exec and then commands get it, its with command
	// (a client beside them) and its probe do not.
	code, out := runAppliance(t, o, `understudy.role=test understudy.failpoint=sent@9 understudy.exec="sh -c 'echo exec fp=[$UNDERSTUDY_FAILPOINT]'" `+
		`understudy.then="sh -c 'echo then fp=[$UNDERSTUDY_FAILPOINT]'" understudy.with="sh -c 'echo with fp=[$UNDERSTUDY_FAILPOINT]'"`)
	if code != 0 {
		t.Errorf("role test: status %d, want 0:\n%s", code, out)
	}
	wantLines(t, out, "exec fp=[sent@9]\n", "then fp=[sent@9]\n", "with fp=[]\n")
	// A role from a config disk gets it too: the kernel command line
	// keeps what is not secret.
	co, root := configRoot(t, map[string][]byte{"vda": writeDisk(t, testNodeConfig())})
	if err := os.WriteFile(filepath.Join(root, "understudy"), []byte("#!/bin/sh\necho \"$1 fp=[$UNDERSTUDY_FAILPOINT]\"\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	code, out = runAppliance(t, co, "understudy.failpoint=stun@2")
	if code != 7 || !strings.Contains(out, "backup fp=[stun@2]\n") {
		t.Errorf("a config disk's role: status %d, want 7 and the variable:\n%s", code, out)
	}
	// A bad value: one error line, a usage status, nothing run.
	code, out = runAppliance(t, o, "understudy.role=run understudy.failpoint=stun@0")
	if code != statusUsage || strings.Count(out, Tag+"error: ") != 1 || !strings.Contains(out, Tag+`error: understudy.failpoint="stun@0": want STAGE@EPOCH`) || strings.Contains(out, "fp=[") {
		t.Errorf("a bad failpoint: status %d, want %d, one error line and nothing run:\n%s", code, statusUsage, out)
	}
}
