package qemutests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// Host names the files DetectAccel reads, so that tests can give others.
type Host struct {
	KVMDevice string // /dev/kvm
	CPUInfo   string // /proc/cpuinfo
	SysModule string // /sys/module
}

// ThisHost is the host the tests run on.
var ThisHost = Host{KVMDevice: "/dev/kvm", CPUInfo: "/proc/cpuinfo", SysModule: "/sys/module"}

// DetectAccel picks KVM when the host offers hardware virtualization to its
// guests: the KVM device opens, the CPU has vmx or svm, and the host's
// kvm_intel or kvm_amd module allows nested guests (its "nested" parameter
// is Y or 1). Otherwise it picks TCG. The environment variable
// UNDERSTUDY_QEMU_ACCEL=tcg|kvm overrides it.
func DetectAccel(h Host) Accel {
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
	tcg := func(format string, args ...any) Accel {
		a := TCG
		a.Why = fmt.Sprintf(format, args...)
		return a
	}
	f, err := os.OpenFile(h.KVMDevice, os.O_RDWR, 0)
	if err != nil {
		return tcg("no usable %s (%v)", h.KVMDevice, err)
	}
	f.Close()
	b, err := os.ReadFile(h.CPUInfo)
	if err != nil {
		return tcg("%v", err)
	}
	ext := ""
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, fl := range strings.Fields(v) {
			if fl == "vmx" || fl == "svm" {
				ext = fl
			}
		}
		break
	}
	if ext == "" {
		return tcg("%s opens but the CPU has neither vmx nor svm (no nested virtualization)", h.KVMDevice)
	}
	mod := map[string]string{"vmx": "kvm_intel", "svm": "kvm_amd"}[ext]
	param := filepath.Join(h.SysModule, mod, "parameters", "nested")
	nb, err := os.ReadFile(param)
	if err != nil {
		return tcg("%s opens and the CPU has %s, but %s is not loaded with nested virtualization (%v)", h.KVMDevice, ext, mod, err)
	}
	switch v := strings.TrimSpace(string(nb)); v {
	case "Y", "y", "1":
	default:
		return tcg("%s opens and the CPU has %s, but %s's nested is %q (no nested virtualization)", h.KVMDevice, ext, mod, v)
	}
	a := KVM
	a.Why = fmt.Sprintf("%s opens, the CPU has %s and %s allows nested guests", h.KVMDevice, ext, mod)
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
	// NetNS, if set, is the network namespace QEMU runs in (through
	// `ip netns exec`), as the nodes of a Segment do.
	NetNS   string
	LogPath string // the console is written here as it arrives
	// OnLine, if set, gets every console line as it arrives.
	OnLine func(Line)
	// Deadline, if set, is when the harness kills QEMU whatever it is
	// doing: waits then fail at once, saying so, and the test still has
	// time to clean up and keep its console log (see TestDeadline).
	Deadline time.Time
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

	mu      sync.Mutex // guards lines, next, exited, exitErr, killedBy
	lines   []Line
	next    int           // WaitFor searches from here
	changed chan struct{} // closed and replaced whenever lines or exited change
	exited  bool
	exitErr error
	// killedBy says why the harness killed QEMU ("" : it did not).
	killedBy string
	deadline *time.Timer // nil without a Deadline

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

// Command returns the program and arguments that run QEMU for c: QEMU
// itself, or ip netns exec NS QEMU (ip execs QEMU, so the process the
// harness starts and kills is QEMU's all the same).
func (c Config) Command() (string, []string) {
	if c.NetNS == "" {
		return QEMU, c.Args()
	}
	return "ip", append([]string{"netns", "exec", c.NetNS, QEMU}, c.Args()...)
}

// Start starts QEMU. The console (QEMU's standard output: -nographic puts
// the serial port there) goes to c.LogPath and to c.OnLine.
func Start(c Config) (*Machine, error) {
	if _, err := exec.LookPath(QEMU); err != nil {
		return nil, fmt.Errorf("%w (on Debian: apt-get install qemu-system-x86)", err)
	}
	prog, argv := c.Command()
	return StartProcess(prog, argv, c.LogPath, c.OnLine, c.Deadline)
}

// StartProcess runs another program as Start runs QEMU (a client on a
// segment, through `ip netns exec`): its standard output and error, line by
// line, go to logPath and onLine, and the Machine's waits, Lines and Kill
// work on it as on a QEMU's console (their messages still say QEMU).
func StartProcess(prog string, argv []string, logPath string, onLine func(Line), deadline time.Time) (*Machine, error) {
	log, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(prog, argv...)
	cmd.Stdin = nil // /dev/null: nobody types at the console
	// QEMU must not outlive the test process, however that ends (a panic,
	// go test's -timeout, a SIGKILL): the kernel kills it when the thread
	// that started it exits (Go ends threads only when a goroutine exits
	// locked to one, which Start's caller is not), and in a process group
	// of its own a terminal's Ctrl-C goes to go test, which cleans up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		log.Close()
		return nil, err
	}
	cmd.Stderr = cmd.Stdout // QEMU's own complaints land in the log too
	fmt.Fprintf(log, "# %s %s\n", prog, strings.Join(quote(argv), " "))
	m := &Machine{cmd: cmd, log: log, changed: make(chan struct{}), readerDone: make(chan struct{})}
	m.start = time.Now()
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", prog, err)
	}
	if !deadline.IsZero() {
		m.deadline = time.AfterFunc(time.Until(deadline), func() {
			m.kill(fmt.Sprintf("killed by the harness at the test's deadline (%s): it would have run into go test's -timeout", deadline.Format(time.TimeOnly)))
		})
	}
	go m.read(out, onLine)
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
			return Line{}, fmt.Errorf("waiting for %q: %w (%v) after %v", marker, ErrExited, m.exitStatus(exitErr), time.Since(m.start).Round(time.Millisecond))
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

// exitStatus describes how QEMU ended, with the reason if the harness
// killed it.
func (m *Machine) exitStatus(err error) string {
	s := "exit status 0"
	if err != nil {
		s = err.Error()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.killedBy != "" {
		s += ": " + m.killedBy
	}
	return s
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
			m.mu.Lock()
			by := m.killedBy
			m.mu.Unlock()
			if by != "" {
				return fmt.Errorf("QEMU %s (%v)", by, exitErr)
			}
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
	if m.deadline != nil {
		m.deadline.Stop()
	}
	m.kill("")
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

// kill sends SIGKILL to QEMU's process group unless QEMU has exited, and
// records why (if why is set).
func (m *Machine) kill(why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.exited {
		return
	}
	if why != "" && m.killedBy == "" {
		m.killedBy = why
	}
	// The group is QEMU's own (Setpgid); QEMU has not been waited for, so
	// its pid, and with it the group, is still its.
	if err := syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		m.cmd.Process.Kill()
	}
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
