package chaos

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "understudy-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "understudy")
	build := exec.Command("go", "build", "-o", bin, "github.com/understudy-vmm/understudy/vmm/cmd/understudy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: build understudy: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// keysDir makes one cluster CA and the three nodes' certificates.
var keysOnce = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "understudy-chaos-keys-")
	if err != nil {
		return "", err
	}
	run := func(args ...string) error {
		out, err := exec.Command(bin, args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("understudy %v: %v: %s", args, err, out)
		}
		return nil
	}
	if err := run("keys", "init", "--dir", dir); err != nil {
		return "", err
	}
	for _, r := range []string{"primary", "intermediary", "backup"} {
		if err := run("keys", "issue", "--dir", dir, "--name", r, "--role", r); err != nil {
			return "", err
		}
	}
	return dir, nil
})

// cluster is one scenario's three roles.
type cluster struct {
	t       testing.TB
	dir     string
	keys    string
	backup  *proc
	inter   *proc
	primary *proc
	bAddr   string
	iAddr   string
	// Faster failure detection than the defaults, for link cuts.
	peerTimeout string
}

func newCluster(t testing.TB, dir string) *cluster {
	keys, err := keysOnce()
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{t: t, dir: dir, keys: keys, peerTimeout: "2s"}
}

func (c *cluster) common(name string) []string {
	return []string{"--keys", c.keys, "--name", name, "--status-interval", "0", "--peer-timeout", c.peerTimeout, "--verbose"}
}

func (c *cluster) startBackup(tag string, extra ...string) {
	args := append([]string{"backup", "--listen", "tcp://127.0.0.1:0", "--records", c.path("backup" + tag + ".records"),
		"--save-activated", c.path("activated" + tag + ".snap")}, c.common("backup")...)
	if c.bAddr != "" {
		args[2] = c.bAddr // a returning backup listens where the old one did
	}
	c.backup = start(c.t, c.dir, "backup"+tag, nil, append(args, extra...)...)
	c.bAddr = c.backup.addr(c.t)
}

func (c *cluster) startIntermediary(tag string, extra ...string) {
	listen := "tcp://127.0.0.1:0"
	if c.iAddr != "" {
		listen = c.iAddr
	}
	args := append([]string{"intermediary", "--listen", listen, "--backup", c.bAddr}, c.common("intermediary")...)
	c.inter = start(c.t, c.dir, "intermediary"+tag, nil, append(args, extra...)...)
	c.iAddr = c.inter.addr(c.t)
}

func (c *cluster) startPrimary(env []string, via string, extra ...string) {
	if via == "" {
		via = c.iAddr
	}
	args := append([]string{"run", "--payload", payloadArg, "--mem", guestMem, "--interval", "20ms",
		"--protect", via, "--records", c.path("client.records")}, c.common("primary")...)
	c.primary = start(c.t, c.dir, "primary", env, append(args, extra...)...)
}

func (c *cluster) path(name string) string { return filepath.Join(c.dir, name) }

// clientSeen returns how many records the client has seen so far.
func (c *cluster) clientSeen() int {
	r, _ := readRecords(c.path("client.records"))
	return len(r)
}

