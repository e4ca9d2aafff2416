package main

import (
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/ft"
)

// TestLargePageMetrics: the controller's metrics have the same names with
// no controller yet (all zero), and render as Prometheus text.
func TestLargePageMetrics(t *testing.T) {
	ms := largePageMetrics(nil)
	if len(ms) != 10 {
		t.Fatalf("%d metrics, want 10", len(ms))
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
