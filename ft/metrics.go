package ft

import (
	"math"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metric is one sample a role reports: on its status line and, through
// the Prometheus client library, on its metrics endpoint.
type Metric struct {
	Name   string  // understudy_<role>_<what>, Prometheus style
	Help   string  // plain text (the library escapes it)
	Kind   string  // "counter" or "gauge"
	Labels []Label // optional, e.g. {quantile 0.99}; the same names for every sample of a Name
	Value  float64
}

// Label is a label of a Metric's sample.
type Label struct{ Name, Value string }

// roleCollector is a prometheus.Collector that reads a role's figures at
// scrape time: collect returns them (a role's Metrics method).
type roleCollector struct {
	collect func() []Metric
	descs   map[string]*prometheus.Desc // by metric name, fixed at registration
}

func newRoleCollector(collect func() []Metric) *roleCollector {
	c := &roleCollector{collect: collect, descs: map[string]*prometheus.Desc{}}
	for _, m := range collect() {
		if c.descs[m.Name] == nil {
			names := make([]string, len(m.Labels))
			for i, l := range m.Labels {
				names[i] = l.Name
			}
			c.descs[m.Name] = prometheus.NewDesc(m.Name, m.Help, names, nil)
		}
	}
	return c
}

// Describe sends the descriptions of the role's metrics.
func (c *roleCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect reads the role's figures now.
func (c *roleCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.collect() {
		d := c.descs[m.Name]
		if d == nil {
			continue // not described at registration: the registry would refuse it
		}
		kind := prometheus.UntypedValue
		switch m.Kind {
		case "counter":
			kind = prometheus.CounterValue
		case "gauge":
			kind = prometheus.GaugeValue
		}
		values := make([]string, len(m.Labels))
		for i, l := range m.Labels {
			values[i] = l.Value
		}
		pm, err := prometheus.NewConstMetric(d, kind, m.Value, values...)
		if err != nil {
			pm = prometheus.NewInvalidMetric(d, err)
		}
		ch <- pm
	}
}

// NewMetricsRegistry returns a registry of its own for one role, whose
// collector reads the figures collect returns at every scrape. The set of
// metric names is taken from a first call of collect.
func NewMetricsRegistry(collect func() []Metric) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	if err := reg.Register(newRoleCollector(collect)); err != nil {
		return nil, err
	}
	return reg, nil
}

// MetricsHandler serves the metrics returned by collect at any path, in the
// Prometheus text format (promhttp over a registry of the role's own,
// NewMetricsRegistry). Only GET and HEAD are served.
func MetricsHandler(collect func() []Metric) http.Handler {
	reg, err := NewMetricsRegistry(collect)
	if err != nil {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "metrics: "+err.Error(), http.StatusInternalServerError)
		})
	}
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "GET only", http.StatusMethodNotAllowed)
			return
		}
		h.ServeHTTP(w, r)
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
