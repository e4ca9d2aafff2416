package qemutests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// QEMU is the emulator the harness runs.
const QEMU = "qemu-system-x86_64"

// Accel is how QEMU runs the appliance's CPUs.
type Accel struct {
	Name string   // "tcg" or "kvm"
	Args []string // QEMU flags
	Why  string   // why this one was chosen
}

// TCG emulates an AMD CPU with SVM and nested paging, so that kvm_amd loads
// inside the appliance.
var TCG = Accel{Name: "tcg", Args: []string{"-accel", "tcg", "-cpu", "qemu64,+svm,+npt"}}

// KVM passes the host CPU through; it needs nested virtualization on the host.
var KVM = Accel{Name: "kvm", Args: []string{"-enable-kvm", "-cpu", "host"}}

// DetectAccel picks KVM when the host offers hardware virtualization to its
// guests (kvmDev opens and cpuinfo lists vmx or svm), and TCG otherwise.
// The environment variable UNDERSTUDY_QEMU_ACCEL=tcg|kvm overrides it.
func DetectAccel(kvmDev, cpuinfo string) Accel {
	switch os.Getenv("UNDERSTUDY_QEMU_ACCEL") {
	case "tcg":
		a := TCG
		a.Why = "UNDERSTUDY_QEMU_ACCEL=tcg"
		return a
	case "kvm":
		a := KVM
		a.Why = "UNDERSTUDY_QEMU_ACCEL=kvm"
		return a
	}
	f, err := os.OpenFile(kvmDev, os.O_RDWR, 0)
	if err != nil {
		a := TCG
		a.Why = fmt.Sprintf("no usable %s (%v)", kvmDev, err)
		return a
	}
	f.Close()
	b, err := os.ReadFile(cpuinfo)
	if err != nil {
		a := TCG
		a.Why = err.Error()
		return a
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(v) {
			if fl == "vmx" || fl == "svm" {
				a := KVM
				a.Why = fmt.Sprintf("%s opens and the CPU has %s", kvmDev, fl)
				return a
			}
		}
		break
	}
	a := TCG
	a.Why = fmt.Sprintf("%s opens but the CPU has neither vmx nor svm (no nested virtualization)", kvmDev)
	return a
}

// Config describes one QEMU run.
type Config struct {
	Kernel  string   // -kernel
	Initrd  string   // -initrd
	Append  string   // the kernel command line
	MemMiB  int      // -m; 1024 if 0
	CPUs    int      // -smp; 1 if 0
	Accel   Accel    // TCG if empty
	Network []string // QEMU network flags; none ("-nic none") if nil
	Extra   []string // more QEMU flags
	LogPath string   // the console is written here as it arrives
	// OnLine, if set, gets every console line as it arrives.
	OnLine func(Line)
}

// Line is one line of console output.
type Line struct {
	Text string
	At   time.Duration // since QEMU started
}

// Machine is a running QEMU.
type Machine struct {
	cmd   *exec.Cmd
	start time.Time
	log   *os.File

	mu      sync.Mutex // guards lines, next, exited, exitErr
	lines   []Line
	next    int           // WaitFor searches from here
	changed chan struct{} // closed and replaced whenever lines or exited change
	exited  bool
	exitErr error

	readerDone chan struct{}
	closeLog   sync.Once
}

// Args returns the QEMU command line for c.
func (c Config) Args() []string {
	mem, cpus := c.MemMiB, c.CPUs
	if mem == 0 {
		mem = 1024
	}
	if cpus == 0 {
		cpus = 1
	}
	accel := c.Accel
	if accel.Name == "" {
		accel = TCG
	}
	args := append([]string{}, accel.Args...)
	args = append(args, "-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus), "-nographic", "-no-reboot")
	if c.Network == nil {
		args = append(args, "-nic", "none")
	}
	args = append(args, c.Network...)
	args = append(args, "-kernel", c.Kernel, "-append", c.Append)
	if c.Initrd != "" {
		args = append(args, "-initrd", c.Initrd)
	}
	return append(args, c.Extra...)
}

// Start starts QEMU. The console (QEMU's standard output: -nographic puts
// the serial port there) goes to c.LogPath and to c.OnLine.
func Start(c Config) (*Machine, error) {
	if _, err := exec.LookPath(QEMU); err != nil {
		return nil, fmt.Errorf("%w (on Debian: apt-get install qemu-system-x86)", err)
	}
	log, err := os.Create(c.LogPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(QEMU, c.Args()...)
	cmd.Stdin = nil // /dev/null: nobody types at the console
	out, err := cmd.StdoutPipe()
	if err != nil {
		log.Close()
		return nil, err
	}
	cmd.Stderr = cmd.Stdout // QEMU's own complaints land in the log too
	fmt.Fprintf(log, "# %s %s\n", QEMU, strings.Join(quote(c.Args()), " "))
	m := &Machine{cmd: cmd, log: log, changed: make(chan struct{}), readerDone: make(chan struct{})}
	m.start = time.Now()
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", QEMU, err)
	}
	go m.read(out, c.OnLine)
	go func() {
		<-m.readerDone
		err := cmd.Wait()
		m.mu.Lock()
		m.exited, m.exitErr = true, err
		m.notifyLocked()
		m.mu.Unlock()
	}()
	return m, nil
}

func quote(args []string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " '\"") {
			a = strconv.Quote(a)
		}
		out[i] = a
	}
	return out
}