// waitClient waits until the client has seen at least n records.
func (c *cluster) waitClient(n int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for c.clientSeen() < n {
		if time.Now().After(deadline) {
			return fmt.Errorf("the client saw %d records within %v, want %d; primary:\n%s", c.clientSeen(), d, n, c.primary.tail(8))
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

var activatedLine = regexp.MustCompile(`activated at epoch (\d+); resuming`)

// finish waits for the backup to activate and resume, lets it run until it
// has released records past what the client saw, stops it and checks the
// outcome. tag names the backup instance that activates.
func (c *cluster) finish(tag string, noLoss bool) error {
	if _, err := c.backup.waitFor(activatedLine, 40*time.Second); err != nil {
		return err
	}
	client, err := readRecords(c.path("client.records"))
	if err != nil {
		return err
	}
	// The resumed guest runs on until it has gone past the client.
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := readRecords(c.path("backup" + tag + ".records"))
		if len(b) > 0 && b[len(b)-1] > uint64(len(client)) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.backup.interrupt(10 * time.Second); err != nil {
		return err
	}
	backup, err := readRecords(c.path("backup" + tag + ".records"))
	if err != nil {
		return err
	}
	a, err := readActivated(c.path("activated" + tag + ".snap"))
	if err != nil {
		return err
	}
	return verdict(client, backup, a, noLoss, c.backup.has("DATA MAY BE LOST"))
}

// keep saves a failed scenario's logs under build/chaos/NAME.
func keep(t testing.TB, dir, name string) {
	dst := filepath.Join("..", "..", "build", "chaos", name)
	os.RemoveAll(dst)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err == nil {
		if err := exec.Command("cp", "-r", dir, dst).Run(); err == nil {
			abs, _ := filepath.Abs(dst)
			t.Logf("logs kept in %s", abs)
		}
	}
}

// injections returns UNDERSTUDY_INJECTIONS, or def.
func injections(t testing.TB, def int) int {
	s := os.Getenv("UNDERSTUDY_INJECTIONS")
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("UNDERSTUDY_INJECTIONS=%q: want a positive count", s)
	}
	return n
}

// stages are where a primary is killed: the failpoints of ft/failpoint.go
// and a SIGKILL at a random time.
var stages = []string{"stun", "transfer", "sent", "random"}

// TestPrimaryKill kills the primary (SIGKILL) many times, at each failpoint
// and at random times, and checks after every failover that nothing the
// client saw was lost and that the activated image is one instant.
func TestPrimaryKill(t *testing.T) {
	kvmtest.Require(t)
	killMany(t, "soak ft", injections(t, 200), roleArgs{})
}

// TestPrimaryKillHoldBack is TestPrimaryKill with the intermediary holding
// back hot pages and compressing what it sends the backup (the counter's
// hot pages are rewritten every iteration; syncs every 10 epochs at most),
// 40 kills (a fifth of UNDERSTUDY_INJECTIONS when that is larger): Failover
// flushes what is held, so nothing the client saw is lost.
func TestPrimaryKillHoldBack(t *testing.T) {
	kvmtest.Require(t)
	killMany(t, "soak ft-holdback", max(40, injections(t, 200)/5),
		roleArgs{inter: []string{"--hold-back", "threshold=2,max-lag-epochs=10", "--wan-compress", "fastest"}})
}

// TestPrimaryKillManifest is TestPrimaryKill with backup-driven retrieval:
// the backup installs a manifest policy and requests the pages that
// settle, 20 kills (a tenth of UNDERSTUDY_INJECTIONS when that is larger).
func TestPrimaryKillManifest(t *testing.T) {
	kvmtest.Require(t)
	killMany(t, "soak ft-manifest", max(20, injections(t, 200)/10),
		roleArgs{backup: []string{"--policy", "manifest,max-lag-epochs=10", "--request", "settle=2"}})
}

// TestPrimaryKillLargePages is TestPrimaryKill with large-page management
// on the primary (run --large-pages with the refault sampler, which revokes
// nothing while checkpoints copy memory) and on the guest the backup
// resumes (backup --large-pages), 20 kills.
func TestPrimaryKillLargePages(t *testing.T) {
	kvmtest.Require(t)
	lp := []string{"--large-pages", "budget=2,period=20ms,window=5ms,source=refault"}
	killMany(t, "soak ft-largepages", max(20, injections(t, 200)/10), roleArgs{primary: lp, backup: lp})
}

// TestPrimaryKillDirtyBudget is TestPrimaryKill with epochs ended by the
// primary's dirty budget (32 pages; the interval of a second never runs
// out), 20 kills.
func TestPrimaryKillDirtyBudget(t *testing.T) {
	kvmtest.Require(t)
	killMany(t, "soak ft-dirty-budget", max(20, injections(t, 200)/10),
		roleArgs{primary: []string{"--interval", "1s", "--dirty-budget", "128K"}})
}

// roleArgs are extra arguments for the primary, the intermediary and the
// backup.
type roleArgs struct{ primary, inter, backup []string }

// killMany runs n primary kills, two at a time, and prints a summary line
// starting with what.
func killMany(t *testing.T, what string, n int, args roleArgs) {
	const workers = 2
	var (
		next, violations atomic.Int64
		unacked          atomic.Int64 // kills before any acknowledgement: nothing to fail over
		wg               sync.WaitGroup
		mu               sync.Mutex
		byStage          = map[string]int{}
	)
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(seed), uint64(w)))
			for {
				i := int(next.Add(1))
				if i > n || t.Failed() && violations.Load() >= 5 {
					return
				}
				stage := stages[i%len(stages)]
				failedOver, err := killOnce(t, stage, rng, args)
				if err == nil && !failedOver {
					unacked.Add(1)
				}
				mu.Lock()
				byStage[stage]++
				mu.Unlock()
				if err != nil {
					violations.Add(1)
					t.Errorf("injection %d (%s): %v", i, stage, err)
				}
			}
		})
	}
	wg.Wait()
	done := min(int(next.Load()), n)
	fmt.Printf("%s: injections=%d violations=%d failovers=%d before_first_ack=%d stun=%d transfer=%d sent=%d random=%d elapsed_s=%.0f\n",
		what, done, violations.Load(), int64(done)-violations.Load()-unacked.Load(), unacked.Load(),
		byStage["stun"], byStage["transfer"], byStage["sent"], byStage["random"], time.Since(start).Seconds())
}

