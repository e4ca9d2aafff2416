package main

import (
	"errors"
	"io"
	"log/slog"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/vmm/largepage"
)

// largePageMetrics returns the large-page controller's figures as metrics
// (all zero while lp is nil: a metrics endpoint learns the names at its
// first scrape of them, which may come before the controller starts).
func largePageMetrics(lp *largepage.Pager) []ft.Metric {
	var st largepage.Status
	if lp != nil {
		st = lp.Status()
	}
	sh := st.Shadow
	m := func(name, help, kind string, v float64) ft.Metric {
		return ft.Metric{Name: "understudy_" + name, Help: help, Kind: kind, Value: v}
	}
	return []ft.Metric{
		m("largepages_windows_total", "Sampling windows the large-page controller completed.", "counter", float64(st.Windows)),
		m("largepages_promoted", "Guest regions the controller maps large.", "gauge", float64(len(st.Promoted))),
		m("largepages_demoted_total", "Promoted regions split again (never for a Linux guest).", "counter", float64(st.Demoted)),
		m("largepages_kvm_pages_2m", "KVM's pages_2m statistic: 2 MiB mappings of guest memory.", "gauge", float64(st.Pages2M)),
		m("largepages_kvm_pages_4k", "KVM's pages_4k statistic: 4 KiB mappings of guest memory.", "gauge", float64(st.Pages4K)),
		m("shadow_address_spaces", "Guest address spaces tracked with shadow page tables (exit-detect).", "gauge", float64(sh.Spaces)),
		m("shadow_traced_pages", "Guest page-table pages traced (shadow copies held).", "gauge", float64(sh.Pages)),
		m("shadow_transitions_total", "Guest PTE transitions the shadow set followed.", "counter", float64(sh.Transitions())),
		m("shadow_exits_detected_total", "Guest processes found exiting by exit detection.", "counter", float64(sh.ExitsDetected)),
		m("shadow_traces_dropped_total", "Page-table traces exit detection dropped.", "counter", float64(sh.Dropped)),
		m("shadow_freed_bytes_total", "Shadow bytes exit detection freed.", "counter", float64(sh.FreedBytes)),
	}
}

// serveLargePageMetrics serves the large-page controller's metrics at addr
// for an unprotected run ("": none; a protected primary adds them to its
// own). Without --large-pages there is nothing to serve: an error.
func serveLargePageMetrics(addr string, largePages bool, pager *atomic.Pointer[largepage.Pager], stderr io.Writer) (func(), error) {
	if addr == "" {
		return func() {}, nil
	}
	if !largePages {
		return nil, errors.New("--metrics without --protect serves the large-page controller's metrics: it needs --large-pages")
	}
	log, _ := roleLoggers(stderr, "run", slog.LevelWarn)
	return ft.ServeMetrics(addr, func() []ft.Metric { return largePageMetrics(pager.Load()) }, log)
}
