package ft

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/mmu"
)

// TestManifestRetrieval runs backup-driven retrieval end to end over mTLS
// links: the backup installs "manifest", the intermediary stages nothing
// itself and sends a manifest per epoch, and the backup requests the pages
// that settled (the cold page of each epoch, once it has not changed for
// three epochs), never the hot ones. Syncs still come at the lag bound and
// every image the backup holds is a whole epoch; requested pages shrink
// the syncs; a final sync brings the backup to the last epoch exactly.
func TestManifestRetrieval(t *testing.T) {
	const (
		memSize = 4 << 20
		epochs  = 40
		maxLag  = 10
	)
	in, bk, pc := forwardRig(t, memSize, nil, BackupConfig{
		Policy:  fmt.Sprintf("manifest,max-lag-epochs=%d,max-lag=1h", maxLag),
		Request: &RequestPolicy{Settle: 3, MaxFreq: 1.5},
	})
	waitFor(t, "the policy answer", func() bool { return bk.PolicyState() != "" })
	if s := bk.PolicyState(); !strings.Contains(s, "policy 1 installed") {
		t.Fatalf("PolicyState() = %q, want the manifest policy installed", s)
	}
	ref := NewImage(memSize)
	want := map[uint64][32]byte{}
	for e := uint64(1); e <= epochs; e++ {
		cp := holdBackEpoch(e)
		if err := ref.Apply(cp, e-1, in.PageOffset); err != nil {
			t.Fatal(err)
		}
		ref.Read(func(mem, state []byte, _ uint64) { want[e] = imageHash(mem, state) })
		sendAcked(t, pc, cp, e-1)
		// Let the backup take the manifest in and its requests be served
		// before the next epoch, so that what is requested is still held.
		waitFor(t, "the backup to read the manifests and be answered", func() bool {
			return bk.ret.manifests.Load() == in.manifests.Load() && in.pagesRequested.Load() == bk.ret.requested.Load() &&
				bk.ret.served.Load() == in.pagesServed.Load()
		})
		bk.Image().Read(func(mem, state []byte, epoch uint64) {
			if h, ok := want[epoch]; epoch != 0 && (!ok || h != imageHash(mem, state)) {
				t.Fatalf("after epoch %d the backup holds a partial epoch %d", e, epoch)
			}
		})
	}
	// Every epoch after the seed has one cold page (200+e); it settles three
	// epochs later. The hot pages (10-12) change every epoch and never do.
	waitFor(t, "the settled cold pages to be requested and served", func() bool {
		return in.pagesServed.Load() >= (epochs-1)/2
	}, func() string {
		return fmt.Sprintf("manifests %d/%d, requested %d/%d, served %d/%d; %s", in.manifests.Load(), bk.ret.manifests.Load(),
			bk.ret.requested.Load(), in.pagesRequested.Load(), in.pagesServed.Load(), bk.ret.served.Load(), in.StatusLine())
	})
	if n := in.manifests.Load(); n == 0 || bk.ret.manifests.Load() != n {
		t.Errorf("manifests: %d sent, %d received; want the same, above 0", n, bk.ret.manifests.Load())
	}
	if req, srv := in.pagesRequested.Load(), in.pagesServed.Load(); req > epochs || srv != req {
		t.Errorf("requested %d pages, served %d: want only the %d cold pages asked for, and each served", req, srv, epochs-1)
	}
	if in.requestsRefused.Load() != 0 || bk.ret.refused.Load() != 0 {
		t.Errorf("a request was refused")
	}
	if got := in.stagedOut.Load(); got != in.pagesServed.Load()*mmu.PageSize {
		t.Errorf("staged %d bytes, want exactly the %d pages served (nothing on the intermediary's own initiative)", got, in.pagesServed.Load())
	}
	if err := attachedBackup(in).sync(t.Context(), in, epochs); err != nil {
		t.Fatalf("sync(%d) = %v", epochs, err)
	}
	if got := bk.Committed(); got != epochs || !sameImage(in.Image(), bk.Image()) {
		t.Fatalf("after the final sync the backup is at %d (want %d) or its image differs", got, epochs)
	}
	if line := bk.StatusLine(); !strings.Contains(line, "manifests=") {
		t.Errorf("backup status %q does not show retrieval", line)
	}
}

