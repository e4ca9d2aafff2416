package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/understudy-vmm/understudy/initramfs/boot"
	"golang.org/x/sys/unix"
)

// modeStorm is guest.mode=storm: a storm of short-lived processes next to
// two long-lived tagged ones, for the VMM's process-exit detector (package
// mmu's shadow sets) to be measured on a real Linux guest.
const modeStorm = "storm"

// pageSize is the x86-64 base page size: the stride of every page touch
// and the size of the tagged page.
const pageSize = 4096

// stormRoleEnv, in the environment of a process that is not PID 1, makes
// guestinit (or the test binary, see TestMain) one of the storm's child
// roles instead of an init. Its command-line arguments are then the
// guest.* parameters of the storm (stormArgs). PID 1 ignores it, so the
// kernel command line cannot turn the init into a child role.
const stormRoleEnv = "UNDERSTUDY_STORM_ROLE"

// The child roles.
const (
	roleSteady = "steady" // tagged: writes a 16 MiB buffer page by page, again and again
	roleMunmap = "munmap" // tagged: maps, touches and unmaps 64 MiB, again and again
	roleChild  = "child"  // short-lived: busy on guest.child_mib MiB for guest.child_ms
)

// Sizes and pauses of the tagged roles.
const (
	steadyBytes = 16 << 20
	steadyPause = 20 * time.Millisecond
	munmapBytes = 64 << 20
	munmapPause = 200 * time.Millisecond
)

// reportFD is the descriptor on which a tagged role reports to the storm:
// "live pid=P tag=0xVA" once its tagged page holds boot.LiveTag, then (the
// munmap role) "munmaps=N" after each unmap.
const reportFD = 3

// stormSpec is what runStorm needs: in the guest from the command line
// (stormMode), in the tests from the test.
type stormSpec struct {
	// tagPage is the storm process's own tag (PID 1's, mapped by
	// stormMode; nil in tests), which each fork child zeroes in its copy.
	tagPage     []byte
	exe         string        // the program to re-execute for the child roles
	env         []string      // the children's environment, without stormRoleEnv
	stderr      io.Writer     // where the children's stderr goes
	duration    time.Duration // the storm stops after the first pair of children that ends later
	tag         uint64        // the tagged page's address
	childMiB    int           // memory of each short-lived child
	childMs     int           // busy lifetime of each short-lived child
	progress    time.Duration // between progress lines
	liveTimeout time.Duration // how long a tagged role may take to report its tag
}

// stormArgs are the command-line arguments of a child role: the storm's
// parameters, as the guest's command line gives them.
func (s stormSpec) stormArgs() []string {
	return []string{
		"guest.mode=" + modeStorm,
		"guest.duration=" + s.duration.String(),
		fmt.Sprintf("guest.tag=%#x", s.tag),
		"guest.child_mib=" + strconv.Itoa(s.childMiB),
		"guest.child_ms=" + strconv.Itoa(s.childMs),
	}
}

// stormMode runs guest.mode=storm in the guest: the children are /init
// itself (/proc/self/exe), their stderr is the console. The tagged
// processes stay alive: the machine powers off under them, so that their
// address spaces never exit while the VMM watches.
func stormMode(out io.Writer, c config) error {
	// PID 1 lives through the storm too: it is tagged, and its fork
	// children zero their copy of the tag.
	tag, err := mapTag(c.tag)
	if err != nil {
		return err
	}
	_, err = runStorm(out, stormSpec{
		tagPage:     tag[:len(boot.LiveTag)],
		exe:         "/proc/self/exe",
		env:         os.Environ(),
		stderr:      os.Stdout,
		duration:    c.duration,
		tag:         c.tag,
		childMiB:    c.childMiB,
		childMs:     c.childMs,
		progress:    2 * time.Second,
		liveTimeout: c.timeout,
	})
	return err
}

// stormRun is a storm's outcome. The tagged processes in live are still
// running when runStorm returns (stop ends them).
type stormRun struct {
	exec, fork int // short-lived children reaped with status 0, by kind
	munmaps    int64
	elapsed    time.Duration
	live       []*liveProc
}

// stop kills the tagged processes and waits for them: what the tests do
// (the guest powers off instead).
func (r *stormRun) stop() {
	for _, lp := range r.live {
		lp.cmd.Process.Kill()
		<-lp.exited
		lp.report.Close()
	}
}

