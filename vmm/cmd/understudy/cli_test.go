package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
)

var requireKVM = kvmtest.Require

func runCLI(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestHelpEverywhere(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"--help"}, {"run", "--help"}, {"payloads", "--help"}, {"version", "--help"}, {"run", "-h"}} {
		code, out, errs := runCLI(args...)
		if code != 0 {
			t.Errorf("understudy %v: exit %d, want 0", args, code)
		}
		if !strings.Contains(out+errs, "Usage") {
			t.Errorf("understudy %v printed no usage: %q %q", args, out, errs)
		}
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := runCLI("version")
	if code != 0 || !strings.HasPrefix(out, "understudy ") {
		t.Errorf("understudy version = %d, %q", code, out)
	}
}

func TestPayloadsList(t *testing.T) {
	code, out, _ := runCLI("payloads")
	for _, w := range []string{"hello:", "counter:", "touch:", "pio:", "fault:", "iterations", "hot_permille"} {
		if !strings.Contains(out, w) {
			t.Errorf("understudy payloads output lacks %q", w)
		}
	}
	if code != 0 {
		t.Errorf("exit %d", code)
	}
}

// TestBadInput checks that each bad command line gives one clear error line
// on stderr and a non-zero exit, never a panic.
func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.bin")
	if err := os.WriteFile(big, make([]byte, 3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{}, exitUsage, "Usage"},
		{[]string{"frobnicate"}, exitUsage, "understudy: unknown command \"frobnicate\"\nrun 'understudy help' for the commands\n"},
		{[]string{"run"}, exitUsage, "--payload is required"},
		{[]string{"run", "--payload", "hello", "extra"}, exitUsage, `unexpected argument "extra"`},
		{[]string{"run", "--payload", "nope"}, exitError, `unknown payload "nope"`},
		{[]string{"run", "--payload", "hello", "--mem", "lots"}, exitUsage, `"lots" is not a size`},
		{[]string{"run", "--payload", "hello", "--mem", "banana"}, exitUsage, `invalid value "banana" for flag -mem`},
		{[]string{"run", "--payload", "hello", "--mem", "1M"}, exitError, "too small"},
		{[]string{"run", "--payload", "hello", "--mem", "3M"}, exitError, "multiple of 2 MiB"},
		{[]string{"run", "--payload", "hello", "--cpus", "1000"}, exitError, "1000 vCPUs"},
		{[]string{"run", "--payload", "hello", "--cpus", "0"}, exitError, "vCPUs"},
		{[]string{"run", "--payload", "hello", "--cpus", "two"}, exitUsage, "invalid value"},
		{[]string{"run", "--payload", big, "--mem", "2M"}, exitError, "does not fit"},
		{[]string{"run", "--payload", "counter", "--opt", "pages"}, exitUsage, "want key=value"},
		{[]string{"run", "--payload", "counter,pages=1,pages=2"}, exitError, "given twice"},
		{[]string{"run", "--payload", "counter", "--opt", "colour=red"}, exitError, `no option "colour"`},
		{[]string{"run", "--payload", ",pages=1"}, exitError, "empty payload name"},
		{[]string{"run", "--payload", "hello", "--backing", "disk"}, exitError, "want anon or memfd"},
		{[]string{"run", "--payload", "hello", "--kvm", filepath.Join(dir, "kvm")}, exitError, "KVM is not available"},
		{[]string{"run", "--payload", "hello", "--records", filepath.Join(dir, "no", "such", "dir")}, exitError, "no such file"},
	}
	for _, tc := range tests {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
		if tc.code == exitError && strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("understudy %q: stderr has several lines: %q", tc.args, errs)
		}
		// A usage error of a command is one line and a hint, not the help.
		if tc.code == exitUsage && len(tc.args) > 1 {
			checkUsageError(t, tc.args[0], tc.args, errs)
		}
		if strings.Contains(errs, "panic") || strings.Contains(errs, "goroutine ") {
			t.Errorf("understudy %q panicked: %s", tc.args, errs)
		}
	}
}

// checkUsageError checks that a command's usage error is one error line and
// a hint to its --help, not the whole flag list.
func checkUsageError(t *testing.T, cmd string, args []string, errs string) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(errs, "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "understudy "+cmd+": ") || lines[1] != "run 'understudy "+cmd+" --help' for its flags" {
		t.Errorf("understudy %q: stderr %q; want one error line and the hint \"run 'understudy %s --help' for its flags\"", args, errs, cmd)
	}
}

// TestHelpPrintsFlags: --help still prints every flag.
func TestHelpPrintsFlags(t *testing.T) {
	code, out, errs := runCLI("run", "--help")
	if code != 0 || !strings.Contains(out+errs, "-mem") || !strings.Contains(out+errs, "-protect") || strings.Count(out+errs, "\n") < 40 {
		t.Errorf("run --help = %d, %q; want exit 0 and the whole flag list", code, out+errs)
	}
}

func TestRunHello(t *testing.T) {
	requireKVM(t)
	code, out, errs := runCLI("run", "--payload", "hello")
	if code != 0 || out != "Hello from the Understudy payload guest! vCPUs: 1\n" {
		t.Errorf("run hello = %d, %q, %q", code, out, errs)
	}
	if !strings.Contains(errs, "guest exited with code 0") {
		t.Errorf("summary missing: %q", errs)
	}
}

func TestRunFault(t *testing.T) {
	requireKVM(t)
	code, _, errs := runCLI("run", "--payload", "fault")
	if code != exitError || !strings.Contains(errs, "#PF page fault") || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
		t.Errorf("run fault = %d, %q; want exit 1 and one #PF line", code, errs)
	}
}

