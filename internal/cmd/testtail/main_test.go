package main

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
)

// console is n console lines of machine name, as the QEMU tests log them.
func console(name string, n int) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "    roles_test.go:366: %s %6.2fs| line %d of %s\n", name, float64(i), i, name)
	}
	return b.String()
}

// A failed benchmark's log follows its result line; its reason is kept
// and only the last console lines of each machine.
func TestBenchmarkFailure(t *testing.T) {
	in := "bench exit-detect: mode=none\n" +
		"--- FAIL: BenchmarkLinuxFT\n" +
		"    linuxft_test.go:108: QEMU node1 with tcg\n" +
		console("node1", 30) + console("node2", 3) +
		"    appliance_test.go:40: waiting for \"serving\": deadline exceeded after 12m0s\n" +
		"--- BENCH: BenchmarkLinuxFailover\n" +
		"    linuxft_test.go:108: QEMU node3 with tcg\n" +
		console("node3", 20) +
		"bench linux-failover: detect_ms=5003\n" +
		"FAIL\nFAIL\tgithub.com/understudy-vmm/understudy/qemu-tests\t891.667s\n"
	var out strings.Builder
	if err := run(strings.NewReader(in), &out, regexp.MustCompile(`^(bench|--- FAIL|FAIL|ok)`), 5); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	head, sum, ok := strings.Cut(got, "testtail: --- FAIL: BenchmarkLinuxFT")
	if !ok {
		t.Fatalf("no summary of the failure:\n%s", got)
	}
	if strings.Contains(head, "roles_test.go") || !strings.Contains(head, "bench linux-failover: detect_ms=5003") {
		t.Errorf("-only passed the wrong lines:\n%s", head)
	}
	for _, want := range []string{
		"linuxft_test.go:108: QEMU node1 with tcg",
		"deadline exceeded after 12m0s",
		"line 29 of node1", "line 25 of node1",
		"line 0 of node2", "line 2 of node2",
	} {
		if !strings.Contains(sum, want) {
			t.Errorf("the summary lacks %q:\n%s", want, sum)
		}
	}
	for _, not := range []string{"line 24 of node1", "node3", "BenchmarkLinuxFailover"} {
		if strings.Contains(sum, not) {
			t.Errorf("the summary has %q:\n%s", not, sum)
		}
	}
	// The reason is the summary's last line: the tail says why.
	if lines := strings.Split(strings.TrimSpace(sum), "\n"); !strings.Contains(lines[len(lines)-1], "deadline exceeded") {
		t.Errorf("the summary does not end with the reason:\n%s", sum)
	}
}

// A verbose test's log precedes its result line; subtests are indented;
// passing tests get no summary, and everything passes through.
func TestVerboseFailure(t *testing.T) {
	in := "=== RUN   TestA\n" + console("console", 4) + "--- PASS: TestA (1.00s)\n" +
		"=== RUN   TestLinuxFailover\n" +
		"=== RUN   TestLinuxFailover/kill1\n" + console("node1", 8) +
		"    linuxft_test.go:130: kill1: the client's result \"x\"\n" +
		"    --- FAIL: TestLinuxFailover/kill1 (70.00s)\n" +
		"--- FAIL: TestLinuxFailover (80.00s)\n" +
		"FAIL\n"
	var out strings.Builder
	if err := run(strings.NewReader(in), &out, nil, 3); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	if !strings.HasPrefix(got, in) {
		t.Fatalf("the input did not pass through whole:\n%s", got)
	}
	sum := strings.TrimPrefix(got, in)
	if strings.Contains(sum, "TestA") || strings.Contains(sum, "of console") {
		t.Errorf("a passing test summarised:\n%s", sum)
	}
	for _, want := range []string{"testtail: --- FAIL: TestLinuxFailover/kill1", "line 7 of node1", "line 5 of node1", "the client's result", "testtail: --- FAIL: TestLinuxFailover "} {
		if !strings.Contains(sum, want) {
			t.Errorf("the summary lacks %q:\n%s", want, sum)
		}
	}
	if strings.Contains(sum, "line 4 of node1") {
		t.Errorf("more than 3 console lines kept:\n%s", sum)
	}
}

// Many reason lines: the last maxReason are kept.
func TestLongReason(t *testing.T) {
	var b strings.Builder
	b.WriteString("--- FAIL: BenchmarkX\n")
	for i := range maxReason + 10 {
		fmt.Fprintf(&b, "    x_test.go:1: reason %d\n", i)
	}
	var out strings.Builder
	if err := run(strings.NewReader(b.String()), &out, regexp.MustCompile(`^$`), 5); err != nil {
		t.Fatal(err)
	}
	got := out.String()
	if strings.Contains(got, "reason 9\n") || !strings.Contains(got, "reason 10\n") || !strings.Contains(got, "... 10 earlier lines") {
		t.Errorf("want the last %d reason lines:\n%s", maxReason, got)
	}
}
