package payload

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestBinariesMatchSources rebuilds every payload from src/ and compares it
// with the embedded binary, so the committed binaries cannot drift from
// their sources.
func TestBinariesMatchSources(t *testing.T) {
	for _, tool := range []string{"as", "objcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian package binutils; .ci/run installs it): %v", tool, err)
		}
	}
	dir := t.TempDir()
	for _, s := range All() {
		t.Run(s.Name, func(t *testing.T) {
			obj := filepath.Join(dir, s.Name+".o")
			bin := filepath.Join(dir, s.Name+".bin")
			if out, err := exec.Command("as", "--64", "-I", "src", "-o", obj, filepath.Join("src", s.Name+".S")).CombinedOutput(); err != nil {
				t.Fatalf("as %s: %v\n%s", s.Name, err, out)
			}
			if out, err := exec.Command("objcopy", "-O", "binary", "-j", ".text", obj, bin).CombinedOutput(); err != nil {
				t.Fatalf("objcopy %s: %v\n%s", s.Name, err, out)
			}
			want, err := os.ReadFile(bin)
			if err != nil {
				t.Fatal(err)
			}
			if got := s.Image(); !bytes.Equal(got, want) {
				t.Errorf("bin/%s.bin (%d bytes) differs from src/%s.S assembled (%d bytes): run `make payloads`", s.Name, len(got), s.Name, len(want))
			}
		})
	}
}

// TestABIConstants checks that src/abi.inc and abi.go agree.
func TestABIConstants(t *testing.T) {
	f, err := os.Open("src/abi.inc")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := map[string]uint64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), ".equ ")
		if !ok {
			continue
		}
		name, val, ok := strings.Cut(rest, ",")
		if !ok {
			t.Fatalf("abi.inc: bad line %q", sc.Text())
		}
		v, err := strconv.ParseUint(strings.TrimSpace(val), 0, 64)
		if err != nil {
			t.Fatalf("abi.inc: %q: %v", sc.Text(), err)
		}
		got[strings.TrimSpace(name)] = v
	}
	want := map[string]uint64{
		"PORT_CONSOLE": PortConsole, "PORT_EXIT": PortExit, "PORT_REC_LO": PortRecLo,
		"PORT_REC_HI": PortRecHi, "PORT_MARK": PortMark,
		"P_MAGIC": ParamMagic, "P_MEMSIZE": ParamMemSize, "P_DATABASE": ParamDataBase,
		"P_DATASIZE": ParamDataSize, "P_NCPUS": ParamNCPUs, "P_ARGS": ParamArgs,
	}
	if len(got) != len(want) {
		t.Errorf("abi.inc defines %d constants, abi.go %d: %v", len(got), len(want), got)
	}
	for k, w := range want {
		if g, ok := got[k]; !ok || g != w {
			t.Errorf("abi.inc %s = %#x (defined %v), want %#x", k, g, ok, w)
		}
	}
	if PortLast < PortMark || PortFirst > PortConsole {
		t.Errorf("port range %#x..%#x does not cover every port", PortFirst, PortLast)
	}
}

func TestLookup(t *testing.T) {
	for _, n := range []string{"hello", "counter", "touch", "pio", "fault"} {
		s, err := Lookup(n)
		if err != nil {
			t.Fatalf("Lookup(%q) = %v", n, err)
		}
		if len(s.Image()) == 0 {
			t.Errorf("Lookup(%q).Image() is empty", n)
		}
	}
	_, err := Lookup("nope")
	if err == nil || !strings.Contains(err.Error(), "unknown payload") || !strings.Contains(err.Error(), "hello") {
		t.Errorf("Lookup(nope) = %v, want an unknown-payload error listing the payloads", err)
	}
}

func TestArgs(t *testing.T) {
	const mib = 1 << 20
	tests := []struct {
		payload string
		opts    map[string]string
		data    uint64
		want    map[int]uint64 // arg index → value
		errSub  string
	}{
		{"counter", nil, 64 * mib, map[int]uint64{0: 64, 1: 8, 3: 1000000}, ""},
		{"counter", map[string]string{"pages": "10", "hot": "2", "iterations": "5k"}, mib, map[int]uint64{0: 10, 1: 2, 3: 5000}, ""},
		{"counter", map[string]string{"hot": "65"}, 64 * mib, nil, "exceeds pages"},
		{"counter", map[string]string{"pages": "1000"}, mib, nil, "raise --mem"},
		{"counter", map[string]string{"pages": "0"}, mib, nil, "want 1.."},
		{"counter", map[string]string{"bogus": "1"}, mib, nil, `no option "bogus"`},
		{"counter", map[string]string{"pages": "x"}, mib, nil, "not a non-negative integer"},
		{"touch", nil, 64 * mib, map[int]uint64{0: 32, 1: 16, 2: 875, 6: 2}, ""},
		{"touch", map[string]string{"regions": "256", "hot": "16"}, 512 * mib, map[int]uint64{0: 256, 6: 16}, ""},
		{"touch", map[string]string{"regions": "300"}, 512 * mib, nil, "raise --mem"},
		{"touch", nil, mib, nil, "raise --mem"},
		{"touch", map[string]string{"regions": "4", "hot": "5"}, 64 * mib, nil, "exceeds regions"},
		{"touch", map[string]string{"hot_permille": "1001"}, 64 * mib, nil, "want 0..1000"},
		{"pio", map[string]string{"count": "4294967296"}, 0, nil, "want 0..4294967295"},
		{"hello", map[string]string{"x": "1"}, 0, nil, "has no option"},
	}
	for _, tc := range tests {
		s, err := Lookup(tc.payload)
		if err != nil {
			t.Fatal(err)
		}
		args, err := s.Args(tc.opts, tc.data)
		if tc.errSub != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errSub) {
				t.Errorf("%s.Args(%v, %d) = %v, want error containing %q", tc.payload, tc.opts, tc.data, err, tc.errSub)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s.Args(%v, %d) = %v", tc.payload, tc.opts, tc.data, err)
			continue
		}
		for i, w := range tc.want {
			if args[i] != w {
				t.Errorf("%s.Args(%v, %d)[%d] = %d, want %d", tc.payload, tc.opts, tc.data, i, args[i], w)
			}
		}
	}
}

func TestParseCount(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"0", 0, true}, {"42", 42, true}, {"0x10", 16, true}, {"5k", 5000, true}, {"2M", 2000000, true},
		{"1g", 1000000000, true}, {" 7 ", 7, true}, {"", 0, false}, {"-1", 0, false}, {"k", 0, false},
		{"1.5k", 0, false}, {"18446744073709551615", 1<<64 - 1, true}, {"18446744073709551616", 0, false},
		{"20000000000g", 0, false},
	}
	for _, tc := range tests {
		got, err := ParseCount(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseCount(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func FuzzParseCount(f *testing.F) {
	for _, s := range []string{"0", "5k", "0x10", "1g", "-1", "", "99999999999999999999"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParseCount(s)
		if err != nil && v != 0 {
			t.Errorf("ParseCount(%q) = %d with error %v", s, v, err)
		}
	})
}
