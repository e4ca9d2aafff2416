package transport

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// Networks an Addr may name.
const (
	NetworkTCP   = "tcp"
	NetworkVsock = "vsock"
)

// VsockAnyCID is the vsock context ID that listens on every local CID
// (VMADDR_CID_ANY).
const VsockAnyCID = 1<<32 - 1

// Addr is a transport address: tcp://host:port or vsock://cid:port.
type Addr struct {
	Network string // NetworkTCP or NetworkVsock
	// Host is the TCP host: a DNS name or an IP literal (no brackets). It is
	// empty, when listening, for every local address.
	Host string
	// CID is the vsock context ID (2 is the host, VsockAnyCID every local CID).
	CID uint32
	// Port is the TCP (up to 65535) or vsock port. 0 means "pick one",
	// when listening.
	Port uint32
}

// String returns the address in the form ParseAddr accepts.
func (a Addr) String() string {
	port := strconv.FormatUint(uint64(a.Port), 10)
	if a.Network == NetworkVsock {
		return "vsock://" + strconv.FormatUint(uint64(a.CID), 10) + ":" + port
	}
	return a.Network + "://" + net.JoinHostPort(a.Host, port)
}

// ParseAddr parses "tcp://HOST:PORT" or "vsock://CID:PORT". HOST is a DNS
// name, an IPv4 address or a bracketed IPv6 address, and may be empty
// (listen on every address); CID and PORT are decimal without sign or
// leading zeros. Nothing else (user, path, query, zone) is allowed.
func ParseAddr(s string) (Addr, error) {
	scheme, rest, ok := strings.Cut(s, "://")
	if !ok {
		return Addr{}, fmt.Errorf("address %q: want tcp://HOST:PORT or vsock://CID:PORT", s)
	}
	var a Addr
	var err error
	switch scheme {
	case NetworkTCP:
		a, err = parseTCP(rest)
	case NetworkVsock:
		a, err = parseVsock(rest)
	default:
		return Addr{}, fmt.Errorf("address %q: unknown network %q (want tcp or vsock)", s, scheme)
	}
	if err != nil {
		return Addr{}, fmt.Errorf("address %q: %w", s, err)
	}
	return a, nil
}

func parseTCP(hostport string) (Addr, error) {
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 {
		return Addr{}, fmt.Errorf("no port (want tcp://HOST:PORT)")
	}
	host, portStr := hostport[:i], hostport[i+1:]
	port, err := parseDecimal(portStr, 65535)
	if err != nil {
		return Addr{}, fmt.Errorf("port %q: %w", portStr, err)
	}
	switch {
	case strings.HasPrefix(host, "["):
		if !strings.HasSuffix(host, "]") {
			return Addr{}, fmt.Errorf("host %q: unclosed bracket", host)
		}
		ip, err := netip.ParseAddr(host[1 : len(host)-1])
		if err != nil || !ip.Is6() || ip.Zone() != "" || ip.Is4In6() {
			return Addr{}, fmt.Errorf("host %q: brackets need an IPv6 address without a zone", host)
		}
		host = ip.String()
	case host == "":
	default:
		if ip, err := netip.ParseAddr(host); err == nil {
			if !ip.Is4() {
				return Addr{}, fmt.Errorf("host %q: put an IPv6 address in brackets", host)
			}
		} else if err := checkHostname(host); err != nil {
			return Addr{}, err
		}
	}
	return Addr{Network: NetworkTCP, Host: host, Port: port}, nil
}

// checkHostname accepts RFC 1123 host names: dot-separated labels of
// letters, digits and hyphens, 1..63 bytes each, 253 at most in all, not
// starting or ending with a hyphen, and a last label that is not all digits.
func checkHostname(h string) error {
	bad := func(why string) error { return fmt.Errorf("host %q: %s", h, why) }
	if len(h) > 253 {
		return bad("longer than 253 bytes")
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return bad("want dot-separated labels of 1..63 characters")
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return bad("a label starts or ends with '-'")
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return bad("want letters, digits, '-' and '.'")
			}
		}
	}
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return bad("not an IPv4 address, and a host name cannot end in a numeric label")
	}
	return nil
}

func parseVsock(cidport string) (Addr, error) {
	cidStr, portStr, ok := strings.Cut(cidport, ":")
	if !ok {
		return Addr{}, fmt.Errorf("no port (want vsock://CID:PORT)")
	}
	cid, err := parseDecimal(cidStr, 1<<32-1)
	if err != nil {
		return Addr{}, fmt.Errorf("context ID %q: %w", cidStr, err)
	}
	port, err := parseDecimal(portStr, 1<<32-2)
	if err != nil {
		return Addr{}, fmt.Errorf("port %q: %w", portStr, err)
	}
	return Addr{Network: NetworkVsock, CID: cid, Port: port}, nil
}

// parseDecimal parses a decimal number up to max with no sign, spaces or
// leading zeros.
func parseDecimal(s string, max uint64) (uint32, error) {
	if s == "" {
		return 0, fmt.Errorf("empty")
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("leading zero")
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return 0, fmt.Errorf("want a decimal number")
		}
	}
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil || v > max {
		return 0, fmt.Errorf("want at most %d", max)
	}
	return uint32(v), nil
}

// checkDial reports whether a can be dialed: it needs a host or a specific
// CID, and a port.
func (a Addr) checkDial() error {
	switch {
	case a.Network == NetworkTCP && a.Host == "":
		return fmt.Errorf("address %v: no host to dial", a)
	case a.Network == NetworkVsock && a.CID == VsockAnyCID:
		return fmt.Errorf("address %v: cannot dial the any-CID %d", a, uint32(VsockAnyCID))
	case a.Port == 0:
		return fmt.Errorf("address %v: cannot dial port 0", a)
	}
	return nil
}
