package option

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Int parses a decimal integer in [lo, hi].
func Int(s string, lo, hi int) (int, error) {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%q is not an integer", s)
	}
	if n < lo || n > hi {
		return 0, fmt.Errorf("%d is out of range %d..%d", n, lo, hi)
	}
	return n, nil
}

// Float parses a number in [lo, hi]; NaN is not a number.
func Float(s string, lo, hi float64) (float64, error) {
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || f != f {
		return 0, fmt.Errorf("%q is not a number", s)
	}
	if f < lo || f > hi {
		return 0, fmt.Errorf("%v is out of range %v..%v", f, lo, hi)
	}
	return f, nil
}

// Duration parses a Go duration ("10ms", "1s") in [lo, hi].
func Duration(s string, lo, hi time.Duration) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration (examples: 10ms, 1s)", s)
	}
	if d < lo || d > hi {
		return 0, fmt.Errorf("%v is out of range %v..%v", d, lo, hi)
	}
	return d, nil
}
