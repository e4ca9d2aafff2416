package transport

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// File names in a credentials directory. A node NAME's files are NAME.crt
// and NAME.key; nodes need ca.crt but never ca.key.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Default certificate lifetimes.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultNodeValidity = 2 * 365 * 24 * time.Hour
)

// organization is the subject organization of every certificate made here.
const organization = "Understudy"

// clockSkew backdates new certificates so peers with slightly slow clocks
// accept them at once.
const clockSkew = time.Minute

// CA is a cluster certificate authority: an ECDSA P-256 key and its
// self-signed certificate. Every node certificate of a cluster is signed by
// its CA, and nodes accept only peers whose certificates are.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a new cluster CA named name (the certificate's common name),
// valid from now for validity (DefaultCAValidity if 0).
func NewCA(name string, validity time.Duration) (*CA, error) {
	return newCA(name, time.Now().Truncate(time.Second).Add(-clockSkew), validity)
}

// newCA is NewCA with the certificate valid from notBefore.
func newCA(name string, notBefore time.Time, validity time.Duration) (*CA, error) {
	if name == "" || len(name) > 64 {
		return nil, fmt.Errorf("CA name %q: want 1..64 characters", name)
	}
	if validity == 0 {
		validity = DefaultCAValidity
	}
	if validity < 0 {
		return nil, fmt.Errorf("CA validity %v: want a positive duration", validity)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate CA key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{organization}},
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(clockSkew + validity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new CA certificate: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certificate serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

// CertPEM returns the CA certificate in PEM form.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// KeyPEM returns the CA private key in PEM form (PKCS #8).
func (ca *CA) KeyPEM() ([]byte, error) { return keyPEM(ca.Key) }

func keyPEM(k *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("encode private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// ParseCA parses a CA certificate and its key, both PEM, and checks that
// they belong together and the certificate is a CA's.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := parseCACert(certPEM)
	if err != nil {
		return nil, err
	}
	der, err := onePEM(keyPEM, "PRIVATE KEY")
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("CA key: a %T, want an ECDSA key", k)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("CA key does not match the CA certificate")
	}
	return &CA{Cert: cert, Key: key}, nil
}

func parseCACert(certPEM []byte) (*x509.Certificate, error) {
	der, err := onePEM(certPEM, "CERTIFICATE")
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	if !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("CA certificate %q is not a CA certificate", cert.Subject.CommonName)
	}
	return cert, nil
}

// onePEM returns the contents of the single PEM block of type typ in data.
func onePEM(data []byte, typ string) ([]byte, error) {
	b, rest := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("no PEM %s block", typ)
	}
	if b.Type != typ {
		return nil, fmt.Errorf("PEM block is %q, want %q", b.Type, typ)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("data after the PEM %s block", typ)
	}
	return b.Bytes, nil
}

// NodeSpec describes a node certificate to issue.
type NodeSpec struct {
	Name string    // node name (wire.CheckName); the certificate's common name
	Role wire.Role // the only role the node may take; 0 for any role
	// Hosts are extra DNS names and IP addresses for the certificate; it
	// always names Name, localhost, 127.0.0.1 and ::1.
	Hosts []string
	// NotBefore defaults to now (less a minute for clock skew).
	NotBefore time.Time
	// Validity defaults to DefaultNodeValidity; the certificate never
	// outlives the CA.
	Validity time.Duration
}

