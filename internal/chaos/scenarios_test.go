package chaos

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
)

// scenario runs fn in a fresh directory, keeping its logs if it fails.
func scenario(t *testing.T, fn func(c *cluster) error) {
	kvmtest.Require(t)
	dir := t.TempDir()
	c := newCluster(t, dir)
	if err := fn(c); err != nil {
		keep(t, dir, t.Name())
		t.Fatal(err)
	}
}

// TestIntermediaryLoss kills the intermediary: the primary's guest goes on
// (policy hold) but nothing more is released; a new intermediary on the
// same address gets a full image and the client's sequence continues
// without a gap; then the primary is killed and the backup, re-seeded
// through the new intermediary, resumes with nothing lost.
func TestIntermediaryLoss(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("")
		c.startIntermediary("1")
		c.startPrimary(nil, "")
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		c.inter.kill()
		time.Sleep(100 * time.Millisecond) // acknowledgements in flight land
		held := c.clientSeen()
		time.Sleep(500 * time.Millisecond)
		if n := c.clientSeen(); n != held {
			return fmt.Errorf("with no intermediary the client saw %d more records: output released without an acknowledgement", n-held)
		}
		if _, err := c.primary.waitFor(reLost, 5*time.Second); err != nil {
			return err
		}
		c.startIntermediary("2")
		if _, err := c.primary.waitFor(reReached, 20*time.Second); err != nil {
			return err
		}
		if err := c.waitClient(held+500, 20*time.Second); err != nil {
			return fmt.Errorf("after the new intermediary: %w", err)
		}
		c.primary.kill()
		defer c.inter.kill()
		return c.finish("", true)
	})
}

// TestIntermediaryLossDirect: under the primary's direct policy a lost
// intermediary does not stop the output: the primary replicates straight to
// the backup, which acknowledges, and the client's sequence goes on. Then
// the primary is killed; the backup, which committed every epoch it
// acknowledged, activates by itself with nothing lost.
func TestIntermediaryLossDirect(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("")
		c.startIntermediary("")
		c.startPrimary(nil, "", "--on-intermediary-loss", "direct", "--direct-backup", c.bAddr)
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		c.inter.kill()
		if _, err := c.primary.waitFor(mustRE(`replicating straight to the backup`), 10*time.Second); err != nil {
			return err
		}
		if _, err := c.backup.waitFor(mustRE(`primary "primary" connected directly`), 10*time.Second); err != nil {
			return err
		}
		if err := c.waitClient(c.clientSeen()+500, 20*time.Second); err != nil {
			return fmt.Errorf("replicating straight to the backup: %w", err)
		}
		c.primary.kill()
		if _, err := c.backup.waitFor(mustRE(`primary lost on its direct link at committed epoch \d+: activating`), 10*time.Second); err != nil {
			return err
		}
		return c.finish("", true)
	})
}

var (
	reLost    = mustRE(`intermediary lost`)
	reReached = mustRE(`intermediary reached again`)
	reReseed  = mustRE(`re-seeded the backup with a full image`)
)

// TestBackupLoss kills the backup: the primary goes on and the client keeps
// receiving output (policy continue); a new backup on the same address is
// re-seeded with a full image; then the primary is killed and the new
// backup resumes with nothing lost.
func TestBackupLoss(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("1")
		c.startIntermediary("")
		c.startPrimary(nil, "")
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		c.backup.kill()
		n := c.clientSeen()
		if err := c.waitClient(n+1000, 20*time.Second); err != nil {
			return fmt.Errorf("without a backup the primary should go on: %w", err)
		}
		from := c.inter.lineCount() // the first backup's seed is before this
		c.startBackup("2")
		if _, err := c.backup.waitFor(mustRE(`committed=|connected \(committed epoch 0\)`), 20*time.Second); err != nil {
			return err
		}
		if _, err := c.inter.waitFrom(from, reReseed, 20*time.Second); err != nil {
			return fmt.Errorf("the new backup: %w", err)
		}
		if err := c.waitClient(c.clientSeen()+200, 20*time.Second); err != nil {
			return err
		}
		c.primary.kill()
		defer c.inter.kill()
		return c.finish("2", true)
	})
}

// TestCorruptCheckpoint: the primary sends one checkpoint corrupted on its
// way out (a page byte flipped after its digest was computed; the link is
// mutual TLS, so this stands for a fault at the sender). The intermediary
// refuses it, changes nothing and does not fail over: the primary is alive,
// reconnects and sends a full image, and the client's sequence goes on.
// Then the primary is killed and the backup resumes with nothing lost.
func TestCorruptCheckpoint(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("")
		c.startIntermediary("")
		c.startPrimary([]string{"UNDERSTUDY_FAILPOINT=corrupt@20"}, "")
		if _, err := c.inter.waitFor(mustRE(`refused the primary's message: .*checkpoint 20: digest mismatch`), 20*time.Second); err != nil {
			return err
		}
		if _, err := c.inter.waitFor(mustRE(`primary "primary" reconnected`), 10*time.Second); err != nil {
			return err
		}
		if _, err := c.primary.waitFor(reReached, 10*time.Second); err != nil {
			return err
		}
		if err := c.waitClient(c.clientSeen()+500, 20*time.Second); err != nil {
			return fmt.Errorf("after the refused checkpoint: %w", err)
		}
		if c.inter.has("failing over") || c.backup.has("activated") {
			return fmt.Errorf("a refused checkpoint from a live primary led to a failover")
		}
		c.primary.kill()
		defer c.inter.kill()
		return c.finish("", true)
	})
}

