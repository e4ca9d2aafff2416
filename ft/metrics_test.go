package ft

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/vmm"
)

// TestMetricsHandler: the handler serves a role's figures as they are at
// the scrape, in the Prometheus text format (families by name), with HELP
// text escaped, and only to GET.
func TestMetricsHandler(t *testing.T) {
	ms := []Metric{
		{Name: "understudy_x_total", Help: "Xs.", Kind: "counter", Value: 3},
		{Name: "understudy_stun_seconds", Help: "Stun.", Kind: "gauge", Labels: []Label{{"quantile", "0.5"}}, Value: 0.00125},
		{Name: "understudy_stun_seconds", Help: "Stun.", Kind: "gauge", Labels: []Label{{"quantile", "0.99"}}, Value: math.NaN()},
	}
	srv := httptest.NewServer(MetricsHandler(func() []Metric { return ms }))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	want := `# HELP understudy_stun_seconds Stun.
# TYPE understudy_stun_seconds gauge
understudy_stun_seconds{quantile="0.5"} 0.00125
understudy_stun_seconds{quantile="0.99"} NaN
# HELP understudy_x_total Xs.
# TYPE understudy_x_total counter
understudy_x_total 3
`
	if string(body) != want {
		t.Errorf("metrics body =\n%s\nwant\n%s", body, want)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("Content-Type = %q, want the Prometheus text format", ct)
	}
	post, err := srv.Client().Post(srv.URL, "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	post.Body.Close()
	if post.StatusCode != 405 {
		t.Errorf("POST status = %d, want 405", post.StatusCode)
	}

	// Figures are read at each scrape; HELP text is escaped.
	n := 0.0
	srv2 := httptest.NewServer(MetricsHandler(func() []Metric {
		n++
		return []Metric{{Name: "understudy_y_total", Help: "Ys\\ per\nline.", Kind: "counter", Value: n}}
	}))
	defer srv2.Close()
	for _, want := range []string{"understudy_y_total 2\n", "understudy_y_total 3\n"} {
		resp, err := srv2.Client().Get(srv2.URL)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(body), want) || !strings.Contains(string(body), `# HELP understudy_y_total Ys\\ per\nline.`+"\n") {
			t.Errorf("scrape =\n%s\nwant %q and the HELP text escaped", body, want)
		}
	}
}

func TestDurationWindow(t *testing.T) {
	w := newDurationWindow(4)
	if q := w.quantiles(0.5); !math.IsNaN(q[0]) {
		t.Errorf("empty window quantile = %v, want NaN", q[0])
	}
	for _, ms := range []int{9, 1, 2, 3, 4} { // 9 falls out of the window
		w.add(time.Duration(ms) * time.Millisecond)
	}
	q := w.quantiles(0.5, 0.99)
	if q[0] != 0.002 || q[1] != 0.004 {
		t.Errorf("quantiles(0.5, 0.99) = %v, want [0.002 0.004]", q)
	}
}