// IssueNode makes a node key and a certificate for it signed by ca, usable
// for both TLS server and client authentication. It returns both in PEM form.
func (ca *CA) IssueNode(spec NodeSpec) (certPEM, keyPEMBytes []byte, err error) {
	if err := wire.CheckName(spec.Name); err != nil {
		return nil, nil, err
	}
	if strings.EqualFold(spec.Name, "ca") {
		return nil, nil, fmt.Errorf("node name %q is reserved for the CA's files", spec.Name)
	}
	var ou []string
	if spec.Role != 0 {
		if !spec.Role.Valid() {
			return nil, nil, fmt.Errorf("%v: want primary, intermediary or backup", spec.Role)
		}
		ou = []string{spec.Role.String()}
	}
	validity := spec.Validity
	if validity == 0 {
		validity = DefaultNodeValidity
	}
	if validity < 0 {
		return nil, nil, fmt.Errorf("validity %v: want a positive duration", validity)
	}
	notBefore := spec.NotBefore
	if notBefore.IsZero() {
		notBefore = time.Now().Truncate(time.Second).Add(-clockSkew)
	}
	notAfter := notBefore.Add(validity)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	dns := []string{spec.Name, "localhost"}
	ips := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()}
	for _, h := range spec.Hosts {
		if ip, err := netip.ParseAddr(h); err == nil && ip.Zone() == "" {
			ips = append(ips, ip.Unmap())
		} else if err := checkHostname(h); err == nil {
			dns = append(dns, h)
		} else {
			return nil, nil, fmt.Errorf("certificate host %q: want a DNS name or an IP address", h)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generate node key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: spec.Name, Organization: []string{organization}, OrganizationalUnit: ou},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     dedup(dns),
	}
	seen := map[netip.Addr]bool{}
	for _, ip := range ips {
		if !seen[ip] {
			seen[ip] = true
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("create node certificate: %w", err)
	}
	kp, err := keyPEM(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), kp, nil
}

func dedup(s []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, v := range s {
		if !seen[strings.ToLower(v)] {
			seen[strings.ToLower(v)] = true
			out = append(out, v)
		}
	}
	return out
}

// certRole returns the role a node certificate restricts its holder to
// (its single organizational unit), or 0 if it names none.
func certRole(c *x509.Certificate) (wire.Role, error) {
	switch ou := c.Subject.OrganizationalUnit; len(ou) {
	case 0:
		return 0, nil
	case 1:
		r, err := wire.ParseRole(ou[0])
		if err != nil {
			return 0, fmt.Errorf("certificate %q: %w", c.Subject.CommonName, err)
		}
		return r, nil
	default:
		return 0, fmt.Errorf("certificate %q names %d roles, want at most one", c.Subject.CommonName, len(ou))
	}
}

// Credentials are what a node needs to join its cluster's links: its key
// and certificate and the cluster CA certificate. Make them with
// LoadCredentials or NewCredentials.
type Credentials struct {
	name  string
	role  wire.Role
	cert  tls.Certificate
	ca    *x509.Certificate
	roots *x509.CertPool
}

// Name returns the node name (the certificate's common name).
func (c *Credentials) Name() string { return c.name }

// Role returns the role the certificate restricts the node to, 0 for any.
func (c *Credentials) Role() wire.Role { return c.role }

// Certificate returns the node certificate.
func (c *Credentials) Certificate() *x509.Certificate { return c.cert.Leaf }

// NewCredentials builds credentials from PEM data: the cluster CA
// certificate, the node certificate and the node key. It checks that the
// key matches the certificate, that the certificate is signed by the CA for
// server and client authentication and valid now, and that its name and
// role are well formed.
func NewCredentials(caPEM, certPEM, keyPEM []byte) (*Credentials, error) {
	return newCredentials(caPEM, certPEM, keyPEM, time.Now())
}

// newCredentials is NewCredentials checked at time now.
func newCredentials(caPEM, certPEM, keyPEM []byte, now time.Time) (*Credentials, error) {
	ca, err := parseCACert(caPEM)
	if err != nil {
		return nil, err
	}
	if _, err := onePEM(certPEM, "CERTIFICATE"); err != nil {
		return nil, fmt.Errorf("node certificate: %w", err)
	}
	kp, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("node key pair: %w", err)
	}
	leaf := kp.Leaf
	if err := wire.CheckName(leaf.Subject.CommonName); err != nil {
		return nil, fmt.Errorf("node certificate: %w", err)
	}
	role, err := certRole(leaf)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if err := verifyLeaf(leaf, roots, usage, now); err != nil {
			return nil, fmt.Errorf("node certificate %q: %w", leaf.Subject.CommonName, err)
		}
	}
	return &Credentials{name: leaf.Subject.CommonName, role: role, cert: kp, ca: ca, roots: roots}, nil
}

