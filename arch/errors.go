package arch

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// IoctlError reports a failed KVM ioctl. It names the ioctl and wraps the
// errno, so callers can test errors.Is(err, unix.EINTR) and similar.
type IoctlError struct {
	Op  string // kernel name of the ioctl, e.g. "KVM_RUN"
	Err error  // usually a unix.Errno
}

func (e *IoctlError) Error() string { return e.Op + ": " + e.Err.Error() }

// Unwrap returns the wrapped errno.
func (e *IoctlError) Unwrap() error { return e.Err }

func ioctlError(req uintptr, errno unix.Errno) error {
	name, ok := ioctlNames[req]
	if !ok {
		name = fmt.Sprintf("ioctl %#x", req)
	}
	return &IoctlError{Op: name, Err: errno}
}

// ErrNoKVM is returned (wrapped) by Open when /dev/kvm does not exist.
var ErrNoKVM = errors.New("KVM is not available")
