package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestRunProtectHeatFailover: `run --protect --large-pages` gives each
// checkpoint its controller's heat (counted from the pages the checkpoints
// found written: dirty logging keeps it from sampling), and `backup
// --large-pages` starts the activated guest's controller from the heat of
// the epoch it activated: past its warm-up, KVM maps the guest's hot
// regions with 2 MiB within its first windows.
func TestRunProtectHeatFailover(t *testing.T) {
	requireKVM(t)
	dir := clusterKeys(t)
	iaddr, baddr := freeTCP(t), freeTCP(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const lp = "budget=2,period=60ms,window=8ms,warmup=6,source=refault"
	backup := startRole(ctx, "backup", "backup", "--listen", baddr, "--keys", dir, "--large-pages", lp, "--status-interval", "20ms")
	inter := startRole(ctx, "intermediary", "intermediary", "--listen", iaddr, "--backup", baddr, "--keys", dir, "--status-interval", "0")
	waitStderr(t, backup.errs, "listening on")
	waitStderr(t, inter.errs, "listening on")
	pctx, kill := context.WithCancel(ctx)
	maddr := strings.TrimPrefix(freeTCP(t), "tcp://")
	primary := startRole(pctx, "primary", "run", "--payload", "counter,pages=2048,hot=1024,cold_every=0,report=0", "--mem", "32M",
		"--protect", iaddr, "--keys", dir, "--interval", "10ms", "--large-pages", lp, "--status-interval", "20ms", "--metrics", maddr)
	// The protected primary's metrics carry the controller's beside its own.
	scrapeUntil(t, "http://"+maddr+"/metrics", func(m map[string]float64) bool {
		return m["understudy_primary_epochs_total"] > 0 && m["understudy_largepages_windows_total"] > 0
	}, primary.errs.String)
	warm := regexp.MustCompile(`write_windows=([0-9]+)`)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if m := warm.FindAllStringSubmatch(primary.errs.String(), -1); len(m) > 0 {
			if n, _ := strconv.Atoi(m[len(m)-1][1]); n >= 8 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the primary's controller did not count 8 windows of written pages: %s", primary.errs.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond) // ten more epochs: the heat is committed
	kill()
	primary.wantExit(t, exitInterrupted)
	waitStderr(t, backup.errs, "activated at epoch")
	waitStderr(t, backup.errs, "large pages: starting from the primary's heat (")
	large := regexp.MustCompile(`large-pages: policy=prioritized source=refault windows=([0-9]+) .*pages_2m=[1-9].*`)
	first := waitMatch(t, backup.errs, large, "the activated guest got no 2 MiB page")
	if w, _ := strconv.Atoi(first[1]); w > 2 || !strings.Contains(first[0], "(seeded with carried heat)") {
		t.Errorf("the backup's first status line with pages_2m > 0 is %q: want the first windows of a seeded controller", first[0])
	}
	t.Logf("backup: %s", first[0])
	endFailover(t, inter, backup, cancel)
}
