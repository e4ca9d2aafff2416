package kvclient

import (
	"strconv"
	"strings"
	"testing"
)

// FuzzAnswers feeds the answer parsers arbitrary lines: they never panic,
// and what they accept prints back as the same line.
func FuzzAnswers(f *testing.F) {
	for _, s := range []string{
		"COUNT keys=1 records=2",
		"VERIFIED records=3 keys=2 matched=2 mismatched=0 direct=true",
		"VERIFIED records=3 keys=2 matched=2 mismatched=0 direct=maybe",
		"COUNT keys=-1 records=2",
		"COUNT keys=99999999999999999999 records=2",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		if k, n, err := parseCount(line); err == nil {
			if want := "COUNT keys=" + strconv.Itoa(k) + " records=" + strconv.FormatUint(n, 10); normal(line) != want {
				t.Fatalf("parseCount(%q) = %d, %d: prints as %q", line, k, n, want)
			}
		}
		if v, err := parseVerify(line); err == nil {
			want := "VERIFIED records=" + strconv.FormatUint(v.Records, 10) + " keys=" + strconv.Itoa(v.Keys) + " matched=" + strconv.Itoa(v.Matched) +
				" mismatched=" + strconv.Itoa(v.Mismatched) + " direct=" + strconv.FormatBool(v.Direct)
			if normal(line) != want {
				t.Fatalf("parseVerify(%q) = %+v: prints as %q", line, v, want)
			}
		}
		if h, err := ParseHello(line); err == nil && h.Instance == "" {
			t.Fatalf("ParseHello(%q) = %+v without an instance", line, h)
		}
	})
}

// normal drops leading zeros and spaces the parsers forgive, so that an
// accepted line compares with its printed form.
func normal(line string) string {
	f := strings.Fields(line)
	for i, x := range f {
		if k, v, ok := strings.Cut(x, "="); ok {
			if n, err := strconv.ParseUint(v, 10, 64); err == nil {
				f[i] = k + "=" + strconv.FormatUint(n, 10)
			}
		}
	}
	return strings.Join(f, " ")
}
