package transport

import (
	"crypto/x509"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

func TestCAAndNodeFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	ca, err := NewCA("prod cluster", 0)
	if err != nil {
		t.Fatalf("NewCA() = %v", err)
	}
	if err := WriteCA(dir, ca, false); err != nil {
		t.Fatalf("WriteCA(%s) = %v", dir, err)
	}
	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatalf("LoadCA(%s) = %v", dir, err)
	}
	if !loaded.Cert.Equal(ca.Cert) || !loaded.Key.Equal(ca.Key) {
		t.Errorf("LoadCA(%s) is not the CA written", dir)
	}
	c := ca.Cert
	if !c.IsCA || c.Subject.CommonName != "prod cluster" || c.KeyUsage&x509.KeyUsageCertSign == 0 || !c.MaxPathLenZero {
		t.Errorf("CA certificate = CA %v, name %q, usage %v, MaxPathLenZero %v", c.IsCA, c.Subject.CommonName, c.KeyUsage, c.MaxPathLenZero)
	}
	if d := time.Until(c.NotAfter); d < DefaultCAValidity-time.Hour || d > DefaultCAValidity+time.Hour {
		t.Errorf("CA valid for %v more, want about %v", d, DefaultCAValidity)
	}

	crt, key, err := loaded.IssueNode(NodeSpec{Name: "int1", Role: wire.RoleIntermediary, Hosts: []string{"10.0.0.7", "int1.example", "::2"}})
	if err != nil {
		t.Fatalf("IssueNode(int1) = %v", err)
	}
	if err := WriteNode(dir, "int1", crt, key, false); err != nil {
		t.Fatalf("WriteNode(int1) = %v", err)
	}
	for f, want := range map[string]fs.FileMode{"ca.crt": 0o644, "ca.key": 0o600, "int1.crt": 0o644, "int1.key": 0o600, ".": 0o700} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("mode of %s = %v, %v; want %v", f, st.Mode().Perm(), err, want)
		}
	}
	creds, err := LoadCredentials(dir, "int1")
	if err != nil {
		t.Fatalf("LoadCredentials(%s, int1) = %v", dir, err)
	}
	if creds.Name() != "int1" || creds.Role() != wire.RoleIntermediary {
		t.Errorf("LoadCredentials() = %q %v, want int1 intermediary", creds.Name(), creds.Role())
	}
	leaf := creds.Certificate()
	if !slices.Equal(leaf.DNSNames, []string{"int1", "localhost", "int1.example"}) {
		t.Errorf("DNSNames = %q, want int1, localhost, int1.example", leaf.DNSNames)
	}
	var ips []string
	for _, ip := range leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if !slices.Equal(ips, []string{"127.0.0.1", "::1", "10.0.0.7", "::2"}) {
		t.Errorf("IPAddresses = %q", ips)
	}
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageServerAuth) || !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) || leaf.IsCA {
		t.Errorf("node certificate usages %v, CA %v; want server and client auth, not a CA", leaf.ExtKeyUsage, leaf.IsCA)
	}
	if err := leaf.VerifyHostname("int1"); err != nil {
		t.Errorf("VerifyHostname(int1) = %v", err)
	}
	if err := leaf.VerifyHostname(net.IPv4(127, 0, 0, 1).String()); err != nil {
		t.Errorf("VerifyHostname(127.0.0.1) = %v", err)
	}

	// Nothing is overwritten without force, and nothing half-written.
	ca2, _ := NewCA("other", 0)
	if err := WriteCA(dir, ca2, false); !errors.Is(err, fs.ErrExist) {
		t.Errorf("WriteCA(existing) = %v, want fs.ErrExist", err)
	}
	os.Remove(filepath.Join(dir, "ca.key"))
	if err := WriteCA(dir, ca2, false); !errors.Is(err, fs.ErrExist) {
		t.Errorf("WriteCA(ca.crt exists) = %v, want fs.ErrExist", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.key")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("WriteCA that failed wrote ca.key anyway: %v", err)
	}
	if err := WriteNode(dir, "int1", crt, key, false); !errors.Is(err, fs.ErrExist) {
		t.Errorf("WriteNode(existing) = %v, want fs.ErrExist", err)
	}
	if err := WriteCA(dir, ca2, true); err != nil {
		t.Fatalf("WriteCA(force) = %v", err)
	}
	if got, err := LoadCA(dir); err != nil || !got.Cert.Equal(ca2.Cert) {
		t.Errorf("LoadCA() after WriteCA(force) = %v; want the new CA", err)
	}
	// int1's certificate is now from the old CA.
	if _, err := LoadCredentials(dir, "int1"); err == nil || !strings.Contains(err.Error(), "unknown authority") {
		t.Errorf("LoadCredentials(cert of a replaced CA) = %v, want unknown authority", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".*tmp*")); len(left) != 0 {
		t.Errorf("temporary files left behind: %q", left)
	}
}