// verifyLeaf checks that leaf is a node certificate signed by a CA in roots
// for usage and valid at now.
func verifyLeaf(leaf *x509.Certificate, roots *x509.CertPool, usage x509.ExtKeyUsage, now time.Time) error {
	if leaf.IsCA {
		return errors.New("a CA certificate is not a node certificate")
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{usage}})
	return err
}

// LoadCredentials loads node name's credentials from dir: ca.crt,
// NAME.crt and NAME.key. The certificate must be name's.
func LoadCredentials(dir, name string) (*Credentials, error) {
	if err := wire.CheckName(name); err != nil {
		return nil, err
	}
	certPath, keyPath := NodeFiles(dir, name)
	var data [3][]byte
	for i, p := range []string{filepath.Join(dir, CACertFile), certPath, keyPath} {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("load credentials: %w", err)
		}
		data[i] = b
	}
	c, err := NewCredentials(data[0], data[1], data[2])
	if err != nil {
		return nil, fmt.Errorf("load credentials from %s: %w", dir, err)
	}
	if c.name != name {
		return nil, fmt.Errorf("load credentials: %s is for node %q, not %q", certPath, c.name, name)
	}
	return c, nil
}

// NodeFiles returns the paths of node name's certificate and key in dir.
func NodeFiles(dir, name string) (certPath, keyPath string) {
	return filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
}

// LoadCA loads the CA certificate and key from dir.
func LoadCA(dir string) (*CA, error) {
	c, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	k, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}
	ca, err := ParseCA(c, k)
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	return ca, nil
}

// WriteCA writes ca.crt and ca.key (mode 0600) into dir, creating dir
// (mode 0700) if needed. Unless force is set it fails, writing nothing, if
// either file exists; the error then matches fs.ErrExist.
func WriteCA(dir string, ca *CA, force bool) error {
	k, err := ca.KeyPEM()
	if err != nil {
		return err
	}
	return writeFiles(force, []file{
		{filepath.Join(dir, CACertFile), ca.CertPEM(), 0o644},
		{filepath.Join(dir, CAKeyFile), k, 0o600},
	})
}

// WriteNode writes node name's certificate and key (mode 0600) into dir,
// with the same rules as WriteCA.
func WriteNode(dir, name string, certPEM, keyPEM []byte, force bool) error {
	if err := wire.CheckName(name); err != nil {
		return err
	}
	c, k := NodeFiles(dir, name)
	return writeFiles(force, []file{{c, certPEM, 0o644}, {k, keyPEM, 0o600}})
}

type file struct {
	path string
	data []byte
	mode fs.FileMode
}

// writeFiles writes each file whole: into a temporary file with its final
// mode, then renamed (force) or linked (no force, so an existing file is
// never replaced) into place.
func writeFiles(force bool, files []file) error {
	if !force {
		for _, f := range files {
			if _, err := os.Lstat(f.path); err == nil {
				return fmt.Errorf("%s: %w", f.path, fs.ErrExist)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
	}
	for _, f := range files {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return err
		}
		if err := writeFile(f, force); err != nil {
			return err
		}
	}
	return nil
}

func writeFile(f file, force bool) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(f.path), "."+filepath.Base(f.path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	if err := tmp.Chmod(f.mode); err != nil {
		return err
	}
	if _, err := tmp.Write(f.data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if force {
		return os.Rename(tmp.Name(), f.path)
	}
	err = os.Link(tmp.Name(), f.path)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s: %w", f.path, fs.ErrExist)
	}
	return err
}