// runStorm starts the two tagged processes, waits until each has its tag
// in place (checked through /proc/P/mem), then creates short-lived
// processes one at a time, alternately an exec of s.exe in the child role
// and a raw fork of this process, until s.duration has passed and the
// last pair has been reaped. It prints the console lines of the storm on
// out. Any child that fails, and any tagged process that exits, fails the
// storm.
//
// Each short-lived child is one address space torn down by exit_mmap, so
// the exits counted are the address-space exits the VMM may detect: a fork
// child's is a copy of this process's, and an exec child's is the one
// execve made (os/exec clones with CLONE_VM|CLONE_VFORK, so there is no
// address space before the exec to tear down). The returned stormRun is never nil: its live processes are
// running even when the error is not nil.
func runStorm(out io.Writer, s stormSpec) (*stormRun, error) {
	r := &stormRun{}
	for _, role := range []string{roleSteady, roleMunmap} {
		lp, err := startLive(s, role)
		if err != nil {
			return r, err
		}
		r.live = append(r.live, lp)
	}
	for _, lp := range r.live {
		if err := lp.waitLive(s.liveTimeout); err != nil {
			return r, err
		}
		got, err := readTag(lp.cmd.Process.Pid, s.tag)
		if err != nil {
			return r, fmt.Errorf("storm: role=%s: %w", lp.role, err)
		}
		if got != boot.LiveTag {
			return r, fmt.Errorf("storm: role=%s pid=%d reported its tag, but %#x holds %q", lp.role, lp.cmd.Process.Pid, s.tag, got)
		}
		fmt.Fprintf(out, "%sstorm: live role=%s pid=%d tag=%#x\n", prefix, lp.role, lp.cmd.Process.Pid, s.tag)
	}

	// The fork children write this buffer, which the storm touches first
	// so that each child copies every page on write.
	buf := make([]byte, s.childMiB<<20)
	for i := 0; i < len(buf); i += pageSize {
		buf[i] = 1
	}
	lifetime := time.Duration(s.childMs) * time.Millisecond
	start := time.Now()
	lastProgress := start
	for i := 0; ; i++ {
		for _, lp := range r.live {
			if err := lp.alive(); err != nil {
				return r, err
			}
		}
		if i%2 == 0 {
			if err := execChild(s); err != nil {
				return r, err
			}
			r.exec++
		} else {
			if err := forkChild(buf, s.tagPage, lifetime); err != nil {
				return r, err
			}
			r.fork++
		}
		now := time.Now()
		r.elapsed = now.Sub(start)
		if now.Sub(lastProgress) >= s.progress {
			fmt.Fprintf(out, "%sstorm: exits=%d exec=%d fork=%d elapsed=%.1fs\n", prefix, r.exec+r.fork, r.exec, r.fork, r.elapsed.Seconds())
			lastProgress = now
		}
		if i%2 == 1 && r.elapsed >= s.duration {
			break
		}
	}
	for _, lp := range r.live {
		if err := lp.alive(); err != nil {
			return r, err
		}
	}
	r.munmaps = r.live[1].munmaps.Load()
	fmt.Fprintf(out, "%sstorm: done exits=%d exec=%d fork=%d munmaps=%d duration=%.1fs\n", prefix, r.exec+r.fork, r.exec, r.fork, r.munmaps, r.elapsed.Seconds())
	runtime.KeepAlive(buf)
	return r, nil
}

// execChild runs s.exe in the child role and waits for it.
func execChild(s stormSpec) error {
	cmd := exec.Command(s.exe, s.stormArgs()...)
	cmd.Env = append(append([]string(nil), s.env...), stormRoleEnv+"="+roleChild)
	cmd.Stderr = s.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("storm: exec child: %w", err)
	}
	return nil
}

