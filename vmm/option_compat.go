package vmm

import "github.com/understudy-vmm/understudy/vmm/option"

// ParseSize is option.ParseSize, kept while callers outside vmm move.
func ParseSize(s string) (uint64, error) { return option.ParseSize(s) }

// FormatSize is option.FormatSize, kept while callers outside vmm move.
func FormatSize(n uint64) string { return option.FormatSize(n) }
