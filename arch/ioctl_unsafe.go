package arch

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlVal issues an ioctl whose argument is an integer.
func ioctlVal(fd int, req uintptr, arg uintptr) (uintptr, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, arg)
	if errno != 0 {
		return r, ioctlError(req, errno)
	}
	return r, nil
}

// ioctlRetry repeats an ioctl interrupted by a signal (Go's runtime signals
// threads for preemption). KVM_RUN does not use it: there EINTR means "kicked".
func ioctlRetry(fd int, req uintptr, arg unsafe.Pointer) (uintptr, error) {
	for {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return r, ioctlError(req, errno)
		}
		return r, nil
	}
}

// bytesPtr returns a pointer to the first element of b, or nil.
func bytesPtr(b []byte) unsafe.Pointer {
	if len(b) == 0 {
		return nil
	}
	return unsafe.Pointer(&b[0])
}

// SliceAddr returns the user-space address of a byte slice's backing array,
// as KVM wants it in a memory slot. The slice must stay mapped (mmap'd memory,
// never Go heap memory) for as long as the slot exists.
func SliceAddr(b []byte) uint64 {
	return uint64(uintptr(bytesPtr(b)))
}

// ioctlOf issues an ioctl whose argument is a pointer to v, retrying on EINTR.
func ioctlOf[T any](fd int, req uintptr, v *T) error {
	_, err := ioctlRetry(fd, req, unsafe.Pointer(v))
	return err
}

// sizeOf returns the size of T in bytes.
func sizeOf[T any]() uintptr {
	var v T
	return unsafe.Sizeof(v)
}

// ioctlBytes issues an ioctl whose argument points at b's first byte.
func ioctlBytes(fd int, req uintptr, b []byte) error {
	_, err := ioctlRetry(fd, req, bytesPtr(b))
	return err
}

// wordsAddr returns the address of a []uint64's backing array (for bitmaps
// that KVM reads or writes through a pointer inside an ioctl struct). The
// caller must keep the slice alive across the ioctl with keepAlive.
func wordsAddr(w []uint64) uintptr {
	if len(w) == 0 {
		return 0
	}
	return uintptr(unsafe.Pointer(&w[0]))
}