// forkChild forks this process (forkTouch) and reaps the child, which
// writes every page of buf until lifetime has passed and exits with 0.
//
// The child is a copy of a multi-threaded Go process that has one thread,
// the one that forked. That is safe here because of what the child does
// (forkTouch): it allocates nothing, takes no lock, grows no stack (it is
// nosplit, so it never enters the scheduler either), is not instrumented
// by the race detector, runs with every signal blocked, makes only raw
// system calls, and writes only to buf, which was allocated before. The
// locks the other threads may hold at the fork are never needed. The
// thread stays locked during the fork so that the signal mask forkTouch
// sets and restores is the one of the thread that forks, and
// syscall.ForkLock keeps descriptors from being created half-way (without
// their close-on-exec flag) while the child's copy of the table is made,
// as os/exec does.
func forkChild(buf, tag []byte, lifetime time.Duration) error {
	runtime.LockOSThread()
	syscall.ForkLock.Lock()
	pid, errno := forkTouch(buf, tag, int64(lifetime))
	syscall.ForkLock.Unlock()
	runtime.UnlockOSThread()
	if errno != 0 {
		return fmt.Errorf("storm: fork: %w", errno)
	}
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("storm: wait for fork child %d: %w", pid, err)
		}
		break
	}
	if !ws.Exited() || ws.ExitStatus() != 0 {
		return fmt.Errorf("storm: fork child %d: %s", pid, describeStatus(ws))
	}
	return nil
}

// describeStatus says how a child ended.
func describeStatus(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by %v", ws.Signal())
	}
	return fmt.Sprintf("wait status %#x", uint32(ws))
}

// liveProc is a tagged process of the storm.
type liveProc struct {
	role    string
	cmd     *exec.Cmd
	report  *os.File      // the read end of its report pipe
	ready   chan error    // one value: nil once it reported its tag, or why it never will
	munmaps atomic.Int64  // the last count it reported
	exited  chan struct{} // closed when it exited, after waitErr is set
	waitErr error
}

// startLive starts s.exe in a tagged role, with the write end of a pipe
// as its descriptor reportFD, and follows its reports and its exit.
func startLive(s stormSpec, role string) (*liveProc, error) {
	pr, pw, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(s.exe, s.stormArgs()...)
	cmd.Env = append(append([]string(nil), s.env...), stormRoleEnv+"="+role)
	cmd.Stderr = s.stderr
	cmd.ExtraFiles = []*os.File{pw} // descriptor 3 = reportFD
	// If this process dies (in the tests: the test binary), so do they.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		return nil, fmt.Errorf("storm: start role=%s: %w", role, err)
	}
	lp := &liveProc{role: role, cmd: cmd, report: pr, ready: make(chan error, 1), exited: make(chan struct{})}
	go lp.readReports()
	go func() {
		lp.waitErr = cmd.Wait()
		close(lp.exited)
	}()
	return lp, nil
}

// readReports follows the process's report pipe until it closes.
func (lp *liveProc) readReports() {
	sc := bufio.NewScanner(lp.report)
	reported := false
	for sc.Scan() {
		rep, err := parseReport(sc.Text())
		switch {
		case err != nil:
			if !reported {
				lp.ready <- fmt.Errorf("storm: role=%s: %w", lp.role, err)
				reported = true
			}
		case rep.live:
			if reported {
				continue
			}
			reported = true
			if rep.pid != lp.cmd.Process.Pid {
				lp.ready <- fmt.Errorf("storm: role=%s pid=%d reported pid %d", lp.role, lp.cmd.Process.Pid, rep.pid)
				continue
			}
			lp.ready <- nil
		default:
			lp.munmaps.Store(rep.munmaps)
		}
	}
	if !reported {
		lp.ready <- fmt.Errorf("storm: role=%s pid=%d closed its report pipe before its tag was in place", lp.role, lp.cmd.Process.Pid)
	}
}

// waitLive waits until the process reports its tag.
func (lp *liveProc) waitLive(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-lp.ready:
		return err
	case <-lp.exited:
		// It may have reported just before it exited.
		select {
		case err := <-lp.ready:
			if err != nil {
				return err
			}
		default:
		}
		return lp.alive()
	case <-t.C:
		return fmt.Errorf("storm: role=%s pid=%d did not report its tag within %v", lp.role, lp.cmd.Process.Pid, timeout)
	}
}

// alive is nil while the process runs.
func (lp *liveProc) alive() error {
	select {
	case <-lp.exited:
		return fmt.Errorf("storm: role=%s pid=%d exited during the storm: %v", lp.role, lp.cmd.Process.Pid, lp.waitErr)
	default:
		return nil
	}
}

// report is one line of a tagged role's report pipe.
type report struct {
	live    bool // "live pid=P tag=0xVA"
	pid     int
	tag     uint64
	munmaps int64 // "munmaps=N"
}

