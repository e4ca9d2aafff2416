package ft

import (
	"io"
	"math"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestWriteMetrics(t *testing.T) {
	ms := []Metric{
		{Name: "understudy_x_total", Help: "Xs.", Kind: "counter", Value: 3},
		{Name: "understudy_stun_seconds", Help: "Stun.", Kind: "gauge", Labels: `quantile="0.5"`, Value: 0.00125},
		{Name: "understudy_stun_seconds", Help: "Stun.", Kind: "gauge", Labels: `quantile="0.99"`, Value: math.NaN()},
	}
	srv := httptest.NewServer(MetricsHandler(func() []Metric { return ms }))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	want := `# HELP understudy_x_total Xs.
# TYPE understudy_x_total counter
understudy_x_total 3
# HELP understudy_stun_seconds Stun.
# TYPE understudy_stun_seconds gauge
understudy_stun_seconds{quantile="0.5"} 0.00125
understudy_stun_seconds{quantile="0.99"} NaN
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
