package arch

import (
	"sync/atomic"
	"unsafe"
)

// runArea gives atomic access to single bytes of the shared kvm_run page,
// which another goroutine (the pauser) writes while the vCPU thread runs.
type runArea struct{ base unsafe.Pointer }

func newRunArea(b []byte) runArea { return runArea{base: unsafe.Pointer(&b[0])} }

// storeByte stores v at off with a 32-bit atomic read-modify-write of the
// containing aligned word, so concurrent stores to neighbouring bytes are not lost.
func (r runArea) storeByte(off uintptr, v uint8) {
	word := (*uint32)(unsafe.Add(r.base, off&^3))
	shift := (off & 3) * 8
	for {
		old := atomic.LoadUint32(word)
		n := old&^(0xff<<shift) | uint32(v)<<shift
		if atomic.CompareAndSwapUint32(word, old, n) {
			return
		}
	}
}
