package appliance

import (
	"net/netip"
	"path/filepath"
	"reflect"
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
	})
}