func TestRunExitCodeAndRecords(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	prog := []byte{0xb8, 42, 0, 0, 0, 0x66, 0xba, 0x04, 0x05, 0xef} // mov eax, 42; mov dx, 0x504; out dx, eax
	path := filepath.Join(dir, "p.bin")
	if err := os.WriteFile(path, prog, 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, errs := runCLI("run", "--payload", path, "--quiet"); code != 42 || errs != "" {
		t.Errorf("run %s = %d, %q; want 42 and a quiet stderr", path, code, errs)
	}
	recs := filepath.Join(dir, "recs.txt")
	code, _, errs := runCLI("run", "--payload", "counter,iterations=100,report=0", "--records", recs, "--mem", "8M", "--stats")
	if code != 0 {
		t.Fatalf("run counter = %d, %s", code, errs)
	}
	b, err := os.ReadFile(recs)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 100 || lines[0] != "1" || lines[99] != "100" {
		t.Errorf("records file has %d lines (%q...%q), want 1..100", len(lines), lines[0], lines[len(lines)-1])
	}
	if !strings.Contains(errs, "stats: exits=") || !strings.Contains(errs, "(100 output records)") {
		t.Errorf("stderr %q lacks stats or record count", errs)
	}
}

func TestRunInterrupted(t *testing.T) {
	requireKVM(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var out, errb bytes.Buffer
	code := run(ctx, []string{"run", "--payload", "counter,iterations=0"}, &out, &errb)
	if code != exitInterrupted || !strings.Contains(errb.String(), "interrupted") {
		t.Errorf("run with a cancelled context = %d, %q; want %d", code, errb.String(), exitInterrupted)
	}
}

func FuzzParseOptions(f *testing.F) {
	for _, s := range []string{"a=1", "a=1,b=2", ",", "a", "=1", "a=", "a=1,a=2", "counter,pages=3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m := map[string]string{}
		if err := parseOptions(s, m); err != nil {
			return
		}
		for k, v := range m {
			if k == "" || v == "" || strings.ContainsAny(k, ",=") || strings.Contains(v, ",") {
				t.Errorf("parseOptions(%q) produced %q=%q", s, k, v)
			}
		}
		if _, err := parsePayloadArg(s, map[string]string{}); err != nil && !strings.Contains(err.Error(), "--payload") {
			t.Errorf("parsePayloadArg(%q) = %v", s, err)
		}
	})
}

// TestRoleBadInput: the fault-tolerance roles refuse bad command lines with
// one clear line.
func TestRoleBadInput(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"intermediary", "--keys", dir}, exitUsage, "--backup ADDR is required"},
		{[]string{"intermediary", "--backup", "tcp://127.0.0.1:1"}, exitError, "--keys DIR is required"},
		{[]string{"intermediary", "--backup", "tcp://127.0.0.1:1", "--keys", dir}, exitError, "ca.crt"},
		{[]string{"backup"}, exitError, "--keys DIR is required"},
		{[]string{"backup", "--keys", filepath.Join(dir, "none")}, exitError, "none"},
		{[]string{"run", "--payload", "hello", "--protect", "tcp://127.0.0.1:1"}, exitError, "--keys DIR is required"},
		{[]string{"run", "--payload", "hello", "--protect", "tcp://x", "--save", "f", "--save-after", "1"}, exitUsage, "cannot be combined"},
		{[]string{"run", "--payload", "hello", "--interval", "0s"}, exitError, "--interval"},
		{[]string{"run", "--payload", "hello", "--dirty-budget", "2K"}, exitError, "--dirty-budget 2K: less than one page"},
		{[]string{"run", "--payload", "hello", "--on-intermediary-loss", "direct"}, exitError, "--direct-backup ADDR"},
		{[]string{"run", "--payload", "hello", "--direct-backup", "tcp://127.0.0.1:1"}, exitError, "go together"},
		{[]string{"run", "--payload", "hello", "--on-intermediary-loss", "elsewhere"}, exitError, "want hold, pause or direct"},
		{[]string{"run", "--payload", "hello", "--dirty-budget", "lots"}, exitError, "--dirty-budget lots"},
		{[]string{"run", "--payload", "hello", "--compress", "tight"}, exitError, "--compress: "},
		{[]string{"intermediary", "--backup", "tcp://127.0.0.1:1", "--keys", dir, "--wan-compress", "tight"}, exitError, "--wan-compress: "},
		{[]string{"intermediary", "--backup", "tcp://127.0.0.1:1", "--keys", dir, "--hold-back", "bandwidth=0"}, exitError, "not a bandwidth"},
		{[]string{"intermediary", "--backup", "tcp://127.0.0.1:1", "--keys", dir, "--hold-back", "range=8M-4M"}, exitError, "empty range"},
		{[]string{"backup", "--keys", dir, "--request", "settle=2"}, exitError, "only with a manifest policy"},
		{[]string{"backup", "--keys", dir, "--policy", "pull-every=1s", "--request", "on"}, exitError, "only with a manifest policy"},
		{[]string{"backup", "--keys", dir, "--policy", "manifest", "--request", "settle=x"}, exitError, "--request"},
		{[]string{"backup", "--keys", dir, "--policy", "manifest=1"}, exitError, "manifest takes no value"},
		{[]string{"backup", "--keys", dir, "--large-pages", "budget=x"}, exitError, "--large-pages budget=x"},
		{[]string{"backup", "--keys", dir, "--disk", ""}, exitUsage, "--disk: an empty path"},
	}
	for _, tc := range tests {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, errs, tc.code, tc.errSub)
		}
		if tc.code == exitUsage {
			checkUsageError(t, tc.args[0], tc.args, errs)
		}
	}
}
