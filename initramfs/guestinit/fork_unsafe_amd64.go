package main

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// forkTouch forks this process with a raw clone(SIGCHLD) (x86-64 argument
// order: flags, stack, parent_tid, child_tid, tls) and returns the child's
// pid. The child first zeroes tag (its copy of the parent's tag page: a
// forked child is not the live parent), then writes one byte in each page
// of buf, pass after pass,
// until ns nanoseconds of CLOCK_MONOTONIC have passed, then calls
// exit_group(0).
//
// What makes the child safe (see forkChild): the function is nosplit, so
// the child never checks its stack, never grows it and never enters the
// scheduler (whatever preemption request the parent's goroutine had);
// norace and nocheckptr, so it calls nothing of the race detector; between
// the clone and exit_group it calls only nosplit raw system calls
// (unix.RawSyscall jumps to syscall.RawSyscall, which is nosplit and norace
// too), on variables of its own stack, and writes buf, which it neither
// allocates nor grows. Bounds checks cannot fail (i < len(buf)). Every
// signal is blocked across the clone, so no Go signal handler ever runs
// in the child; the parent restores its mask at once.
//
//go:nosplit
//go:norace
//go:nocheckptr
func forkTouch(buf, tag []byte, ns int64) (pid int, errno unix.Errno) {
	all, old := ^uint64(0), uint64(0)
	if _, _, e := unix.RawSyscall6(unix.SYS_RT_SIGPROCMASK, unix.SIG_SETMASK, uintptr(unsafe.Pointer(&all)), uintptr(unsafe.Pointer(&old)), 8, 0, 0); e != 0 {
		return 0, e
	}
	r, _, e := unix.RawSyscall(unix.SYS_CLONE, uintptr(unix.SIGCHLD), 0, 0)
	if e == 0 && r == 0 {
		// The child.
		for i := 0; i < len(tag); i++ {
			tag[i] = 0
		}
		var ts unix.Timespec
		unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
		end := ts.Sec*1_000_000_000 + ts.Nsec + ns
		for v := byte(2); ; v++ {
			for i := 0; i < len(buf); i += pageSize {
				buf[i] = v
			}
			unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
			if ts.Sec*1_000_000_000+ts.Nsec >= end {
				break
			}
		}
		for {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
		}
	}
	unix.RawSyscall6(unix.SYS_RT_SIGPROCMASK, unix.SIG_SETMASK, uintptr(unsafe.Pointer(&old)), 0, 8, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), 0
}
