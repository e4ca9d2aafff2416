package vmm

import (
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A futex word wakes a waiting thread straight from the kernel. A parked
// vCPU waits on one instead of a Go channel: its goroutine is locked to its
// thread, and waking a locked goroutine through the Go scheduler hands
// processors from thread to thread and can leave it queued behind a thread
// that has gone back into KVM_RUN (measured here: up to 3 ms to resume the
// second of two vCPUs). In a futex wait the thread stays in a system call,
// as it is in KVM_RUN, and comes back from it when woken.

// futex(2) operations on a process-private word (<linux/futex.h>).
const (
	futexWaitPrivate = 0 | 128 // FUTEX_WAIT | FUTEX_PRIVATE_FLAG
	futexWakePrivate = 1 | 128 // FUTEX_WAKE | FUTEX_PRIVATE_FLAG
)

// futexWait sleeps while *w == val (or until a signal or spurious wake-up:
// callers check their condition again).
func futexWait(w *atomic.Uint32, val uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWaitPrivate, uintptr(val), 0, 0, 0)
}

// futexWake wakes every thread waiting on w.
func futexWake(w *atomic.Uint32) {
	unix.Syscall6(unix.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWakePrivate, 1<<30, 0, 0, 0)
}
