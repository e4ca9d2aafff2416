package largepage

// Sampling: one window of the DAMON or refault sampler, and the guest's own
// view through its page tables (read while the machine is paused).

import (
	"context"
	"errors"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
)

// pickSource starts DAMON if the source asks for it and it can be used.
// DAMON samples every candidate every window: one page per region per
// sampling interval (a tenth of the window), aggregated over half the
// period.
func (lp *Pager) pickSource() error {
	src := lp.cfg.Source
	if src == "" {
		src = SourceAuto
	}
	switch {
	case src == SourceRefault && lp.cfg.NoRevoke:
		return errors.New("source=refault: this guest's devices access guest memory from the VMM, which the refault sampler revokes; use source=damon or source=guest")
	case src == SourceRefault, src == SourceGuest:
		lp.status.Source = src
		return nil
	}
	d, err := mmu.NewDAMON(lp.mem, mmu.DAMONConfig{Sample: max(lp.cfg.Window/10, 100*time.Microsecond), Aggregate: lp.cfg.Period / 2})
	switch {
	case err == nil:
		lp.damon = d
		lp.status.Source = SourceDAMON
		return nil
	case src == SourceDAMON:
		return err
	}
	// Without DAMON: the refault sampler, unless nothing may be revoked.
	lp.status.Source, lp.status.NoDAMON = SourceRefault, err.Error()
	if lp.cfg.NoRevoke {
		lp.status.Source = SourceGuest
	}
	return nil
}

// window runs one sampling window and acts on it. It returns the regions
// the guest maps with 4 KiB pages.
func (lp *Pager) window(ctx context.Context) (blocked map[uint64]bool, changed bool, err error) {
	sample := lp.refaultWindow
	switch {
	case lp.damon != nil:
		sample = lp.damonWindow
	case lp.status.Source == SourceGuest:
		sample = lp.guestWindow
	}
	n, large, ok, err := sample(ctx)
	if err != nil || ctx.Err() != nil {
		return nil, false, err
	}
	blocked, accessed := lp.guestView(true)
	// The guest's own accessed bits are exact where it maps 4 KiB pages.
	for r, a := range accessed {
		if _, sampled := n[r]; sampled && float64(a) > n[r] {
			n[r] = float64(a)
		}
	}
	if lp.status.Source == SourceGuest {
		for r := range large {
			large[r] = accessed[r] > 0
		}
	}
	if ok {
		lp.prio.Observe(n, large)
	}
	return lp.act(blocked)
}

// damonWindow takes DAMON's next aggregation: an estimate for every
// candidate not promoted, and whether each promoted one was touched.
func (lp *Pager) damonWindow(context.Context) (n map[uint64]float64, large map[uint64]bool, ok bool, err error) {
	lp.dropWrites() // DAMON counts under dirty logging too
	c, err := lp.damon.Counts()
	if err != nil {
		return nil, nil, false, err
	}
	n, large = map[uint64]float64{}, map[uint64]bool{}
	for _, r := range lp.cfg.Regions {
		if lp.prio.Promoted(r) {
			large[r] = c[r] > 0
		} else {
			n[r] = c[r]
		}
	}
	return n, large, true, nil
}

// guestWindow is the guest source's window: nothing is sampled on the
// host; every candidate counts what the guest's own accessed bits (4 KiB
// PTEs, read and cleared at the window's pause by guestView) say, so a
// region the guest maps only with large pages or reaches only through
// another address space's tables counts nothing. It waits for nothing: the
// bits gather from one pause to the next. Under fault tolerance the pages
// the checkpoints found written count too (the larger of the two counts
// wins): a Linux guest maps its own kernel's memory large, where its
// accessed bits say nothing per page, and the heat a checkpoint carries to
// the backup should not miss it.
func (lp *Pager) guestWindow(context.Context) (n map[uint64]float64, large map[uint64]bool, ok bool, err error) {
	written := lp.takeWrites()
	if written != nil {
		lp.mu.Lock()
		lp.status.WriteWindows++
		lp.mu.Unlock()
	}
	n, large = map[uint64]float64{}, map[uint64]bool{}
	for _, r := range lp.cfg.Regions {
		if lp.prio.Promoted(r) {
			large[r] = false
		} else {
			n[r] = written[r]
		}
	}
	return n, large, true, nil
}

