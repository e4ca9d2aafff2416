package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/largepage"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// `understudy run --kernel ... --protect ADDR`: a Linux guest protected
// through the intermediary, with the flags --protect has for payload guests
// (--interval, --dirty-budget, --on-intermediary-loss, --direct-backup,
// --give-up, --redial, --connect-timeout, the role flags and the status
// line) and
// --output-hold. Its output is held until the checkpoint covering it is
// acknowledged: the frames it transmits on every --net (then written to
// the tap, in order) and its console (then written to stdout), so the
// console shows the guest one acknowledgement late (ft/linux.go).

// parseOutputHold parses --output-hold "bytes=SIZE,frames=N" (either may be
// left out: virtio's defaults).
func parseOutputHold(s string) (virtio.EgressBounds, error) {
	var b virtio.EgressBounds
	if s == "" {
		return b, nil
	}
	opts := map[string]string{}
	if err := parseOptions(s, opts); err != nil {
		return b, fmt.Errorf("--output-hold %q: %w", s, err)
	}
	for k, v := range opts {
		switch k {
		case "bytes":
			n, err := option.ParseSize(v)
			if err != nil || n == 0 || n > virtio.MaxEgressBytes {
				return b, fmt.Errorf("--output-hold %q: bytes=%s: want a size from 1 to %s", s, v, option.FormatSize(virtio.MaxEgressBytes))
			}
			b.MaxBytes = n
		case "frames":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > virtio.MaxEgressFrames {
				return b, fmt.Errorf("--output-hold %q: frames=%s: want a count from 1 to %d", s, v, virtio.MaxEgressFrames)
			}
			b.MaxFrames = n
		default:
			return b, fmt.Errorf("--output-hold %q: unknown key %q (want bytes=SIZE,frames=N)", s, k)
		}
	}
	return b, nil
}

// runProtected runs the Linux guest of cfg under ft.RunPrimary and returns
// the exit code. runCtx ends with the escape key (Ctrl-A x) as well as ctx;
// restore gives the terminal back.
// With lpCfg (--large-pages) the large-page controller runs beside the
// guest: dirty logging keeps it from promoting, but it counts the pages
// each checkpoint found written and gives the checkpoint its heat, so a
// backup with --large-pages maps the same regions large at activation; its
// figures join the primary's metrics.
func (lf *linuxFlags) runProtected(ctx, runCtx context.Context, cfg vmm.Config, hold virtio.EgressBounds, lpCfg *largepage.Config, o linuxRunOptions,
	restore func(), ends *lineEnds, in io.Reader, stderr io.Writer) int {
	pf := o.protect
	links, log, err := o.role.links("primary", stderr)
	if err != nil {
		restore()
		return fail(stderr, err)
	}
	policy, _ := ft.ParseLinkLossPolicy(*pf.onLoss) // checked
	budget, _ := pf.dirtyBudget()                   // checked
	compress, _ := pf.compression()                 // checked
	if _, raw := in.(*escapeReader); raw && !o.quiet {
		fmt.Fprintf(stderr, "understudy: the terminal is in raw mode for the guest's console: %s\n", escapeHelp)
	}
	var (
		st    vmm.Stats
		stErr error
	)
	var (
		pager atomic.Pointer[largepage.Pager]
		heat  func([]uint64) []byte
		more  func() []ft.Metric
	)
	if lpCfg != nil {
		heat = func(dirty []uint64) []byte {
			if lp := pager.Load(); lp != nil {
				return lp.CheckpointHeat(dirty)
			}
			return nil
		}
		more = func() []ft.Metric { return largePageMetrics(pager.Load()) }
	}
	start := time.Now()
	res, err := ft.RunPrimary(runCtx, ft.PrimaryRunConfig{
		Machine:      cfg,
		NetOutput:    hold,
		Epochs:       ft.PrimaryConfig{Interval: *pf.interval, DirtyBudget: budget, OnLinkLoss: policy, GiveUp: *pf.giveUp, Redial: *pf.redial, Heat: heat, Compression: compress},
		Intermediary: *pf.addr, ConnectTimeout: *pf.connect, DirectBackup: *pf.direct, Links: links, Log: log,
		StatusEvery: o.statusEvery, Metrics: *o.role.metrics, MoreMetrics: more,
		OnStart: func(m *vmm.Machine) (func(), error) {
			stopLP := func() {}
			if lpCfg != nil {
				lp, stop, err := startLargePages(m, *lpCfg, o.statusEvery, stderr)
				if err != nil {
					return nil, err
				}
				pager.Store(lp)
				stopLP = stop
			}
			return func() {
				if o.stats {
					st, stErr = m.Stats()
				}
				stopLP()
			}, nil
		},
	})
	restore()
	ends.finish()
	elapsed := time.Since(start).Round(time.Millisecond)
	if errors.Is(context.Cause(runCtx), errQuitKey) && ctx.Err() == nil {
		fmt.Fprintf(stderr, "understudy: quit (Ctrl-A x) after %v; output not yet acknowledged was not released\n", elapsed)
		return exitInterrupted
	}
	if errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "understudy: interrupted after %v; output not yet acknowledged was not released\n", elapsed)
		return exitInterrupted
	}
	if err != nil {
		return fail(stderr, err)
	}
	if o.stats {
		if stErr != nil {
			return fail(stderr, stErr)
		}
		fmt.Fprintf(stderr, "understudy: stats: exits=%d rss_kib=%d guest_resident_kib=%d\n", st.Exits, st.RSS>>10, st.GuestResident>>10)
	}
	return linuxEnd(res, elapsed, o.quiet, stderr)
}
