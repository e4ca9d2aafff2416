// Command testtail passes `go test` output through and, when a test or
// benchmark failed, ends it with a short summary of each failure: the
// failure's own lines and the last console lines of each QEMU machine it
// logged. A CI log is often read from its tail, and a failed QEMU test's
// reason sits among thousands of console lines (a failed benchmark's
// whole log is printed only at its end), so the tail alone must say what
// failed and why.
//
//	go test -v ./qemu-tests/ 2>&1 | testtail
//	go test -bench . ./qemu-tests/ | testtail -only '^(bench|--- FAIL|FAIL|ok)'
//
// testtail exits 0; the pipeline's status is go test's (pipefail).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
)

func main() {
	only := flag.String("only", "", "pass through only the lines matching this regular expression (default: every line)")
	console := flag.Int("console", 12, "console lines to keep per machine in a failure's summary")
	flag.Parse()
	var re *regexp.Regexp
	if *only != "" {
		var err error
		if re, err = regexp.Compile(*only); err != nil {
			fmt.Fprintf(os.Stderr, "testtail: -only: %v\n", err)
			os.Exit(2)
		}
	}
	if err := run(os.Stdin, os.Stdout, re, *console); err != nil {
		fmt.Fprintf(os.Stderr, "testtail: %v\n", err)
		os.Exit(1)
	}
}

// run copies in to out (the lines matching only, or all if only is nil)
// and appends the summary of the failures it saw.
func run(in io.Reader, out io.Writer, only *regexp.Regexp, console int) error {
	s := bufio.NewScanner(in)
	s.Buffer(make([]byte, 64<<10), 4<<20)
	w := bufio.NewWriter(out)
	var c collector
	for s.Scan() {
		l := s.Text()
		c.add(l)
		if only == nil || only.MatchString(l) {
			w.WriteString(l)
			w.WriteByte('\n')
			if only == nil {
				w.Flush() // live progress when passing everything through
			}
		}
	}
	c.end()
	for _, f := range c.failures {
		f.summary(w, console)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	return s.Err()
}

var (
	// marker lines split the output into blocks: a verbose test's log
	// precedes its result, a benchmark's or quiet test's follows it.
	marker = regexp.MustCompile(`^\s*(=== (RUN|CONT|PAUSE|NAME)|--- (PASS|FAIL|SKIP|BENCH):)`)
	failed = regexp.MustCompile(`^\s*--- FAIL: (\S+)`)
	// consoleLine is a machine's console line as the QEMU tests log it:
	// "file_test.go:N: NAME SECONDSs| TEXT".
	consoleLine = regexp.MustCompile(`^\s+\S+_test\.go:\d+: (\S+)\s+\d+(?:\.\d+)?s\| ?`)
	indented    = regexp.MustCompile(`^\s{4,}\S`)
)

// collector groups lines into blocks and keeps, for each failure, the
// block before its result line and the indented lines after it.
type collector struct {
	block    []string // lines since the last marker
	after    *failure // a failure whose indented lines follow
	failures []*failure
}

type failure struct {
	name  string
	lines []string
}

func (c *collector) add(l string) {
	if c.after != nil {
		if indented.MatchString(l) && !marker.MatchString(l) {
			c.after.lines = append(c.after.lines, l)
			return
		}
		c.after = nil
	}
	if m := failed.FindStringSubmatch(l); m != nil {
		f := &failure{name: m[1], lines: c.block}
		c.failures = append(c.failures, f)
		c.block = nil
		c.after = f
		return
	}
	if marker.MatchString(l) {
		c.block = nil
		return
	}
	c.block = append(c.block, l)
}

func (c *collector) end() { c.after = nil }

// maxReason bounds a failure's own lines in its summary (the last ones
// are kept: a fatal error is its test's last line).
const maxReason = 40

// summary writes the failure's lines that are not console lines, and the
// last n console lines of each machine, in their order.
func (f *failure) summary(w io.Writer, n int) {
	fmt.Fprintf(w, "testtail: --- FAIL: %s (its lines; the last %d console lines of each machine)\n", f.name, n)
	machine := make([]string, len(f.lines)) // the machine of a console line
	var reason []int                        // the failure's own lines
	count := map[string]int{}
	for i, l := range f.lines {
		if m := consoleLine.FindStringSubmatch(l); m != nil {
			machine[i] = m[1]
			count[m[1]]++
		} else if indented.MatchString(l) {
			reason = append(reason, i)
		}
	}
	if len(reason) > maxReason {
		fmt.Fprintf(w, "    ... %d earlier lines\n", len(reason)-maxReason)
		reason = reason[len(reason)-maxReason:]
	}
	keep := map[int]bool{}
	for _, i := range reason {
		keep[i] = true
	}
	for i, l := range f.lines {
		if m := machine[i]; m != "" {
			count[m]--
			if count[m] < n {
				fmt.Fprintln(w, l)
			}
		} else if keep[i] {
			fmt.Fprintln(w, l)
		}
	}
}
