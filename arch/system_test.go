package arch

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestOpenMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "no-kvm")
	s, err := Open(path)
	if err == nil {
		s.Close()
		t.Fatalf("Open(%q) = nil error, want ErrNoKVM", path)
	}
	if !errors.Is(err, ErrNoKVM) || !strings.Contains(err.Error(), path) {
		t.Errorf("Open(%q) = %v, want an error wrapping ErrNoKVM that names the path", path, err)
	}
}

func TestOpenNotKVM(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("not kvm"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path  string
		errno unix.Errno // wrapped in the error
		ioctl bool       // the error is an *IoctlError for KVM_GET_API_VERSION
	}{
		// Opens fine; the first ioctl fails.
		{"/dev/null", unix.ENOTTY, true},
		{file, unix.ENOTTY, true},
		// Cannot be opened read-write at all.
		{dir, unix.EISDIR, false},
	}
	for _, tt := range tests {
		s, err := Open(tt.path)
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) = nil error, want %v", tt.path, tt.errno)
			continue
		}
		if !errors.Is(err, tt.errno) || errors.Is(err, ErrNoKVM) {
			t.Errorf("Open(%q) = %v, want an error wrapping %v (and not ErrNoKVM)", tt.path, err, tt.errno)
		}
		var ie *IoctlError
		if got := errors.As(err, &ie); got != tt.ioctl || (got && ie.Op != "KVM_GET_API_VERSION") {
			t.Errorf("Open(%q) = %v; *IoctlError %v, want %v (KVM_GET_API_VERSION)", tt.path, err, got, tt.ioctl)
		}
		if !tt.ioctl && !strings.Contains(err.Error(), tt.path) {
			t.Errorf("Open(%q) = %v, want the path in the error", tt.path, err)
		}
	}
}

func TestExitName(t *testing.T) {
	tests := []struct {
		reason uint32
		want   string
	}{
		{ExitUnknown, "KVM_EXIT_UNKNOWN"},
		{ExitIO, "KVM_EXIT_IO"},
		{ExitHLT, "KVM_EXIT_HLT"},
		{ExitMMIO, "KVM_EXIT_MMIO"},
		{ExitShutdown, "KVM_EXIT_SHUTDOWN"},
		{ExitIntr, "KVM_EXIT_INTR"},
		{ExitInternalError, "KVM_EXIT_INTERNAL_ERROR"},
		{ExitSystemEvent, "KVM_EXIT_SYSTEM_EVENT"},
		{ExitMemoryFault, "KVM_EXIT_MEMORY_FAULT"},
		{13, "KVM_EXIT_13"}, // unnamed, inside the table
		{exitReasonNameSize, "KVM_EXIT_40"},
		{1 << 31, "KVM_EXIT_2147483648"},
	}
	for _, tt := range tests {
		if got := ExitName(tt.reason); got != tt.want {
			t.Errorf("ExitName(%d) = %q, want %q", tt.reason, got, tt.want)
		}
	}
}
