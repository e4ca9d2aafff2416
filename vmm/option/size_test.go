package option

import (
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"2097152", 2 << 20, true}, {"256M", 256 << 20, true}, {"256m", 256 << 20, true},
		{"1G", 1 << 30, true}, {"1GiB", 1 << 30, true}, {"1gb", 1 << 30, true}, {"64K", 64 << 10, true},
		{"2T", 2 << 40, true}, {"512MiB", 512 << 20, true}, {"0", 0, true}, {" 4M ", 4 << 20, true},
		{"", 0, false}, {"M", 0, false}, {"abc", 0, false}, {"-1M", 0, false}, {"+1M", 0, false},
		{"1.5G", 0, false}, {"1X", 0, false}, {"16777216T", 0, false}, {"99999999999999999999", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "size") {
			t.Errorf("ParseSize(%q) error %q does not say it wants a size", tc.in, err)
		}
	}
}

func TestFormatSize(t *testing.T) {
	tests := map[uint64]string{0: "0 bytes", 1: "1 bytes", 1 << 10: "1 KiB", 3 << 20: "3 MiB", 1 << 30: "1 GiB", 1<<20 + 1: "1048577 bytes", 2 << 40: "2 TiB"}
	for in, want := range tests {
		if got := FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"256M", "1GiB", "0", "", "-1", "1.5G", "18446744073709551615", "17179869184G"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseSize(s)
		if err != nil {
			if v != 0 {
				t.Errorf("ParseSize(%q) = %d with error", s, v)
			}
			return
		}
		// A parsed size formats and parses back to itself.
		back, err := ParseSize(strings.TrimSuffix(strings.ReplaceAll(FormatSize(v), " ", ""), "bytes"))
		if err != nil || back != v {
			t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", v, back, err)
		}
	})
}
