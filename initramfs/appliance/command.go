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
// understudy.then commands in order. It returns the status of the last
// command that ran.
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
	var probe func(context.Context) error
	if cfg.probe.IsValid() {
		probe = func(ctx context.Context) error { return a.runProbe(ctx, cfg.probe) }
	}
	code := a.runCommand(ctx, cfg.args, cfg.timeout, probe, cfg.stdin, cfg.signal)
	for i, argv := range cfg.then {
		if code != 0 {
			a.printf("then: %d more commands not run: the last one failed", len(cfg.then)-i)
			break
		}
		code = a.runCommand(ctx, argv, cfg.timeout, nil, "", nil)
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

// runCommand runs argv (argv[0] "understudy" is this binary) with the
// console as its output, stopping it after timeout (0: never). probe, if
// set, runs while the command does; a failed probe fails the run. With
// stdin set, the command's stdin is a pipe that gets stdin and a newline
// once the command prints boot.EchoPrompt; otherwise it is /dev/null. With
// sig set, the command gets sig.sig once its output has a line containing
// sig.text.
func (a *appliance) runCommand(ctx context.Context, argv []string, timeout time.Duration, probe func(context.Context) error, stdin string, sig *signalSpec) int {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	prog := argv[0]
	if prog == "understudy" {
		prog = a.Self
	}
	cmd := exec.CommandContext(ctx, prog, argv[1:]...)
	cmd.Stdout, cmd.Stderr = a.Out, a.Out
	cmd.WaitDelay = 5 * time.Second
	if stdin != "" {
		in, err := cmd.StdinPipe() // closed by Wait once the command exits
		if err != nil {
			a.printf("exec: %v", err)
			return statusError
		}
		w := &promptWatcher{w: a.Out, prompt: []byte(boot.EchoPrompt)}
		w.fire = func() {
			// Not on the writer's goroutine: the pipe may be full.
			// Report first: once the line is written, the guest prints.
			a.printf("stdin: writing %q after the prompt", stdin)
			go func() {
				if _, err := io.WriteString(in, stdin+"\n"); err != nil {
					a.printf("stdin: %v", err)
				}
			}()
		}
		cmd.Stdout, cmd.Stderr = w, w
	}
	started := make(chan struct{}) // closed once cmd.Process is set
	if sig != nil {
		w := &promptWatcher{w: cmd.Stdout, prompt: []byte(sig.text)}
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
	a.printf("exec: %s", strings.Join(quoteArgs(argv), " "))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		close(started)
		a.printf("exec: %v", err)
		return statusError
	}
	close(started)
	probeErr := make(chan error, 1)
	pctx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	if probe != nil {
		go func() { probeErr <- probe(pctx) }()
	} else {
		probeErr <- nil
	}
	err := cmd.Wait()
	stopProbe()
	perr := <-probeErr
	took := time.Since(start).Round(time.Millisecond)
	code := 0
	var ee *exec.ExitError
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		a.printf("exec: stopped after the %v timeout", timeout)
		code = statusError
	case errors.As(err, &ee):
		code = ee.ExitCode()
		if code < 0 {
			code = statusError
		}
		a.printf("exec: exit status %d after %v (%v)", code, took, err)
	case err != nil:
		a.printf("exec: %v after %v", err, took)
		code = statusError
	default:
		a.printf("exec: exit status 0 after %v", took)
	}
	if perr != nil && code == 0 {
		code = statusError
	}
	return code
}

// promptWatcher passes writes through to w and calls fire once, at the end
// of the first line that contains prompt (wherever writes split it), after
// passing that line on.
type promptWatcher struct {
	w      io.Writer
	prompt []byte
	fire   func()

	mu    sync.Mutex // guards tail, seen and fired
	tail  []byte     // the last len(prompt)-1 bytes seen
	seen  bool       // the prompt is on the current line
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
		if i := bytes.Index(buf, p.prompt); i >= 0 {
			p.seen, p.tail = true, nil
			// Where the prompt ends in b (it may have begun in tail).
			end := max(0, i+len(p.prompt)-(len(buf)-len(b)))
			return p.passLine(b, end)
		}
		keep := min(len(buf), len(p.prompt)-1)
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
