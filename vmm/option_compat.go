package vmm

import "github.com/understudy-vmm/understudy/vmm/option"

// ParseSize is option.ParseSize. It stays only until the callers being
// moved in parallel (the binary's role code, going to ft/run_*.go) call
// option directly; new code uses option.
func ParseSize(s string) (uint64, error) { return option.ParseSize(s) }

// FormatSize is option.FormatSize; see ParseSize.
func FormatSize(n uint64) string { return option.FormatSize(n) }