// rawBackup attaches a stand-in backup (a real mTLS link) to an
// intermediary that has applied a few epochs from a stand-in primary.
func rawBackup(t *testing.T, memSize uint64, policy ForwardPolicy, epochs uint64) (*Intermediary, MessageConn) {
	t.Helper()
	pc, ic := link(t, memSize)
	ib, bi := roleLink(t, memSize, wire.RoleIntermediary, wire.RoleBackup)
	in, err := NewIntermediary(memSize, nil)
	if err != nil {
		t.Fatal(err)
	}
	in.SetForwardPolicy(policy)
	go in.ServePrimary(ic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go in.ServeBackup(ctx, ib)
	waitFor(t, "the intermediary to attach its backup", func() bool { return attachedBackup(in) != nil })
	for e := uint64(1); e <= epochs; e++ {
		sendAcked(t, pc, holdBackEpoch(e), e-1)
	}
	return in, bi
}

// next reads the next message from c that is not a Status, heartbeat or
// manifest, receiving and acknowledging whole checkpoints on the way.
func next(t *testing.T, c MessageConn) wire.Message {
	t.Helper()
	for {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("ReadMessage = %v", err)
		}
		switch m := m.(type) {
		case *wire.Status, *wire.Manifest:
			continue
		case *wire.CheckpointBegin:
			cp, _, err := ReceiveCheckpoint(c, m, wire.MaxPFN)
			if err != nil {
				t.Fatalf("ReceiveCheckpoint = %v", err)
			}
			if err := c.WriteMessage(&wire.Ack{Epoch: cp.Epoch}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		return m
	}
}

// TestPageRequestRefused: a request naming a page outside guest memory is
// refused whole with a reason naming the request and the page, serves
// nothing, and the link stays up: a good request right after is served.
func TestPageRequestRefused(t *testing.T) {
	const memSize = 4 << 20
	// Manifest mode: nothing is staged unasked, so every page batch is an
	// answer.
	in, c := rawBackup(t, memSize, HoldBack{Manifest: true, MaxHeld: 1 << 30, MaxLagEpochs: 1 << 20, MaxLag: time.Hour}, 6)
	held := in.heldBytes.Load()
	if held == 0 {
		t.Fatal("nothing is held back: the hot pages should be")
	}
	top := uint64(memSize / mmu.PageSize)
	for i, pfns := range [][]uint64{{top}, {10, 11, top + 5}, {1 << 30}, {wire.MaxPFN}} {
		id := uint64(100 + i)
		if err := c.WriteMessage(&wire.PageRequest{ID: id, PFNs: pfns}); err != nil {
			t.Fatal(err)
		}
		reply := next(t, c)
		m, ok := reply.(*wire.Error)
		if !ok || m.Code != wire.CodeBadRequest || !strings.Contains(m.Reason, fmt.Sprintf("page request %d refused", id)) ||
			!strings.Contains(m.Reason, "outside guest memory") {
			t.Fatalf("reply to a request for %#x = %T %v, want a bad-request refusal of request %d", pfns, reply, m, id)
		}
	}
	if got := in.heldBytes.Load(); got != held || in.pagesServed.Load() != 0 {
		t.Errorf("refused requests changed what is held (%d -> %d) or served %d pages", held, got, in.pagesServed.Load())
	}
	if n := in.requestsRefused.Load(); n != 4 {
		t.Errorf("refused %d requests, want 4", n)
	}
	// The hot pages 10-12 are held (page 1 has not changed since the seed):
	// a request brings them, staged at the intermediary's epoch, and they
	// are no longer held.
	if err := c.WriteMessage(&wire.PageRequest{ID: 7, PFNs: []uint64{1, 10, 11, 12}}); err != nil {
		t.Fatal(err)
	}
	reply := next(t, c)
	if batch, ok := reply.(*wire.PageBatch); !ok || batch.Epoch != 6 || len(batch.Pages) != 3 || batch.Pages[0].PFN != 10 {
		t.Fatalf("after a good request got %T, want the 3 held pages staged at epoch 6", reply)
	}
	if m, ok := next(t, c).(*wire.Served); !ok || *m != (wire.Served{ID: 7, Epoch: 6, Pages: 3}) {
		t.Fatalf("got %v, want Served{7, 6, 3}", m)
	}
	if got := in.heldBytes.Load(); got != held-3*mmu.PageSize {
		t.Errorf("held %d bytes after serving 3 pages, want %d", got, held-3*mmu.PageSize)
	}
}

// TestBandwidthCap: a policy that stages every page but caps staging at
// 800 KiB/s sends no more than that (plus the burst) ahead of the syncs,
// and uses most of it; the backup still commits only whole epochs.
func TestBandwidthCap(t *testing.T) {
	const (
		memSize = 8 << 20
		rate    = 800 << 10
	)
	in, bk, pc := forwardRig(t, memSize, HoldBack{Threshold: 1e5, MaxHeld: 1 << 30, MaxLagEpochs: 10, MaxLag: time.Hour, Bandwidth: rate}, BackupConfig{})
	sendAcked(t, pc, testCheckpoint(1, true, 0), 0)
	waitFor(t, "the seed", func() bool { return bk.Committed() == 1 })
	start := time.Now()
	for e := uint64(2); e <= 60; e++ {
		// 16 new pages an epoch: 6.4 MiB/s offered at 10 ms epochs.
		var pfns []uint64
		for k := range uint64(16) {
			pfns = append(pfns, 16*e+k)
		}
		sendAcked(t, pc, testCheckpoint(e, false, pfns...), e-1)
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	// The cap's allowance over the time the epochs took; a loaded host
	// stretches that time, and then most of what was offered may fit.
	limit := uint64(rate*elapsed.Seconds()) + rate/10 + 2*mmu.PageSize
	const offered = 59 * 16 * mmu.PageSize
	if got := in.stagedOut.Load(); got > limit || got < min(limit, offered)/3 {
		t.Errorf("staged %d bytes of %d offered in %v under a %d B/s cap: want at most %d and a fair share of it", got, offered, elapsed, rate, limit)
	}
	if err := attachedBackup(in).sync(t.Context(), in, 60); err != nil {
		t.Fatal(err)
	}
	if !sameImage(in.Image(), bk.Image()) {
		t.Errorf("after the sync the backup's image differs")
	}
}

// TestRangesPolicy: with ranges, only pages inside them are staged or
// listed in manifests.
func TestRangesPolicy(t *testing.T) {
	cp := testCheckpoint(5, false, 1, 255, 256, 600, 1024)
	h := HoldBack{Threshold: 10, Ranges: []Range{{0, 1 << 20}, {4 << 20, 5 << 20}}}
	if stage := h.Decide(cp, func(int) float64 { return 0 }).Stage; !reflect.DeepEqual(stage, []int{0, 1, 4}) {
		t.Errorf("Decide staged %v, want the pages in range (indexes 0, 1, 4)", stage)
	}
	hm := h
	hm.Manifest = true
	ms := manifests(cp, func(i int) float64 { return float64(i) }, hm.Decide(cp, nil).Describe)
	if len(ms) != 1 || !reflect.DeepEqual(ms[0].Pages, []wire.ManifestPage{{PFN: 1, Freq: 0}, {PFN: 255, Freq: 256}, {PFN: 1024, Freq: 1024}}) {
		t.Errorf("manifests = %+v, want pages 1, 255 and 1024 with their frequencies", ms)
	}
	if err := h.CheckMemory(8 << 20); err != nil {
		t.Errorf("CheckMemory(8M) = %v", err)
	}
	if err := h.CheckMemory(4 << 20); err == nil || !strings.Contains(err.Error(), "not guest memory") {
		t.Errorf("CheckMemory(4M) with a range at 4M = %v, want a refusal", err)
	}
	big := &Checkpoint{Epoch: 2, PFNs: make([]uint64, wire.MaxManifestPages+1)}
	for i := range big.PFNs {
		big.PFNs[i] = uint64(i)
	}
	if ms := manifests(big, func(int) float64 { return 1 }, HoldBack{Manifest: true}.Decide(big, nil).Describe); len(ms) != 2 || len(ms[1].Pages) != 1 {
		t.Errorf("a manifest of %d pages split into %d", len(big.PFNs), len(ms))
	}
}

// TestRetrieverSelection drives the backup's page selection directly.
func TestRetrieverSelection(t *testing.T) {
	r := newRetriever(RequestPolicy{Settle: 2, MaxFreq: 1.5})
	man := func(e uint64, pages ...wire.ManifestPage) []*wire.PageRequest {
		t.Helper()
		reqs, err := r.manifest(&wire.Manifest{Epoch: e, Pages: pages}, 1024)
		if err != nil {
			t.Fatal(err)
		}
		return reqs
	}
	cold, hot := wire.FreqFixed(1), wire.FreqFixed(3)
	if reqs := man(1, wire.ManifestPage{PFN: 5, Freq: cold}, wire.ManifestPage{PFN: 9, Freq: hot}); reqs != nil {
		t.Fatalf("requested %v before anything settled", reqs)
	}
	if reqs := man(2, wire.ManifestPage{PFN: 9, Freq: hot}); reqs != nil {
		t.Fatalf("requested %v at epoch 2 (settle 2)", reqs)
	}
	reqs := man(3, wire.ManifestPage{PFN: 9, Freq: hot})
	if len(reqs) != 1 || !reflect.DeepEqual(reqs[0].PFNs, []uint64{5}) {
		t.Fatalf("at epoch 3 requested %v, want page 5 alone (9 is hot)", reqs)
	}
	if again := man(4, wire.ManifestPage{PFN: 9, Freq: hot}); again != nil {
		t.Fatalf("asked again for %v while a request is outstanding", again)
	}
	// Served without the page (it had not changed as far as the
	// intermediary knew): it may be asked for again.
	r.done(reqs[0].ID, 0)
	if again := man(5, wire.ManifestPage{PFN: 9, Freq: hot}); len(again) != 1 || again[0].PFNs[0] != 5 {
		t.Fatalf("after an empty Served, requested %v, want page 5 again", again)
	}
	// The page arrives staged: nothing is pending for it any more.
	r.staged(&wire.PageBatch{Epoch: 5, Pages: []wire.Page{{PFN: 5, Data: make([]byte, mmu.PageSize)}}})
	if _, ok := r.pending[5]; ok {
		t.Fatal("page 5 still pending after it was staged")
	}
	// A refusal quoting the request releases its pages.
	man(6, wire.ManifestPage{PFN: 7, Freq: cold})
	reqs = man(8, wire.ManifestPage{PFN: 9, Freq: hot})
	if len(reqs) != 1 {
		t.Fatalf("requested %v at epoch 8, want page 7", reqs)
	}
	r.refusedRequest(fmt.Sprintf("page request %d refused: page 0x7 is outside guest memory", reqs[0].ID))
	if p := r.pending[7]; p.asked || r.refused.Load() != 1 {
		t.Errorf("after a refusal page 7 is %+v, refused=%d", p, r.refused.Load())
	}
	// A commit covers everything up to its epoch.
	r.committed(8)
	if len(r.pending) != 0 {
		t.Errorf("pending after the commit of epoch 8: %v", r.pending)
	}
	// A manifest naming a page beyond guest memory is refused.
	if _, err := r.manifest(&wire.Manifest{Epoch: 9, Pages: []wire.ManifestPage{{PFN: 1024}}}, 1024); !errors.Is(err, ErrBadCheckpoint) {
		t.Errorf("manifest beyond memory = %v, want a refusal", err)
	}
	// The bandwidth cap: 8 pages a tenth of a second's burst at 320 KiB/s.
	r = newRetriever(RequestPolicy{Settle: 0, MaxFreq: 2, Bandwidth: 320 << 10})
	var pages []wire.ManifestPage
	for pfn := range uint64(100) {
		pages = append(pages, wire.ManifestPage{PFN: pfn, Freq: cold})
	}
	if reqs := man(1, pages...); len(reqs) != 1 || len(reqs[0].PFNs) != 8 {
		t.Errorf("with a 320 KiB/s cap the first request has %v pages, want 8", reqs)
	}
}

func TestParseRequestPolicy(t *testing.T) {
	for in, want := range map[string]RequestPolicy{
		"on":                  DefaultRequestPolicy,
		"settle=0":            {Settle: 0, MaxFreq: 1.5},
		"settle=8,max-freq=3": {Settle: 8, MaxFreq: 3},
		"bandwidth=8Mbit":     {Settle: 4, MaxFreq: 1.5, Bandwidth: 1_000_000},
	} {
		if got, err := ParseRequestPolicy(in); err != nil || *got != want {
			t.Errorf("ParseRequestPolicy(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, bad := range []string{"settle", "settle=-1", "settle=x", "max-freq=0", "max-freq=NaN", "bandwidth=0", "speed=1", "settle=99999999"} {
		if _, err := ParseRequestPolicy(bad); err == nil {
			t.Errorf("ParseRequestPolicy(%q) = nil error, want a refusal", bad)
		}
	}
}

func FuzzParseRequestPolicy(f *testing.F) {
	for _, s := range []string{"on", "settle=4,max-freq=1.5", "bandwidth=100Mbit", "bandwidth=1.5gbit", ",", "="} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRequestPolicy(s)
		if err == nil && !(r.MaxFreq > 0) {
			t.Fatalf("ParseRequestPolicy(%q) = %+v: accepted an invalid policy", s, r)
		}
	})
}