func TestParseFailpoint(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want armedFailpoint
		ok   bool
	}{
		{"", armedFailpoint{}, true},
		{"stun@3", armedFailpoint{failStun, 3}, true},
		{"transfer@12", armedFailpoint{failTransfer, 12}, true},
		{"sent@1", armedFailpoint{failSent, 1}, true},
		{"corrupt@7", armedFailpoint{failCorrupt, 7}, true},
		{"corrupt-disk@4", armedFailpoint{failCorruptDisk, 4}, true},
		{"corrupt-state@9", armedFailpoint{failCorruptState, 9}, true},
		{"corrupt-state@0", armedFailpoint{}, false},
		{"sent@0", armedFailpoint{}, false},
		{"sent", armedFailpoint{}, false},
		{"boom@3", armedFailpoint{}, false},
		{"stun@-1", armedFailpoint{}, false},
	} {
		got, err := parseFailpoint(tc.in)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("parseFailpoint(%q) = %v, %v; want %v, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestLossWindow(t *testing.T) {
	at := time.Date(2026, 11, 25, 1, 2, 3, 0, time.UTC)
	for _, tc := range []struct {
		w      LossWindow
		epochs uint64
		says   string
	}{
		{LossWindow{Committed: 7}, 0, "never reported"},
		{LossWindow{Committed: 7, Reported: 7, At: at}, 0, "acknowledged after that report may be lost"},
		{LossWindow{Committed: 7, Reported: 10, At: at}, 3, "epochs 8..10 (3 epochs"},
	} {
		if got := tc.w.Epochs(); got != tc.epochs {
			t.Errorf("%+v.Epochs() = %d, want %d", tc.w, got, tc.epochs)
		}
		if s := tc.w.String(); !strings.Contains(s, tc.says) || !strings.Contains(s, "activated at epoch 7") {
			t.Errorf("%+v.String() = %q, want it to say %q", tc.w, s, tc.says)
		}
	}
}

func TestParsePolicies(t *testing.T) {
	if p, err := ParseLinkLossPolicy("pause"); err != nil || p != PauseGuest {
		t.Errorf("ParseLinkLossPolicy(pause) = %v, %v", p, err)
	}
	if p, err := ParseLinkLossPolicy("hold"); err != nil || p != HoldOutput {
		t.Errorf("ParseLinkLossPolicy(hold) = %v, %v", p, err)
	}
	if _, err := ParseLinkLossPolicy("release"); err == nil {
		t.Errorf("ParseLinkLossPolicy(release) = nil error, want a refusal")
	}
	if p, err := ParseBackupLossPolicy("stall"); err != nil || p != StallWithoutBackup {
		t.Errorf("ParseBackupLossPolicy(stall) = %v, %v", p, err)
	}
	if _, err := ParseBackupLossPolicy("ignore"); err == nil {
		t.Errorf("ParseBackupLossPolicy(ignore) = nil error, want a refusal")
	}
}

// scrape gets the metrics at url and returns the unlabelled samples.
func scrape(c *http.Client, url string) (map[string]float64, error) {
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, l := range strings.Split(string(body), "\n") {
		name, val, ok := strings.Cut(l, " ")
		if !ok || strings.HasPrefix(l, "#") || strings.Contains(name, "{") {
			continue
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			return nil, fmt.Errorf("sample %q: %w", l, err)
		}
		out[name] = v
	}
	return out, nil
}

// TestMetricsReleasedAfterAcked scrapes a protecting primary's metrics
// endpoint, as an operator or an outside test would, all through a run:
// at every scrape the released epoch is at most the acknowledged one, and
// neither they nor the released records ever go back. At the end every
// record was released, at the last epoch sent.
func TestMetricsReleasedAfterAcked(t *testing.T) {
	kvmtest.Require(t)
	const memSize, iterations = 32 << 20, 20000
	_, pc := servingIntermediary(t, memSize)
	var p *Primary
	m, err := vmm.New(vmm.Config{MemSize: memSize, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "256", "hot": "16", "cold_every": "2", "iterations": strconv.Itoa(iterations), "spin": "30000", "report": "0"},
		OnRecord: func(r vmm.Record) { p.Record(r) }}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	p, err = NewPrimary(m, pc, PrimaryConfig{Interval: 5 * time.Millisecond, OnRelease: func(vmm.Record) {}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(MetricsHandler(p.Metrics))
	defer srv.Close()

	type sample struct{ acked, released, records float64 }
	var (
		samples []sample
		bad     []string
	)
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				done <- nil
				return
			default:
			}
			got, err := scrape(srv.Client(), srv.URL+"/metrics")
			if err != nil {
				done <- err
				return
			}
			s := sample{got["understudy_primary_acked_epoch"], got["understudy_primary_released_epoch"], got["understudy_primary_released_records_total"]}
			_, ok1 := got["understudy_primary_released_epoch"]
			_, ok2 := got["understudy_primary_released_records_total"]
			if !ok1 || !ok2 {
				bad = append(bad, fmt.Sprintf("scrape %d lacks the released epoch or records: %v", len(samples), got))
			}
			if s.released > s.acked {
				bad = append(bad, fmt.Sprintf("scrape %d: released epoch %v ahead of acknowledged %v", len(samples), s.released, s.acked))
			}
			if n := len(samples); n > 0 && (s.acked < samples[n-1].acked || s.released < samples[n-1].released || s.records < samples[n-1].records) {
				bad = append(bad, fmt.Sprintf("scrape %d went back: %+v after %+v", n, s, samples[n-1]))
			}
			samples = append(samples, s)
			time.Sleep(time.Millisecond) // leave the CPUs to the run
		}
	}()
	runProtected(t, m, p)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for i, b := range bad {
		if i == 10 {
			t.Errorf("... %d more", len(bad)-10)
			break
		}
		t.Error(b)
	}
	progress := 0
	for _, s := range samples {
		if s.released > 0 && s.released < float64(p.Epochs()) {
			progress++
		}
	}
	t.Logf("%d scrapes, %d of them mid-run with output released", len(samples), progress)
	if progress == 0 {
		t.Errorf("no scrape saw the run in progress (%d scrapes)", len(samples))
	}
	end, err := scrape(srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if e := float64(p.Epochs()); end["understudy_primary_acked_epoch"] != e || end["understudy_primary_released_epoch"] != e ||
		end["understudy_primary_released_records_total"] != iterations {
		t.Errorf("at the end: acked %v, released %v epochs and %v records; want %v, %v and %d",
			end["understudy_primary_acked_epoch"], end["understudy_primary_released_epoch"], end["understudy_primary_released_records_total"], e, e, iterations)
	}
}

// BenchmarkMetricsScrape serves one scrape of an intermediary's metrics
// (the largest role's set) without the network.
func BenchmarkMetricsScrape(b *testing.B) {
	in, err := NewIntermediary(8<<20, nil)
	if err != nil {
		b.Fatal(err)
	}
	h := MetricsHandler(in.Metrics)
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			b.Fatalf("status %d", w.Code)
		}
	}
}
