package appliance

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// runTest runs the test role: optional test disk, the command (with a
// timeout), and a probe while it runs; then, while each exits 0, the
// understudy.then commands in order. The understudy.with command runs
// beside them all, from the start; the role waits for it at the end (and
// stops it if the others failed). It returns the status of the last
// command that ran, or the with command's if that failed.
func (a *appliance) runTest(ctx context.Context, cfg config) int {
	if len(cfg.args) == 0 {
		return 0
	}
	if d := cfg.testDisk; d != nil {
		if err := writeTestDisk(d); err != nil {
			a.printf("error: %v", err)
			return statusError
		}
		a.printf("testdisk %s: %d bytes, %q at offset 0", d.path, boot.TestDiskSize, d.text)
	}
	var with chan int
	wctx, stopWith := context.WithCancel(ctx)
	defer stopWith()
	if len(cfg.with) > 0 {
		with = make(chan int, 1)
		go func() { with <- a.runCommand(wctx, command{argv: cfg.with, label: "with", timeout: cfg.timeout}) }()
	}
	var probe func(context.Context) error
	if cfg.probe.IsValid() {
		probe = func(ctx context.Context) error { return a.runProbe(ctx, cfg.probe) }
	}
	env := cfg.roleEnv()
	code := a.runCommand(ctx, command{argv: cfg.args, label: "exec", timeout: cfg.timeout, probe: probe, stdin: cfg.stdin, sig: cfg.signal, env: env})
	for i, argv := range cfg.then {
		if code != 0 {
			a.printf("then: %d more commands not run: the last one failed", len(cfg.then)-i)
			break
		}
		code = a.runCommand(ctx, command{argv: argv, label: "exec", timeout: cfg.timeout, stdin: cfg.stdin, env: env})
	}
	if with != nil {
		if code != 0 {
			a.printf("with: stopping it: the commands failed")
			stopWith()
		}
		if wcode := <-with; code == 0 {
			code = wcode
		}
	}
	return code
}

// writeTestDisk creates the test disk d: boot.TestDiskSize bytes holding
// its text at each of boot.TestDiskOffsets.
func writeTestDisk(d *testDisk) error {
	f, err := os.OpenFile(d.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("testdisk: %w", err)
	}
	defer f.Close()
	if err := f.Truncate(boot.TestDiskSize); err != nil {
		return fmt.Errorf("testdisk: %w", err)
	}
	for _, off := range boot.TestDiskOffsets {
		if _, err := f.WriteAt([]byte(boot.TestDiskText(d.text, off)+"\n"), off); err != nil {
			return fmt.Errorf("testdisk: %w", err)
		}
	}
	return f.Close()
}

// command is one command of the test role.
type command struct {
	argv    []string // argv[0] "understudy" is this binary
	label   string   // what its report lines begin with: "exec" or "with"
	timeout time.Duration
	// probe, if set, runs while the command does; a failed probe fails
	// the run.
	probe func(context.Context) error
	// stdin, if set, is written with a newline to the command's stdin (a
	// pipe) once its output shows a nested guest waiting for a console
	// line: boot.EchoPrompt, or boot.RestoredLine for a restored guest
	// that waited before its snapshot. Otherwise stdin is /dev/null.
	stdin string
	// sig, if set, is sent to the command once its output has a line
	// containing sig.text.
	sig *signalSpec
	// env is added to the uinit's environment for the command
	// (UNDERSTUDY_FAILPOINT); nil: the uinit's own.
	env []string
}

// runCommand runs c with the console as its output, a line at a time (so
// that commands running at once do not mix their lines), stopping it after
// its timeout (0: never).
func (a *appliance) runCommand(ctx context.Context, c command) int {
	if c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	prog := c.argv[0]
	if prog == "understudy" {
		prog = a.Self
	}
	cmd := exec.CommandContext(ctx, prog, c.argv[1:]...)
	if c.env != nil {
		cmd.Env = append(os.Environ(), c.env...)
	}
	lines := &lineWriter{w: a.Out}
	defer lines.Flush()
	cmd.Stdout, cmd.Stderr = lines, lines
	cmd.WaitDelay = 5 * time.Second
	if c.stdin != "" {
		in, err := cmd.StdinPipe() // closed by Wait once the command exits
		if err != nil {
			a.printf("%s: %v", c.label, err)
			return statusError
		}
		w := &promptWatcher{w: cmd.Stdout, prompts: [][]byte{[]byte(boot.EchoPrompt), []byte(boot.RestoredLine)}}
		w.fire = func() {
			// Not on the writer's goroutine: the pipe may be full.
			// Report first: once the line is written, the guest prints.
			a.printf("stdin: writing %q after the prompt", c.stdin)
			go func() {
				if _, err := io.WriteString(in, c.stdin+"\n"); err != nil {
					a.printf("stdin: %v", err)
				}
			}()
		}
		cmd.Stdout, cmd.Stderr = w, w
	}
	started := make(chan struct{}) // closed once cmd.Process is set
	if sig := c.sig; sig != nil {
		w := &promptWatcher{w: cmd.Stdout, prompts: [][]byte{[]byte(sig.text)}}
		w.fire = func() {
			a.printf("signal: sending SIG%s after %q", sig.name, sig.text)
			go func() {
				<-started
				if cmd.Process == nil {
					return // Start failed
				}
				if err := cmd.Process.Signal(sig.sig); err != nil {
					a.printf("signal: %v", err)
				}
			}()
		}
		cmd.Stdout, cmd.Stderr = w, w
	}
	a.printf("%s: %s%s", c.label, envNote(c.env), strings.Join(quoteArgs(c.argv), " "))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		close(started)
		a.printf("%s: %v", c.label, err)
		return statusError
	}
	close(started)
	probeErr := make(chan error, 1)
	pctx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	if c.probe != nil {
		go func() { probeErr <- c.probe(pctx) }()
	} else {
		probeErr <- nil
	}
	err := cmd.Wait()
	stopProbe()
	perr := <-probeErr
	lines.Flush() // the command's last words before the report
	took := time.Since(start).Round(time.Millisecond)
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		a.printf("%s: stopped after the %v timeout", c.label, c.timeout)
		code = statusError
	case errors.As(err, &ee):
		code = ee.ExitCode()
		if code < 0 {
			code = statusError
		}
		a.printf("%s: exit status %d after %v (%v)", c.label, code, took, err)
	case err != nil:
		a.printf("%s: %v after %v", c.label, err, took)
		code = statusError
	default:
		a.printf("%s: exit status 0 after %v", c.label, took)
	}
	if perr != nil && code == 0 {
		code = statusError
	}
	return code
}

