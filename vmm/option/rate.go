package option

import (
	"fmt"
	"strconv"
	"strings"
)

// ParseRate parses a bandwidth in bytes per second: bits per second with a
// decimal prefix ("100Mbit", "1.5Gbit", "800kbit"), or bytes per second as
// a size, optionally followed by "/s" ("12M", "12MiB/s"). Zero is not a
// rate.
func ParseRate(v string) (uint64, error) {
	lv := strings.ToLower(v)
	if num, ok := strings.CutSuffix(lv, "bit"); ok {
		mult := 1.0
		switch {
		case strings.HasSuffix(num, "k"):
			mult = 1e3
		case strings.HasSuffix(num, "m"):
			mult = 1e6
		case strings.HasSuffix(num, "g"):
			mult = 1e9
		}
		if mult > 1 {
			num = num[:len(num)-1]
		}
		f, err := strconv.ParseFloat(num, 64)
		if err != nil || !(f > 0) || f*mult/8 > 1<<50 {
			return 0, fmt.Errorf("%q is not a bandwidth (examples: 100Mbit, 12MiB/s)", v)
		}
		return max(1, uint64(f*mult/8)), nil
	}
	n, err := ParseSize(strings.TrimSuffix(v, "/s"))
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a bandwidth (examples: 100Mbit, 12MiB/s)", v)
	}
	return n, nil
}
