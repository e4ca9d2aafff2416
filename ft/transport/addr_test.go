package transport

import (
	"strings"
	"testing"
)

func TestParseAddr(t *testing.T) {
	good := []struct {
		in   string
		want Addr
		out  string // String(), if not in
	}{
		{"tcp://127.0.0.1:7000", Addr{Network: "tcp", Host: "127.0.0.1", Port: 7000}, ""},
		{"tcp://localhost:0", Addr{Network: "tcp", Host: "localhost", Port: 0}, ""},
		{"tcp://:7000", Addr{Network: "tcp", Port: 7000}, ""},
		{"tcp://[::1]:65535", Addr{Network: "tcp", Host: "::1", Port: 65535}, ""},
		{"tcp://[2001:DB8::1]:1", Addr{Network: "tcp", Host: "2001:db8::1", Port: 1}, "tcp://[2001:db8::1]:1"},
		{"tcp://int-1.example.com:443", Addr{Network: "tcp", Host: "int-1.example.com", Port: 443}, ""},
		{"tcp://a.b9:1", Addr{Network: "tcp", Host: "a.b9", Port: 1}, ""},
		{"vsock://2:1024", Addr{Network: "vsock", CID: 2, Port: 1024}, ""},
		{"vsock://1:0", Addr{Network: "vsock", CID: 1, Port: 0}, ""},
		{"vsock://4294967295:4294967294", Addr{Network: "vsock", CID: VsockAnyCID, Port: 1<<32 - 2}, ""},
	}
	for _, tc := range good {
		got, err := ParseAddr(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseAddr(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			continue
		}
		out := tc.out
		if out == "" {
			out = tc.in
		}
		if s := got.String(); s != out {
			t.Errorf("ParseAddr(%q).String() = %q, want %q", tc.in, s, out)
		}
	}
	bad := []struct{ in, sub string }{
		{"", "want tcp://HOST:PORT"},
		{"127.0.0.1:7000", "want tcp://HOST:PORT"},
		{"udp://1.2.3.4:5", `unknown network "udp"`},
		{"TCP://1.2.3.4:5", `unknown network "TCP"`},
		{"tcp://1.2.3.4", "no port"},
		{"tcp://1.2.3.4:", `port "": empty`},
		{"tcp://1.2.3.4:65536", "at most 65535"},
		{"tcp://1.2.3.4:-1", "decimal"},
		{"tcp://1.2.3.4:+1", "decimal"},
		{"tcp://1.2.3.4:080", "leading zero"},
		{"tcp://1.2.3.4:0x50", "leading zero"},
		{"tcp://1.2.3.4:99999999999999999999", "at most"},
		{"tcp://1.2.3.4:80/path", "decimal"},
		{"tcp://1.2.3.4:80?q", "decimal"},
		{"tcp://user@host:80", "letters, digits"},
		{"tcp://::1:80", "brackets"},
		{"tcp://[::1:80", "unclosed bracket"},
		{"tcp://[1.2.3.4]:80", "IPv6"},
		{"tcp://[localhost]:80", "IPv6"},
		{"tcp://[fe80::1%eth0]:80", "zone"},
		{"tcp://[::ffff:1.2.3.4]:80", "IPv6"},
		{"tcp://1.2.3:80", "numeric label"},
		{"tcp://01.2.3.4:80", "numeric label"},
		{"tcp://256.1.1.1:80", "numeric label"},
		{"tcp://-a.com:80", "starts or ends"},
		{"tcp://a..com:80", "labels"},
		{"tcp://a.com.:80", "labels"},
		{"tcp://" + strings.Repeat("a", 64) + ".com:80", "labels"},
		{"tcp://" + strings.Repeat("abcdefghi.", 26) + "com:80", "253"},
		{"tcp://a b:80", "letters"},
		{"tcp:// host:80", "letters"},
		{"vsock://2", "no port"},
		{"vsock://:5", "context ID"},
		{"vsock://2:", "port"},
		{"vsock://4294967296:5", "context ID"},
		{"vsock://2:4294967295", "at most 4294967294"},
		{"vsock://host:5", "context ID"},
		{"vsock://2:5:6", "decimal"},
		{"vsock://02:5", "leading zero"},
		{"vsock://[2]:5", "context ID"},
	}
	for _, tc := range bad {
		got, err := ParseAddr(tc.in)
		if err == nil || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("ParseAddr(%q) = %+v, %v; want an error containing %q", tc.in, got, err, tc.sub)
		}
	}
}

func FuzzParseAddr(f *testing.F) {
	for _, s := range []string{"tcp://127.0.0.1:7000", "tcp://[::1]:1", "tcp://:0", "tcp://a.b-c.d:65535", "vsock://2:1024", "vsock://4294967295:0", "tcp://[::1%x]:1", "vsock://0:00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, err := ParseAddr(s)
		if err != nil {
			if a != (Addr{}) {
				t.Errorf("ParseAddr(%q) = %+v with error %v, want a zero Addr", s, a, err)
			}
			return
		}
		// A parsed address prints as an address that parses to itself.
		back, err := ParseAddr(a.String())
		if err != nil || back != a {
			t.Errorf("ParseAddr(ParseAddr(%q).String() = %q) = %+v, %v; want %+v", s, a.String(), back, err, a)
		}
		if a.Network != NetworkTCP && a.Network != NetworkVsock {
			t.Errorf("ParseAddr(%q).Network = %q", s, a.Network)
		}
		if a.Network == NetworkTCP && a.Port > 65535 {
			t.Errorf("ParseAddr(%q).Port = %d", s, a.Port)
		}
	})
}
