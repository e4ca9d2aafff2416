package option

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseSize parses a memory size: a number of bytes, or a number with a
// binary unit suffix K, M, G or T (optionally followed by "iB" or "B"), as
// QEMU's -m and Firecracker's mem_size accept. Fractions are not accepted.
func ParseSize(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("empty size")
	}
	upper := strings.ToUpper(t)
	upper = strings.TrimSuffix(upper, "IB")
	upper = strings.TrimSuffix(upper, "B")
	shift := uint(0)
	if n := len(upper); n > 0 {
		switch upper[n-1] {
		case 'K':
			shift = 10
		case 'M':
			shift = 20
		case 'G':
			shift = 30
		case 'T':
			shift = 40
		}
		if shift > 0 {
			upper = upper[:n-1]
		}
	}
	if upper == "" || upper[0] == '+' || upper[0] == '-' {
		return 0, fmt.Errorf("%q is not a size (examples: 256M, 1G, 2097152)", s)
	}
	v, err := strconv.ParseUint(upper, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a size (examples: 256M, 1G, 2097152)", s)
	}
	if v > (^uint64(0))>>shift {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return v << shift, nil
}

// FormatSize formats bytes with the largest exact binary unit.
func FormatSize(n uint64) string {
	units := []struct {
		shift uint
		name  string
	}{{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}}
	for _, u := range units {
		if n != 0 && n%(1<<u.shift) == 0 {
			return fmt.Sprintf("%d %s", n>>u.shift, u.name)
		}
	}
	return fmt.Sprintf("%d bytes", n)
}