// lineWriter passes whole lines on to w, each in one write, and keeps a
// line's beginning until its end arrives (or Flush, or maxPartial bytes).
// exec copies a command's output from one goroutine, so it needs no lock.
type lineWriter struct {
	w    io.Writer
	part []byte
}

// maxPartial bounds the bytes a lineWriter keeps waiting for a newline.
const maxPartial = 4 << 10

func (l *lineWriter) Write(b []byte) (int, error) {
	n := len(b)
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			l.part = append(l.part, b...)
			if len(l.part) >= maxPartial {
				return n, l.Flush()
			}
			return n, nil
		}
		var err error
		if len(l.part) > 0 {
			l.part = append(l.part, b[:i+1]...)
			_, err = l.w.Write(l.part)
			l.part = l.part[:0]
		} else {
			_, err = l.w.Write(b[:i+1])
		}
		if err != nil {
			return n - len(b), err
		}
		b = b[i+1:]
	}
	return n, nil
}

// Flush passes on what is kept of an unfinished line.
func (l *lineWriter) Flush() error {
	if len(l.part) == 0 {
		return nil
	}
	_, err := l.w.Write(l.part)
	l.part = l.part[:0]
	return err
}

// promptWatcher passes writes through to w and calls fire once, at the end
// of the first line that contains one of prompts (wherever writes split
// it), after passing that line on.
type promptWatcher struct {
	w       io.Writer
	prompts [][]byte
	fire    func()

	mu    sync.Mutex // guards tail, seen and fired
	tail  []byte     // the last (longest prompt)-1 bytes seen
	seen  bool       // a prompt is on the current line
	fired bool
}

func (p *promptWatcher) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fired {
		return p.w.Write(b)
	}
	if !p.seen {
		buf := append(p.tail, b...)
		end, longest := -1, 0
		for _, pr := range p.prompts {
			longest = max(longest, len(pr))
			if i := bytes.Index(buf, pr); i >= 0 && (end < 0 || i+len(pr) < end) {
				end = i + len(pr)
			}
		}
		if end >= 0 {
			p.seen, p.tail = true, nil
			// Where the prompt ends in b (it may have begun in tail).
			return p.passLine(b, max(0, end-(len(buf)-len(b))))
		}
		keep := min(len(buf), longest-1)
		p.tail = append([]byte(nil), buf[len(buf)-keep:]...)
		return p.w.Write(b)
	}
	return p.passLine(b, 0)
}

// passLine writes b, firing after the first newline at or after from.
func (p *promptWatcher) passLine(b []byte, from int) (int, error) {
	nl := bytes.IndexByte(b[from:], '\n')
	if nl < 0 {
		return p.w.Write(b)
	}
	n, err := p.w.Write(b[:from+nl+1])
	if err != nil {
		return n, err
	}
	p.fired = true
	p.fire()
	m, err := p.w.Write(b[from+nl+1:])
	return n + m, err
}

// envNote shows the variables a command gets besides the uinit's, as a
// shell would take them: "UNDERSTUDY_FAILPOINT=stun@3 ".
func envNote(env []string) string {
	var b strings.Builder
	for _, e := range env {
		b.WriteString(e + " ")
	}
	return b.String()
}

func quoteArgs(argv []string) []string {
	out := slices.Clone(argv)
	for i, s := range out {
		if s == "" || strings.ContainsAny(s, " \t") {
			out[i] = "'" + s + "'"
		}
	}
	return out
}

// runProbe connects to addr until it answers or ctx ends (the command
// exited or timed out), and prints the first line of the answer.
func (a *appliance) runProbe(ctx context.Context, addr netip.AddrPort) error {
	var d net.Dialer
	start := time.Now()
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		conn, err := d.DialContext(cctx, "tcp", addr.String())
		cancel()
		if err == nil {
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			line, rerr := bufio.NewReader(io.LimitReader(conn, 1024)).ReadString('\n')
			if rerr != nil && line == "" {
				a.printf("probe tcp:%v: connected after %v, no answer: %v", addr, time.Since(start).Round(time.Millisecond), rerr)
				return rerr
			}
			a.printf("probe tcp:%v: answer %q after %v", addr, strings.TrimSuffix(line, "\n"), time.Since(start).Round(time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			a.printf("probe tcp:%v: no connection before the command ended: %v", addr, err)
			return err
		case <-time.After(200 * time.Millisecond):
		}
	}
}
