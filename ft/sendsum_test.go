package ft

import (
	"bytes"
	"errors"
	"testing"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// TestSendSumsAhead: a checkpoint of many batches, whose sums the sender
// computes ahead of sealing them, arrives whole over a real link, every
// page verified against the sum it was sent with.
func TestSendSumsAhead(t *testing.T) {
	const memSize = 64 << 20
	pc, ic := link(t, memSize)
	var pfns []uint64
	for p := uint64(0); p < 12*batchPages+7; p++ {
		pfns = append(pfns, 3*p)
	}
	cp := testCheckpoint(1, true, pfns...)
	for i := range cp.Data {
		cp.Data[i] ^= byte(i / 5)
	}
	sent := make(chan error, 1)
	go func() { sent <- SendCheckpoint(pc, cp, 0) }()
	m, err := ic.ReadMessage()
	if err != nil {
		t.Fatal(err)
	}
	begin, ok := m.(*wire.CheckpointBegin)
	if !ok {
		t.Fatalf("got %v, want a CheckpointBegin", m)
	}
	got, _, err := ReceiveCheckpoint(ic, begin, memSize/wire.PageSize)
	if err != nil {
		t.Fatalf("ReceiveCheckpoint = %v", err)
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Data, cp.Data) || len(got.Sums) != len(pfns) {
		t.Errorf("received %d pages (%d sums) differ from the %d sent", len(got.PFNs), len(got.Sums), len(pfns))
	}
	for i, s := range got.Sums {
		if s != wire.PageSum(pfns[i], cp.Page(i)) {
			t.Fatalf("page %d arrived with sum %#x, not the page's", i, s)
		}
	}
}

// failAfter is a real link that fails (closes) once it has written n page
// batches.
type failAfter struct {
	transport.Conn
	n int
}

func (f *failAfter) WriteMessage(m wire.Message) error {
	if _, ok := m.(*wire.PageBatch); ok {
		if f.n == 0 {
			f.Conn.Close()
		}
		f.n--
	}
	return f.Conn.WriteMessage(m)
}

// TestSendSumsAheadStops: a send that fails mid-checkpoint returns only
// once the sums computed ahead have stopped reading the pages, which are
// the caller's again (the primary reuses its staging buffer). Under the
// race detector this checks that nothing reads them after (the window,
// a batch being summed as the link fails, is narrow: a run may miss it).
func TestSendSumsAheadStops(t *testing.T) {
	const memSize = 64 << 20
	pc, ic := link(t, memSize)
	go func() {
		for {
			if _, err := ic.ReadMessage(); err != nil {
				return
			}
		}
	}()
	var pfns []uint64
	for p := uint64(0); p < 40*batchPages; p++ {
		pfns = append(pfns, p)
	}
	cp := testCheckpoint(1, true, pfns...)
	err := SendCheckpoint(&failAfter{Conn: pc, n: 3}, cp, 0)
	if err == nil || errors.Is(err, ErrBadCheckpoint) {
		t.Fatalf("SendCheckpoint on a link closed mid-checkpoint = %v, want a write error", err)
	}
	clear(cp.Data) // the caller's again
}
