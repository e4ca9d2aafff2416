package main

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft"
)

// TestLargePageMetrics: the controller's metrics have the same names with
// no controller yet (all zero), and render as Prometheus text.
func TestLargePageMetrics(t *testing.T) {
	ms := largePageMetrics(nil)
	if len(ms) != 11 {
		t.Fatalf("%d metrics, want 11", len(ms))
	}
	h := ft.MetricsHandler(func() []ft.Metric { return largePageMetrics(nil) })
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, m := range ms {
		want := m.Name + " 0\n"
		if !strings.Contains(string(body), want) || !strings.Contains(string(body), "# TYPE "+m.Name+" "+m.Kind) {
			t.Errorf("metrics page lacks %q typed %s:\n%s", want, m.Kind, body)
		}
	}
	for _, name := range []string{"understudy_shadow_exits_detected_total", "understudy_shadow_traced_pages", "understudy_shadow_freed_bytes_total", "understudy_shadow_transitions_total"} {
		if !strings.Contains(string(body), name+" ") {
			t.Errorf("metrics page lacks %s", name)
		}
	}
	code, _, errs := runCLI("run", "--payload", "hello", "--metrics", "127.0.0.1:0", "--kvm", "/nonexistent")
	if code == 0 || !strings.Contains(errs, "needs --large-pages") {
		t.Errorf("run --metrics without --large-pages or --protect = %d, %q; want an error", code, errs)
	}
}

// TestRunLargePageMetricsLive: an unprotected `run --large-pages --metrics`
// serves the controller's figures while the guest runs: its windows count
// up and the regions it promotes show.
func TestRunLargePageMetricsLive(t *testing.T) {
	requireKVM(t)
	addr := strings.TrimPrefix(freeTCP(t), "tcp://")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	done := make(chan int, 1)
	errs := &lockedBuffer{}
	go func() {
		done <- run(ctx, []string{"run", "--payload", "touch,regions=16,hot=2,rounds=0", "--mem", "64M",
			"--large-pages", "budget=2,period=60ms,window=8ms,warmup=2", "--metrics", addr}, &lockedBuffer{}, errs)
	}()
	m := scrapeUntil(t, "http://"+addr+"/metrics", func(m map[string]float64) bool {
		return m["understudy_largepages_windows_total"] >= 3 && m["understudy_largepages_promoted"] > 0
	}, errs.String)
	if m["understudy_largepages_promoted"] > 2 {
		t.Errorf("metrics %v: more promoted than the budget of 2", m)
	}
	cancel()
	if code := <-done; code != exitInterrupted {
		t.Errorf("run ended with %d, want %d: %s", code, exitInterrupted, errs.String())
	}
}

// scrapeUntil scrapes url (Prometheus text) until ok accepts its values and
// returns them; it fails the test after 30 s, with why()'s text.
func scrapeUntil(t *testing.T, url string, ok func(map[string]float64) bool, why func() string) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last map[string]float64
	for {
		if resp, err := http.Get(url); err == nil {
			last = map[string]float64{}
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				name, v, found := strings.Cut(sc.Text(), " ")
				if f, err := strconv.ParseFloat(v, 64); found && err == nil && !strings.HasPrefix(name, "#") {
					last[name] = f
				}
			}
			resp.Body.Close()
			if ok(last) {
				return last
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics at %s never showed what the test waits for: %v\n%s", url, last, why())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
