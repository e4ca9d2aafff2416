// Command kvload is the client of the nested guest's key-value service
// (guest.mode=kv, package kvstore) for tests of snapshots, restores and
// failovers: it writes a stream of values over ONE TCP connection, prints a
// progress line as it goes, and at the end reads every acknowledged write
// back and has the service verify its disk.
//
//	kvload -addr 192.0.2.2:7777 [-n N] [-duration D] [-stop-file PATH] ...
//
// Writing stops after -n acknowledged writes, after -duration, once
// -stop-file exists, or on SIGUSR1, SIGINT or SIGTERM, whichever comes
// first. Then kvload GETs every key it saw acknowledged, asks SYNC and
// VERIFY (the service re-reads its log from the disk past the page cache),
// and prints, last but one,
//
//	kvload: result acked=N verified=N missing=0 wrong=0 disk=ok connection_survived=true reconnects=0 instances=1 ...
//
// connection_survived=true means every request went over the first
// connection; false means it broke (reset, closed or timed out) and kvload
// reconnected (or, with -reconnect=false, gave up). instances counts the
// service starts seen: 1 after a snapshot/restore or failover that resumed
// the guest, 2 if the service restarted. The last line is "kvload: OK" or
// "kvload: FAILED: why", and the exit status 0 or 1.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/understudy-vmm/understudy/internal/kvclient"
)

func main() {
	stop := make(chan struct{})
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stdout, "kvload: %v: stop writing\n", s)
		close(stop)
		signal.Stop(sig) // a second signal ends kvload at once
	}()
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, stop))
}

// config is what the flags ask.
type config struct {
	addr         string
	n            int
	duration     time.Duration
	stopFile     string
	interval     time.Duration
	valueSize    int
	prefix       string
	progress     time.Duration
	reconnect    bool
	timeout      time.Duration
	retryFor     time.Duration
	verifyDisk   bool
	wantSurvived bool
	poweroff     bool
	slow         time.Duration
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("kvload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.addr, "addr", "", "the service, host:port (required)")
	fs.IntVar(&c.n, "n", 0, "stop writing after `N` acknowledged writes (0: no limit)")
	fs.DurationVar(&c.duration, "duration", 0, "stop writing after this long (0: no limit)")
	fs.StringVar(&c.stopFile, "stop-file", "", "stop writing once this `path` exists")
	fs.DurationVar(&c.interval, "interval", 0, "pause between writes")
	fs.IntVar(&c.valueSize, "value-size", 64, "bytes per value (32..416)")
	fs.StringVar(&c.prefix, "prefix", "", "key prefix, 1..40 letters, digits or '-' (default: k and 8 random hex digits)")
	fs.DurationVar(&c.progress, "progress", time.Second, "print a progress line this often (0: never)")
	fs.BoolVar(&c.reconnect, "reconnect", true, "when the connection breaks, connect again and go on")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "how long one request may wait for its answer before the connection counts as broken")
	fs.DurationVar(&c.retryFor, "retry-for", 120*time.Second, "how long connecting (and reconnecting) keeps trying")
	fs.BoolVar(&c.verifyDisk, "verify-disk", true, "at the end, ask SYNC and VERIFY (the service re-reads its disk)")
	fs.BoolVar(&c.wantSurvived, "want-survived", false, "fail unless the first connection served every request")
	fs.BoolVar(&c.poweroff, "poweroff", false, "at the end, ask the service to power the guest off")
	fs.DurationVar(&c.slow, "slow", 500*time.Millisecond, "print a line for each write answered after longer than this (0: never)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.addr == "" {
		return c, errors.New("-addr host:port is required")
	}
	if c.n < 0 || c.duration < 0 || c.interval < 0 || c.progress < 0 || c.slow < 0 || c.timeout <= 0 || c.retryFor <= 0 {
		return c, errors.New("-n, -duration, -interval, -progress and -slow must not be negative; -timeout and -retry-for must be positive")
	}
	if c.valueSize < 32 || c.valueSize > kvclient.MaxValue {
		return c, fmt.Errorf("-value-size=%d: want 32..%d", c.valueSize, kvclient.MaxValue)
	}
	if c.prefix == "" {
		var b [4]byte
		_, _ = rand.Read(b[:])
		c.prefix = "k" + hex.EncodeToString(b[:])
	}
	if len(c.prefix) > 40 || strings.Trim(c.prefix, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-") != "" {
		return c, fmt.Errorf("-prefix=%q: want 1..40 letters, digits or '-'", c.prefix)
	}
	return c, nil
}