// TestRestartedIntermediary: a primary that hangs (SIGSTOP, as a host that
// stops answering) is failed over, and the intermediary, done, exits. It is
// started again on its address, as a supervisor would. When the old primary
// comes back (SIGCONT) and reaches the new intermediary, the backup, which
// runs the guest now, refuses that intermediary, which fences the primary:
// the old primary stops its guest and none of its held output is released.
func TestRestartedIntermediary(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.peerTimeout = "600ms"
		c.startBackup("")
		c.startIntermediary("1")
		c.startPrimary(nil, "")
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		c.primary.signal(syscall.SIGSTOP)
		if _, err := c.inter.waitFor(mustRE(`backup activated at epoch`), 20*time.Second); err != nil {
			return err
		}
		if err := c.inter.wait(10 * time.Second); err != nil {
			return err
		}
		c.startIntermediary("2")
		c.primary.signal(syscall.SIGCONT)
		if _, err := c.inter.waitFor(mustRE(`runs the guest already`), 20*time.Second); err != nil {
			return err
		}
		if _, err := c.backup.waitFor(mustRE(`refused intermediary "intermediary": this backup runs the guest`), 5*time.Second); err != nil {
			return err
		}
		if err := c.primary.wait(20 * time.Second); err != nil {
			return err
		}
		if !c.primary.has("fenced by the intermediary") {
			return fmt.Errorf("the old primary ended without being fenced; last lines:\n%s", c.primary.tail(8))
		}
		// What the old primary released is covered by the activated
		// epoch: finish checks the client against the activated image.
		defer c.inter.kill()
		return c.finish("", true)
	})
}

// TestLinkCut cuts the primary's link without closing it (a relay stops
// forwarding, as a failed switch would): no reset reaches either end. The
// intermediary declares the silent primary lost after its peer timeout,
// fences it and fails over; the primary, cut off, never releases another
// record. Everything the client saw is in the activated image.
func TestLinkCut(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.peerTimeout = "600ms"
		c.startBackup("")
		c.startIntermediary("")
		r, err := newRelay(strings.TrimPrefix(c.iAddr, "tcp://"))
		if err != nil {
			return err
		}
		defer r.close()
		c.startPrimary(nil, "tcp://"+r.addr())
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		r.cut()
		if _, err := c.inter.waitFor(mustRE(`primary lost at epoch`), 10*time.Second); err != nil {
			return err
		}
		if err := c.finish("", true); err != nil {
			return err
		}
		// The cut-off primary is still alive, holding its output.
		seen := c.clientSeen()
		time.Sleep(300 * time.Millisecond)
		if n := c.clientSeen(); n != seen {
			return fmt.Errorf("the cut-off primary released %d more records after the failover", n-seen)
		}
		c.primary.kill()
		c.inter.kill()
		return nil
	})
}

// TestBadPeers connects peers that must be refused while a protected guest
// runs: plain TCP garbage, TLS with a certificate from another CA, and a
// valid certificate for the wrong role. Each is refused and logged; the
// guest's protection goes on unchanged and a failover afterwards loses
// nothing.
func TestBadPeers(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("")
		c.startIntermediary("")
		c.startPrimary(nil, "")
		if err := c.waitClient(300, 20*time.Second); err != nil {
			return err
		}
		for _, addr := range []string{c.iAddr, c.bAddr} {
			hp := strings.TrimPrefix(addr, "tcp://")
			if err := garbagePeer(hp); err != nil {
				return err
			}
			if err := foreignTLSPeer(hp); err != nil {
				return err
			}
		}
		if _, err := c.inter.waitFor(mustRE(`refused peer`), 10*time.Second); err != nil {
			return err
		}
		if _, err := c.backup.waitFor(mustRE(`refused peer`), 10*time.Second); err != nil {
			return err
		}
		// A real certificate of the wrong role: the backup's, at the
		// intermediary's primary port.
		wrong := start(c.t, c.dir, "wrongrole", nil, "run", "--payload", payloadArg, "--mem", guestMem,
			"--protect", c.iAddr, "--keys", c.keys, "--name", "backup", "--status-interval", "0")
		if err := wrong.wait(20 * time.Second); err != nil {
			return err
		}
		if wrong.err == nil {
			return fmt.Errorf("a primary with the backup's certificate was accepted")
		}
		n := c.clientSeen()
		if err := c.waitClient(n+300, 20*time.Second); err != nil {
			return fmt.Errorf("after the bad peers protection should go on: %w", err)
		}
		c.primary.kill()
		defer c.inter.kill()
		return c.finish("", true)
	})
}