// killOnce runs one primary-kill scenario. It reports whether the backup
// took over (false: the primary died before any acknowledgement).
func killOnce(t *testing.T, stage string, rng *rand.Rand, args roleArgs) (failedOver bool, err error) {
	dir, derr := os.MkdirTemp("", "chaos-kill-")
	if derr != nil {
		return false, derr
	}
	defer func() {
		if err != nil {
			keep(t, dir, fmt.Sprintf("kill-%s-%d", stage, time.Now().UnixNano()))
		}
		os.RemoveAll(dir)
	}()
	c := newCluster(t, dir)
	c.startBackup("", args.backup...)
	c.startIntermediary("", args.inter...)
	epoch := 2 + rng.IntN(30)
	var env []string
	if stage != "random" {
		env = []string{fmt.Sprintf("UNDERSTUDY_FAILPOINT=%s@%d", stage, epoch)}
	}
	c.startPrimary(env, "", args.primary...)
	if stage == "random" {
		time.Sleep(time.Duration(50+rng.IntN(800)) * time.Millisecond)
		c.primary.kill()
	} else if err := c.primary.wait(30 * time.Second); err != nil {
		return false, fmt.Errorf("the primary did not die at its failpoint: %w", err)
	}
	defer c.inter.kill()
	// Killed before it even reached the intermediary: nothing can have
	// been released.
	time.Sleep(200 * time.Millisecond)
	if !c.inter.has("primary \"primary\" connected") {
		if n := c.clientSeen(); n != 0 {
			return false, fmt.Errorf("the primary never reached the intermediary, but the client saw %d records", n)
		}
		return false, nil
	}
	// Killed before the intermediary had acknowledged a checkpoint (a
	// killed host's unread data is lost with the reset its kernel sends):
	// nothing was released, and there is nothing to activate.
	if m, err := c.inter.waitFor(nothingToActivate, 40*time.Second); err == nil && m[0] != "backup activated at epoch" {
		if n := c.clientSeen(); n != 0 {
			return false, fmt.Errorf("the intermediary had acknowledged nothing, but the client saw %d records", n)
		}
		return false, nil
	}
	return true, c.finish("", true)
}

var nothingToActivate = regexp.MustCompile(`no output was released|backup activated at epoch`)
