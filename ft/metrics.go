package ft

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
)

// Metric is one sample a role reports: on its status line and, in the
// Prometheus text format, on its metrics endpoint.
type Metric struct {
	Name   string // understudy_<role>_<what>, Prometheus style
	Help   string
	Kind   string // "counter" or "gauge"
	Labels string // preformatted label set, e.g. `quantile="0.99"` (optional)
	Value  float64
}

// WriteMetrics writes ms in the Prometheus text exposition format (version
// 0.0.4): a HELP and TYPE line per metric name, then its samples.
func WriteMetrics(w io.Writer, ms []Metric) error {
	var b strings.Builder
	seen := map[string]bool{}
	for _, m := range ms {
		if !seen[m.Name] {
			seen[m.Name] = true
			fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", m.Name, m.Help, m.Name, m.Kind)
		}
		name := m.Name
		if m.Labels != "" {
			name += "{" + m.Labels + "}"
		}
		fmt.Fprintf(&b, "%s %s\n", name, formatValue(m.Value))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func formatValue(v float64) string {
	switch {
	case math.IsNaN(v):
		return "NaN"
	case v == math.Trunc(v) && math.Abs(v) < 1e15:
		return fmt.Sprintf("%d", int64(v))
	}
	return fmt.Sprintf("%g", v)
}

// MetricsHandler serves the metrics returned by collect at any path, in the
// Prometheus text format.
func MetricsHandler(collect func() []Metric) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "GET only", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		WriteMetrics(w, collect())
	})
}

// durationWindow keeps the last durations observed, for quantiles.
type durationWindow struct {
	mu   sync.Mutex
	buf  []time.Duration
	next int
	full bool
}

func newDurationWindow(n int) *durationWindow { return &durationWindow{buf: make([]time.Duration, n)} }

func (w *durationWindow) add(d time.Duration) {
	w.mu.Lock()
	w.buf[w.next] = d
	w.next++
	if w.next == len(w.buf) {
		w.next, w.full = 0, true
	}
	w.mu.Unlock()
}

// quantiles returns the q-quantiles (nearest rank) of the window, or NaN
// when it is empty.
func (w *durationWindow) quantiles(qs ...float64) []float64 {
	w.mu.Lock()
	n := w.next
	if w.full {
		n = len(w.buf)
	}
	s := slices.Clone(w.buf[:n])
	w.mu.Unlock()
	out := make([]float64, len(qs))
	if n == 0 {
		for i := range out {
			out[i] = math.NaN()
		}
		return out
	}
	slices.Sort(s)
	for i, q := range qs {
		k := int(math.Ceil(q*float64(n))) - 1
		out[i] = s[max(k, 0)].Seconds()
	}
	return out
}

// rate turns a growing total into a per-second rate between calls.
type rate struct {
	mu   sync.Mutex
	last float64
	at   time.Time
}

// per returns the rate of total since the previous call (0 on the first).
func (r *rate) per(total float64) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	var v float64
	if !r.at.IsZero() {
		if dt := now.Sub(r.at).Seconds(); dt > 0 {
			v = (total - r.last) / dt
		}
	}
	r.last, r.at = total, now
	return v
}