// value is the value of the i-th write: it names the key, so that a value
// read under another key is caught, and is valueSize bytes long.
func value(prefix string, i, size int) string {
	v := fmt.Sprintf("%s-%d-", prefix, i)
	for len(v) < size {
		v += string(rune('a' + (len(v)+i)%26))
	}
	return v[:size]
}

// stats are the writes' round trips.
type stats struct {
	mu   sync.Mutex // guards rtts
	rtts []time.Duration
}

func (s *stats) add(d time.Duration) {
	s.mu.Lock()
	s.rtts = append(s.rtts, d)
	s.mu.Unlock()
}

// summary returns the last, median, 99th percentile and largest round trip.
func (s *stats) summary() (last, p50, p99, max time.Duration) {
	s.mu.Lock()
	r := slices.Clone(s.rtts)
	s.mu.Unlock()
	if len(r) == 0 {
		return
	}
	last = r[len(r)-1]
	slices.Sort(r)
	return last, r[len(r)/2], r[len(r)*99/100], r[len(r)-1]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)) }

func connection(c *kvclient.Client) string {
	if c.ConnectionSurvived() {
		return "kept"
	}
	return "reconnected"
}

// run is kvload with its arguments; closing stop stops writing.
func run(args []string, out, stderr io.Writer, stop <-chan struct{}) int {
	c, err := parseFlags(args, stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "kvload: %v\n", err)
		}
		return 2
	}
	var outMu sync.Mutex // the progress goroutine prints too
	say := func(format string, a ...any) {
		outMu.Lock()
		fmt.Fprintf(out, "kvload: "+format+"\n", a...)
		outMu.Unlock()
	}
	failed := func(format string, a ...any) int {
		say("FAILED: "+format, a...)
		return 1
	}
	cl, err := kvclient.Dial(context.Background(), c.addr, kvclient.Options{
		RequestTimeout: c.timeout, RetryFor: c.retryFor, Reconnect: c.reconnect,
		Logf: func(f string, a ...any) { say("%s", strings.TrimPrefix(fmt.Sprintf(f, a...), "kvclient: ")) },
	})
	if err != nil {
		return failed("%v", err)
	}
	defer cl.Close()
	say("writing keys %s-0, %s-1, ... (values of %d bytes)", c.prefix, c.prefix, c.valueSize)

	// Stop writing on whichever comes first.
	writing := make(chan struct{})
	var once sync.Once
	var reason string
	end := func(why string) { once.Do(func() { reason = why; close(writing) }) }
	go func() {
		select {
		case <-stop:
			end("signal")
		case <-writing:
		}
	}()
	if c.duration > 0 {
		t := time.AfterFunc(c.duration, func() { end("duration") })
		defer t.Stop()
	}
	if c.stopFile != "" {
		go func() {
			tick := time.NewTicker(100 * time.Millisecond)
			defer tick.Stop()
			for {
				if _, err := os.Stat(c.stopFile); err == nil {
					end("stop file")
					return
				}
				select {
				case <-writing:
					return
				case <-tick.C:
				}
			}
		}()
	}
	var st stats
	start := time.Now()
	stopProgress := func() {}
	if c.progress > 0 {
		// Stopped and waited for once the writes stop (what it reports is
		// the writes' progress), and before run returns in any case: no
		// line of it may land in out after the result. Its last line is
		// where the writes ended, however soon that was.
		done := make(chan struct{})
		var progress sync.WaitGroup
		stopProgress = sync.OnceFunc(func() { close(done); progress.Wait() })
		defer stopProgress()
		progress.Add(1)
		go func() {
			defer progress.Done()
			tick := time.NewTicker(c.progress)
			defer tick.Stop()
			report := func() {
				last, _, _, max := st.summary()
				n := cl.AckedCount()
				say("progress acked=%d rate_per_s=%.0f rtt_ms=%s max_rtt_ms=%s reconnects=%d connection=%s",
					n, float64(n)/time.Since(start).Seconds(), ms(last), ms(max), cl.Reconnects(), connection(cl))
			}
			for {
				select {
				case <-done:
					report()
					return
				case <-tick.C:
					report()
				}
			}
		}()
	}

	var writeErr error
	for i := 0; ; i++ {
		if c.n > 0 && i >= c.n {
			end("count")
		}
		if closed(writing) {
			break
		}
		t0 := time.Now()
		_, writeErr = cl.Put(fmt.Sprintf("%s-%d", c.prefix, i), value(c.prefix, i, c.valueSize))
		rtt := time.Since(t0)
		st.add(rtt)
		if writeErr == nil && c.slow > 0 && rtt > c.slow {
			say("slow write %s-%d answered after %s ms (connection %s, acked=%d)", c.prefix, i, ms(rtt), connection(cl), cl.AckedCount())
		}
		if writeErr != nil {
			end("error")
			break
		}
		if c.interval > 0 {
			select {
			case <-time.After(c.interval):
			case <-writing:
			}
		}
	}
	stopProgress()
	acked := cl.Acked()
	say("writes stopped (%s) acked=%d after %s s", reason, len(acked), fmt.Sprintf("%.1f", time.Since(start).Seconds()))
	if writeErr != nil {
		say("write failed: %v", writeErr)
	}

	// Read back every acknowledged write.
	verified, missing, wrong := 0, 0, 0
	var readErr error
	keys := make([]string, 0, len(acked))
	for k := range acked {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v, ok, err := cl.Get(k)
		switch {
		case err != nil:
			readErr = err
		case !ok:
			missing++
			if missing <= 5 {
				say("missing %s (acknowledged as seq %d)", k, acked[k].Seq)
			}
		case v != acked[k].Value:
			wrong++
			if wrong <= 5 {
				say("wrong %s: %.40q, acknowledged %.40q", k, v, acked[k].Value)
			}
		default:
			verified++
		}
		if readErr != nil {
			break
		}
	}
	disk := "skipped"
	if c.verifyDisk && readErr == nil {
		disk = "failed"
		_, records, err := cl.Count()
		if err == nil {
			err = cl.Sync()
		}
		var v kvclient.Verify
		if err == nil {
			v, err = cl.Verify()
		}
		if err != nil {
			say("disk check: %v", err)
		} else {
			say("disk records=%d keys=%d matched=%d mismatched=%d direct=%t", v.Records, v.Keys, v.Matched, v.Mismatched, v.Direct)
			if v.OK(records) {
				disk = "ok"
			}
		}
	}
	_, p50, p99, max := st.summary()
	survived := cl.ConnectionSurvived()
	say("result acked=%d verified=%d missing=%d wrong=%d disk=%s connection_survived=%t reconnects=%d instances=%d breaks=%s rtt_ms_p50=%s rtt_ms_p99=%s max_rtt_ms=%s",
		len(acked), verified, missing, wrong, disk, survived, cl.Reconnects(), len(cl.Instances()), breaks(cl), ms(p50), ms(p99), ms(max))
	if c.poweroff && readErr == nil {
		if err := cl.PowerOff(); err != nil {
			say("poweroff: %v", err)
		}
	}
	var why []string
	for _, e := range []struct {
		bad bool
		msg string
	}{
		{writeErr != nil, fmt.Sprintf("a write failed: %v", writeErr)},
		{readErr != nil, fmt.Sprintf("reading back: %v", readErr)},
		{missing > 0 || wrong > 0, fmt.Sprintf("%d acknowledged writes missing, %d wrong", missing, wrong)},
		{c.verifyDisk && disk != "ok", "the disk does not hold what the service holds"},
		{c.wantSurvived && !survived, "the connection did not survive"},
		{len(acked) == 0, "no write was acknowledged"},
	} {
		if e.bad {
			why = append(why, e.msg)
		}
	}
	if len(why) > 0 {
		return failed("%s", strings.Join(why, "; "))
	}
	say("OK")
	return 0
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// breaks summarizes why the connection broke: "none", or the causes in
// order, as "reset,closed".
func breaks(c *kvclient.Client) string {
	b := c.Breaks()
	if len(b) == 0 {
		return "none"
	}
	causes := make([]string, len(b))
	for i, x := range b {
		causes[i] = x.Cause
	}
	return strings.Join(causes, ",")
}