func TestLoadCredentialsErrors(t *testing.T) {
	dir := t.TempDir()
	ca, err := newCA("c", time.Now().Add(-72*time.Hour), 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteCA(dir, ca, false); err != nil {
		t.Fatal(err)
	}
	issue := func(spec NodeSpec) ([]byte, []byte) {
		crt, key, err := ca.IssueNode(spec)
		if err != nil {
			t.Fatalf("IssueNode(%+v) = %v", spec, err)
		}
		return crt, key
	}
	aCrt, aKey := issue(NodeSpec{Name: "a"})
	bCrt, bKey := issue(NodeSpec{Name: "b", Role: wire.RoleBackup})
	old := time.Now().Add(-48 * time.Hour)
	xCrt, xKey := issue(NodeSpec{Name: "x", NotBefore: old, Validity: time.Hour})
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a.crt", aCrt)
	write("a.key", aKey)
	write("b.crt", bCrt)
	write("b.key", aKey) // a's key with b's certificate
	write("c.crt", aCrt) // a's certificate under c's name
	write("c.key", aKey)
	write("x.crt", xCrt)
	write("x.key", xKey)
	write("g.crt", []byte("garbage"))
	write("g.key", bKey)
	write("h.crt", append(append([]byte{}, bCrt...), "trailing junk"...))
	write("h.key", bKey)
	write("i.crt", ca.CertPEM())
	caKey, _ := ca.KeyPEM()
	write("i.key", caKey)

	tests := []struct{ name, sub string }{
		{"a", ""},
		{"b", "private key does not match"},
		{"c", `is for node "a", not "c"`},
		{"x", "expired"},
		{"g", "no PEM CERTIFICATE block"},
		{"h", "data after the PEM"},
		{"i", "not a node certificate"},
		{"missing", "no such file"},
		{"../a", "node name"},
	}
	for _, tc := range tests {
		_, err := LoadCredentials(dir, tc.name)
		if tc.sub == "" {
			if err != nil {
				t.Errorf("LoadCredentials(%s) = %v, want success", tc.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("LoadCredentials(%s) = %v, want an error containing %q", tc.name, err, tc.sub)
		}
	}
	if _, err := LoadCA(t.TempDir()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadCA(empty dir) = %v, want fs.ErrNotExist", err)
	}
	// A node certificate is not a CA, and a key must match its CA.
	if _, err := ParseCA(aCrt, aKey); err == nil || !strings.Contains(err.Error(), "not a CA certificate") {
		t.Errorf("ParseCA(node certificate) = %v, want not a CA", err)
	}
	if _, err := ParseCA(ca.CertPEM(), aKey); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("ParseCA(CA cert, other key) = %v, want does not match", err)
	}
	if _, err := ParseCA(ca.CertPEM(), aCrt); err == nil || !strings.Contains(err.Error(), `want "PRIVATE KEY"`) {
		t.Errorf("ParseCA(CA cert, a certificate as key) = %v", err)
	}
}

func TestIssueNodeRejects(t *testing.T) {
	ca, err := NewCA("c", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		spec NodeSpec
		sub  string
	}{
		{NodeSpec{Name: ""}, "node name"},
		{NodeSpec{Name: "a/b"}, "node name"},
		{NodeSpec{Name: "ca"}, "reserved"},
		{NodeSpec{Name: "CA"}, "reserved"},
		{NodeSpec{Name: "n", Role: 7}, "role(7)"},
		{NodeSpec{Name: "n", Hosts: []string{"bad host"}}, "want a DNS name or an IP"},
		{NodeSpec{Name: "n", Validity: -time.Hour}, "positive"},
	} {
		if _, _, err := ca.IssueNode(tc.spec); err == nil || !strings.Contains(err.Error(), tc.sub) {
			t.Errorf("IssueNode(%+v) = %v, want an error containing %q", tc.spec, err, tc.sub)
		}
	}
	// A node certificate never outlives its CA.
	crt, key, err := ca.IssueNode(NodeSpec{Name: "n"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewCredentials(ca.CertPEM(), crt, key)
	if err != nil {
		t.Fatal(err)
	}
	if !c.Certificate().NotAfter.Equal(ca.Cert.NotAfter) {
		t.Errorf("node NotAfter = %v, want the CA's %v", c.Certificate().NotAfter, ca.Cert.NotAfter)
	}
	if _, err := NewCA("", 0); err == nil {
		t.Errorf("NewCA(\"\") = nil error")
	}
	if _, err := NewCA("c", -time.Second); err == nil {
		t.Errorf("NewCA(negative validity) = nil error")
	}
}