// TestPrimaryAndIntermediaryLost kills both at once. The backup, told to
// activate on its own after a second without an intermediary, resumes from
// its committed epoch and reports the data-loss window; it never claims
// nothing was lost when the client saw more than it has.
func TestPrimaryAndIntermediaryLost(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("", "--on-intermediary-loss", "activate-after=1s", "--status-interval", "50ms")
		c.startIntermediary("")
		c.startPrimary(nil, "")
		if err := c.waitClient(1000, 20*time.Second); err != nil {
			return err
		}
		// The backup has committed an epoch (the re-seed took a moment).
		if _, err := c.backup.waitFor(mustRE(`committed=[1-9]`), 20*time.Second); err != nil {
			return err
		}
		// The intermediary first: had it outlived the primary by a moment,
		// it would have failed over with nothing lost.
		c.inter.kill()
		c.primary.kill()
		m, err := c.backup.waitFor(mustRE(`DATA MAY BE LOST: activated at epoch (\d+); .*may be lost`), 20*time.Second)
		if err != nil {
			return err
		}
		c.t.Logf("backup: %s", m[0])
		return c.finish("", false)
	})
}

// garbagePeer sends bytes that are not TLS.
func garbagePeer(addr string) error {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	nc.Write([]byte("GET / HTTP/1.0\r\n\r\nnot a TLS client hello, not an understudy peer"))
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	io.Copy(io.Discard, nc) // until the server drops it
	return nil
}

// foreignTLSPeer tries TLS with a self-signed certificate of another CA.
func foreignTLSPeer(addr string) error {
	cert, err := selfSigned()
	if err != nil {
		return err
	}
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	tc := tls.Client(nc, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); err == nil {
		// TLS 1.3 reports a rejected client certificate on the first read.
		if _, err := tc.Read(make([]byte, 1)); err == nil {
			return fmt.Errorf("a peer with a foreign certificate was answered at %s", addr)
		}
	}
	return nil
}

func mustRE(s string) *regexp.Regexp { return regexp.MustCompile(s) }

// relay forwards TCP connections to a target until cut: then it stops
// moving bytes in both directions but keeps every socket open, like a link
// that silently drops everything, and accepts no new connections.
type relay struct {
	ln     net.Listener
	target string
	cutCh  chan struct{}
	closed chan struct{}
	mu     sync.Mutex // guards conns
	conns  []net.Conn
}

func newRelay(target string) (*relay, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &relay{ln: ln, target: target, cutCh: make(chan struct{}), closed: make(chan struct{})}
	go r.serve()
	return r, nil
}

func (r *relay) addr() string { return r.ln.Addr().String() }

func (r *relay) serve() {
	for {
		a, err := r.ln.Accept()
		if err != nil {
			return
		}
		select {
		case <-r.cutCh:
			r.hold(a) // the far side is unreachable: connect never completes
			continue
		default:
		}
		b, err := net.Dial("tcp", r.target)
		if err != nil {
			a.Close()
			continue
		}
		r.hold(a, b)
		go r.pipe(a, b)
		go r.pipe(b, a)
	}
}

func (r *relay) hold(cs ...net.Conn) {
	r.mu.Lock()
	r.conns = append(r.conns, cs...)
	r.mu.Unlock()
}

// pipe copies until cut, then discards nothing and sends nothing more.
func (r *relay) pipe(dst, src net.Conn) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-r.cutCh:
			<-r.closed // the link is dead: hold everything, say nothing
			return
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *relay) cut() { close(r.cutCh) }

func (r *relay) close() {
	close(r.closed)
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
}

// selfSigned makes a certificate no Understudy cluster CA signed.
func selfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "primary"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// TestBackupLossStall is TestBackupLoss under the intermediary's stall
// policy: while no backup is attached nothing is acknowledged, so the
// client sees nothing new; a new backup is re-seeded and output resumes.
func TestBackupLossStall(t *testing.T) {
	scenario(t, func(c *cluster) error {
		c.startBackup("1")
		c.startIntermediary("", "--on-backup-loss", "stall")
		c.startPrimary(nil, "")
		if err := c.waitClient(500, 20*time.Second); err != nil {
			return err
		}
		c.backup.kill()
		if _, err := c.inter.waitFor(mustRE(`holding acknowledgements`), 10*time.Second); err != nil {
			return err
		}
		time.Sleep(100 * time.Millisecond)
		held := c.clientSeen()
		time.Sleep(500 * time.Millisecond)
		if n := c.clientSeen(); n != held {
			return fmt.Errorf("with no backup under the stall policy the client saw %d more records", n-held)
		}
		c.startBackup("2")
		if err := c.waitClient(held+500, 20*time.Second); err != nil {
			return fmt.Errorf("after the new backup: %w", err)
		}
		c.primary.kill()
		defer c.inter.kill()
		return c.finish("2", true)
	})
}
