//go:build !amd64

package main

import "golang.org/x/sys/unix"

// forkTouch is implemented for amd64 only (fork_unsafe_amd64.go), the
// architecture of the nested guests.
func forkTouch(buf, tag []byte, ns int64) (pid int, errno unix.Errno) {
	return 0, unix.ENOSYS
}