// refaultWindow samples the promoted regions and the next PerWindow
// candidates with the refault sampler for one window; ok is false for a
// window that does not count.
func (lp *Pager) refaultWindow(ctx context.Context) (n map[uint64]float64, large map[uint64]bool, ok bool, err error) {
	var specs []mmu.SampleSpec
	regions := lp.cfg.Regions
	for _, r := range regions {
		if lp.prio.Promoted(r) {
			specs = append(specs, mmu.SampleSpec{Region: r, Large: true})
		}
	}
	for steps, picked := 0, 0; steps < len(regions) && picked < lp.cfg.PerWindow; steps++ {
		r := regions[lp.cursor%len(regions)]
		lp.cursor++
		if !lp.prio.Promoted(r) {
			specs = append(specs, mmu.SampleSpec{Region: r})
			picked++
		}
	}
	if err := lp.sampler.Arm(specs); errors.Is(err, mmu.ErrLogging) {
		// Protected (fault tolerance): checkpoints copy guest memory, so
		// nothing is revoked, and nothing could be promoted anyway. Wait
		// out the window.
		lp.mu.Lock()
		lp.status.Unsampled++
		lp.mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(lp.cfg.Window):
		}
		// The checkpoints' written pages count instead, where a
		// checkpointer reports them (CheckpointHeat).
		if n := lp.takeWrites(); n != nil {
			lp.mu.Lock()
			lp.status.WriteWindows++
			lp.mu.Unlock()
			return n, nil, true, nil
		}
		return nil, nil, false, nil
	} else if err != nil {
		return nil, nil, false, err
	}
	lp.dropWrites() // logging is off: what checkpoints reported before is stale
	armed := time.Now()
	select {
	case <-ctx.Done():
	case <-time.After(lp.cfg.Window):
	}
	counts, err := lp.sampler.Disarm()
	if err != nil || ctx.Err() != nil {
		return nil, nil, false, err
	}
	if time.Since(armed) > 2*lp.cfg.Window {
		// A loaded host stretched the window: a cold region looks hot
		// after a long one, and a promoted region looks cold if the
		// vCPU did not run in it. Drop it.
		lp.mu.Lock()
		lp.status.Stretched++
		lp.mu.Unlock()
		counts = nil
	}
	n, large = map[uint64]float64{}, map[uint64]bool{}
	for _, c := range counts {
		if c.Large {
			large[c.Region] = c.Accessed > 0
		} else {
			n[c.Region] = c.Estimate()
		}
	}
	return n, large, counts != nil, nil
}

// guestView reads the guest's page tables (through the CR3 of every vCPU,
// sampled while they are paused) and returns the candidate regions the guest
// maps with 4 KiB pages (blocked, on shadow-paging hosts) and the number of
// accessed 4 KiB guest PTEs per region. With clear, the accessed bits it
// counted are cleared, which it does only while the vCPUs are paused. It
// shares the machine's pause with other controllers (a checkpointer): while
// one has the machine paused it waits for that pause to end, up to
// pauseWait, and reads nothing if it does not. With exit-detect it reads
// the same counts from the shadow page tables (shadow.go).
func (lp *Pager) guestView(clear bool) (map[uint64]bool, map[uint64]int) {
	m := lp.m
	if _, err := m.PauseWait(pauseWait); err != nil {
		return nil, nil
	}
	var cr3s []uint64
	for i := range m.NumCPUs() {
		_ = m.OnVCPU(i, func(c *arch.VCPU) error {
			s, err := c.Sregs()
			if err == nil && s.CR0&arch.CR0PG != 0 {
				cr3s = append(cr3s, s.CR3)
			}
			return err
		})
	}
	var acc mmu.RegionAccess
	var err error
	if lp.audit != nil {
		lp.audit.observe(lp.mem, cr3s)
	}
	if lp.spaces != nil {
		acc, err = lp.spaces.count(lp.mem, cr3s, clear)
	} else {
		acc, _, err = lp.mem.CountAccessed(cr3s, clear)
	}
	m.Resume()
	if err != nil {
		return nil, nil
	}
	blocked := map[uint64]bool{}
	if lp.shadow {
		cand := map[uint64]bool{}
		for _, r := range lp.cfg.Regions {
			cand[r] = true
		}
		for r := range acc.Mapped4K {
			if cand[r] {
				blocked[r] = true
			}
		}
	}
	return blocked, acc.Accessed4K
}
