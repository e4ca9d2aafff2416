package chaos

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// bin is the understudy binary built by TestMain.
var bin string

// proc is one running understudy process with its stderr lines.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set when done is closed

	mu      sync.Mutex
	lines   []string
	changed chan struct{}
}

// start runs understudy with args; stderr goes to dir/name.log and is kept
// for waitFor, stdout goes to dir/name.out.
func start(t testing.TB, dir, name string, env []string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := os.Create(filepath.Join(dir, name+".out"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = out
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), changed: make(chan struct{})}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(io.TeeReader(stderr, logf))
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			close(p.changed)
			p.changed = make(chan struct{})
			p.mu.Unlock()
		}
	}()
	go func() {
		<-copied
		p.err = cmd.Wait()
		out.Close()
		logf.Close()
		close(p.done)
	}()
	t.Cleanup(func() { p.kill() })
	return p
}

// waitFor returns the first stderr line matching re, waiting up to d.
func (p *proc) waitFor(re *regexp.Regexp, d time.Duration) ([]string, error) {
	return p.waitFrom(0, re, d)
}

// lineCount returns how many stderr lines p has printed so far.
func (p *proc) lineCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.lines)
}

// waitFrom is waitFor over the lines from index from on (see lineCount).
func (p *proc) waitFrom(from int, re *regexp.Regexp, d time.Duration) ([]string, error) {
	deadline := time.After(d)
	for i := from; ; {
		p.mu.Lock()
		for ; i < len(p.lines); i++ {
			if m := re.FindStringSubmatch(p.lines[i]); m != nil {
				p.mu.Unlock()
				return m, nil
			}
		}
		changed := p.changed
		p.mu.Unlock()
		select {
		case <-changed:
		case <-p.done:
			p.mu.Lock()
			n := len(p.lines)
			p.mu.Unlock()
			if i == n {
				return nil, fmt.Errorf("%s exited (%v) without printing /%s/; last lines:\n%s", p.name, p.err, re, p.tail(8))
			}
		case <-deadline:
			return nil, fmt.Errorf("%s printed no /%s/ within %v; last lines:\n%s", p.name, re, d, p.tail(8))
		}
	}
}

// has reports whether a stderr line so far contains s.
func (p *proc) has(s string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, l := range p.lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

func (p *proc) tail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	l := p.lines[max(0, len(p.lines)-n):]
	return "  " + strings.Join(l, "\n  ")
}

// kill sends SIGKILL and waits for the process to end.
func (p *proc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// signal sends sig (SIGSTOP and SIGCONT stand for a host that hangs and
// comes back).
func (p *proc) signal(sig syscall.Signal) { p.cmd.Process.Signal(sig) }

// interrupt sends SIGINT and waits up to d for the process to end, then
// kills it.
func (p *proc) interrupt(d time.Duration) error {
	p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		p.kill()
		return fmt.Errorf("%s did not end within %v of SIGINT", p.name, d)
	}
}

// wait waits up to d for the process to end by itself.
func (p *proc) wait(d time.Duration) error {
	select {
	case <-p.done:
		return nil
	case <-time.After(d):
		return fmt.Errorf("%s still running after %v; last lines:\n%s", p.name, d, p.tail(8))
	}
}

var listening = regexp.MustCompile(`listening on (tcp://\S+)`)

// addr waits for p's "listening on ADDR" line.
func (p *proc) addr(t testing.TB) string {
	t.Helper()
	m, err := p.waitFor(listening, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return m[1]
}