// parseReport parses a report line, strictly.
func parseReport(line string) (report, error) {
	if n, ok := strings.CutPrefix(line, "munmaps="); ok {
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil || v < 0 || strconv.FormatInt(v, 10) != n {
			return report{}, fmt.Errorf("bad report %q", line)
		}
		return report{munmaps: v}, nil
	}
	var r report
	f := strings.Fields(line)
	if len(f) != 3 || f[0] != "live" || strings.Join(f, " ") != line {
		return r, fmt.Errorf("bad report %q", line)
	}
	p, ok1 := strings.CutPrefix(f[1], "pid=")
	t, ok2 := strings.CutPrefix(f[2], "tag=0x")
	pid, err1 := strconv.Atoi(p)
	tag, err2 := strconv.ParseUint(t, 16, 64)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || pid <= 0 || strconv.Itoa(pid) != p || fmt.Sprintf("%x", tag) != t {
		return r, fmt.Errorf("bad report %q", line)
	}
	return report{live: true, pid: pid, tag: tag}, nil
}

// readTag reads the first len(boot.LiveTag) bytes at va in the address
// space of process pid.
func readTag(pid int, va uint64) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	b := make([]byte, len(boot.LiveTag))
	if _, err := f.ReadAt(b, int64(va)); err != nil {
		return "", fmt.Errorf("read %d bytes at %#x of pid %d: %w", len(b), va, pid, err)
	}
	return string(b), nil
}

// roleMain is the process of a child role (stormRoleEnv): args are its
// storm parameters. It returns the exit status; the tagged roles return
// only on an error.
func roleMain(stderr io.Writer, role string, args []string) int {
	if err := runRole(role, args); err != nil {
		fmt.Fprintf(stderr, "%sstorm: role=%s pid=%d: %v\n", prefix, role, os.Getpid(), err)
		return 1
	}
	return 0
}

func runRole(role string, args []string) error {
	ps, err := boot.ParseCmdline(strings.Join(args, " "))
	if err != nil {
		return err
	}
	c, err := parseConfig(ps)
	if err != nil {
		return err
	}
	if c.mode != modeStorm {
		return fmt.Errorf("arguments %q: not guest.mode=%s", args, modeStorm)
	}
	switch role {
	case roleChild:
		busy(c.childMiB<<20, time.Duration(c.childMs)*time.Millisecond)
		return nil
	case roleSteady, roleMunmap:
		rep := os.NewFile(reportFD, "report")
		if _, err := mapTag(c.tag); err != nil {
			return err
		}
		if _, err := fmt.Fprintf(rep, "live pid=%d tag=%#x\n", os.Getpid(), c.tag); err != nil {
			return fmt.Errorf("report: %w", err)
		}
		if role == roleSteady {
			steady() // never returns
		}
		return munmapLoop(rep)
	}
	return fmt.Errorf("unknown role %q", role)
}

// busy allocates size bytes and writes one byte in each page, pass after
// pass, until d has passed.
func busy(size int, d time.Duration) {
	buf := make([]byte, size)
	end := time.Now().Add(d)
	for v := byte(1); time.Now().Before(end); v++ {
		for i := 0; i < len(buf); i += pageSize {
			buf[i] = v
		}
	}
	runtime.KeepAlive(buf)
}

// steady writes one byte in each page of a buffer, pass after pass, with a
// short pause between passes, forever.
func steady() {
	buf := make([]byte, steadyBytes)
	for v := byte(1); ; v++ {
		for i := 0; i < len(buf); i += pageSize {
			buf[i] = v
		}
		time.Sleep(steadyPause)
	}
}

// munmapLoop maps munmapBytes, writes each page, unmaps them all and
// reports the count, forever. It returns only on an error.
func munmapLoop(rep io.Writer) error {
	for n := int64(1); ; n++ {
		b, err := unix.Mmap(-1, 0, munmapBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			return fmt.Errorf("mmap %d bytes: %w", munmapBytes, err)
		}
		for i := 0; i < len(b); i += pageSize {
			b[i] = byte(n)
		}
		if err := unix.Munmap(b); err != nil {
			return fmt.Errorf("munmap %d bytes: %w", munmapBytes, err)
		}
		if _, err := fmt.Fprintf(rep, "munmaps=%d\n", n); err != nil {
			return fmt.Errorf("report: %w", err)
		}
		time.Sleep(munmapPause)
	}
}