func (m *Machine) notifyLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

func (m *Machine) read(r io.Reader, onLine func(Line)) {
	defer close(m.readerDone)
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		s, err := br.ReadString('\n')
		if s != "" {
			m.log.WriteString(s)
			text := strings.TrimRight(s, "\r\n")
			l := Line{Text: text, At: time.Since(m.start)}
			m.mu.Lock()
			m.lines = append(m.lines, l)
			m.notifyLocked()
			m.mu.Unlock()
			if onLine != nil {
				onLine(l)
			}
		}
		if err != nil {
			return
		}
	}
}

// ErrExited is wrapped by WaitFor's error when QEMU ended first.
var ErrExited = errors.New("QEMU exited")

// WaitFor waits up to timeout for a console line containing marker, after
// the line the previous WaitFor matched, and returns it. It fails if QEMU
// exits first or ctx ends.
func (m *Machine) WaitFor(ctx context.Context, marker string, timeout time.Duration) (Line, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		m.mu.Lock()
		for i := m.next; i < len(m.lines); i++ {
			if strings.Contains(m.lines[i].Text, marker) {
				m.next = i + 1
				l := m.lines[i]
				m.mu.Unlock()
				return l, nil
			}
		}
		exited, exitErr, changed := m.exited, m.exitErr, m.changed
		m.mu.Unlock()
		if exited {
			return Line{}, fmt.Errorf("waiting for %q: %w (%v) after %v", marker, ErrExited, exitStatus(exitErr), time.Since(m.start).Round(time.Millisecond))
		}
		select {
		case <-changed:
		case <-timer.C:
			return Line{}, fmt.Errorf("waiting for %q: not seen within %v (%v since QEMU started)", marker, timeout, time.Since(m.start).Round(time.Millisecond))
		case <-ctx.Done():
			return Line{}, fmt.Errorf("waiting for %q: %w", marker, ctx.Err())
		}
	}
}

func exitStatus(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// Wait waits up to timeout for QEMU to exit and returns its error (nil for
// exit status 0: the appliance powered off). After the timeout it kills
// QEMU and says so.
func (m *Machine) Wait(timeout time.Duration) error {
	deadline := time.After(timeout)
	for {
		m.mu.Lock()
		exited, exitErr, changed := m.exited, m.exitErr, m.changed
		m.mu.Unlock()
		if exited {
			return exitErr
		}
		select {
		case <-changed:
		case <-deadline:
			m.Kill()
			return fmt.Errorf("QEMU still running %v after the timeout: killed", timeout)
		}
	}
}

// Kill stops QEMU (if it still runs) and waits until its console is read to
// the end and the log closed. It is safe to call more than once.
func (m *Machine) Kill() {
	m.mu.Lock()
	exited := m.exited
	m.mu.Unlock()
	if !exited {
		m.cmd.Process.Kill()
	}
	<-m.readerDone
	m.mu.Lock()
	for !m.exited {
		changed := m.changed
		m.mu.Unlock()
		<-changed
		m.mu.Lock()
	}
	m.mu.Unlock()
	m.closeLog.Do(func() { m.log.Close() })
}

// Exited reports whether QEMU has exited.
func (m *Machine) Exited() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.exited
}

// Lines returns the console lines so far.
func (m *Machine) Lines() []Line {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Line(nil), m.lines...)
}

// Elapsed returns the time since QEMU started.
func (m *Machine) Elapsed() time.Duration { return time.Since(m.start) }
