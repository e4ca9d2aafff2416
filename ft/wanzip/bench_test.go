package wanzip

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

var benchLevel = flag.String("wanzip.level", "", "compression level BenchmarkWANCompress measures (default: DefaultLevel)")

// The benchmark input's parts (see benchInput).
const (
	benchGuestMem = 32 << 20 // the counter guest's memory
	benchExeMax   = 16 << 20 // at most this much of the test binary
	benchRandom   = 4 << 20  // random pages
)

// benchInput returns guest-memory-like pages built from real bytes, in
// ascending PFN order:
//
//   - the whole memory of a counter payload guest (32 MiB) that ran until it
//     had written all of its 2048 counter pages at least once: its code, page
//     tables, written pages and the many pages it never touched, which are zero;
//   - the pages of this test binary's file, up to 16 MiB: x86-64 code, read-only
//     data, symbol and line tables, as a process's mapped executable and page
//     cache would hold them;
//   - 4 MiB of random pages, standing for compressed or encrypted data.
//
// The parts follow one another in PFN order, so most batches hold one kind.
func benchInput(b *testing.B) []wire.Page {
	var recs atomic.Uint64
	m, err := vmm.New(vmm.Config{MemSize: benchGuestMem, Payload: &vmm.PayloadConfig{Name: "counter",
		Options:  map[string]string{"pages": "2048", "hot": "64", "cold_every": "1", "iterations": "0", "report": "0"},
		OnRecord: func(r vmm.Record) { recs.Store(r.Value) }}})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	for deadline := time.Now().Add(20 * time.Second); recs.Load() < 4096; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			cancel()
			<-done
			m.Close()
			b.Fatalf("counter guest stuck at %d records, want 4096", recs.Load())
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		b.Fatalf("counter guest: Run = %v, want Canceled", err)
	}
	raw := slices.Clone(m.Memory().Backing())
	m.Close()

	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	code, err := os.ReadFile(exe)
	if err != nil {
		b.Fatal(err)
	}
	code = code[:min(len(code), benchExeMax)/wire.PageSize*wire.PageSize]
	raw = append(raw, code...)

	rng := rand.New(rand.NewPCG(11, 12))
	for range benchRandom / 8 {
		raw = binary.LittleEndian.AppendUint64(raw, rng.Uint64())
	}
	pages := make([]wire.Page, len(raw)/wire.PageSize)
	for i := range pages {
		pages[i] = wire.Page{PFN: uint64(i), Data: raw[i*wire.PageSize : (i+1)*wire.PageSize : (i+1)*wire.PageSize]}
	}
	return pages
}

// passTime runs pass at least 3 times and until 2 s have gone by (at most
// 25 times), and returns the median duration of one pass.
func passTime(pass func()) time.Duration {
	var d []time.Duration
	for start := time.Now(); len(d) < 3 || (time.Since(start) < 2*time.Second && len(d) < 25); {
		t0 := time.Now()
		pass()
		d = append(d, time.Since(t0))
	}
	slices.Sort(d)
	return d[len(d)/2]
}

// BenchmarkWANCompress measures the codec on benchInput in batches of
// wire.MaxBatchPages, on one goroutine: the compression ratio, encode and
// decode speed in raw MiB/s, and, as the anchor, copying the same pages with
// copy (memcpy) in the same run. It prints one "bench ft-wan-compress:" line
// per run, whatever b.N is; run it with -benchtime 1x.
func BenchmarkWANCompress(b *testing.B) {
	kvmtest.Require(b)
	level := DefaultLevel
	if *benchLevel != "" {
		var err error
		if level, err = ParseLevel(*benchLevel); err != nil {
			b.Fatal(err)
		}
	}
	pages := benchInput(b)
	var batches [][]wire.Page
	for p := pages; len(p) > 0; p = p[min(len(p), wire.MaxBatchPages):] {
		batches = append(batches, p[:min(len(p), wire.MaxBatchPages)])
	}
	enc := mustEncoder(b, level)
	dec := mustDecoder(b)

	encoded := make([][]byte, len(batches))
	var encBytes int
	for i, batch := range batches {
		var err error
		if encoded[i], err = enc.AppendBatch(nil, batch); err != nil {
			b.Fatal(err)
		}
		encBytes += len(encoded[i])
	}
	st := enc.Stats()
	buf := make([]byte, BufSize(wire.MaxBatchPages))
	dst := make([]wire.Page, 0, wire.MaxBatchPages)
	for i, batch := range batches { // the codec must be right before it is fast
		got, err := dec.DecodeBatch(encoded[i], wire.MaxBatchPages, dst, buf)
		if err != nil {
			b.Fatalf("batch %d: DecodeBatch = %v", i, err)
		}
		for j := range batch {
			if got[j].PFN != batch[j].PFN || string(got[j].Data) != string(batch[j].Data) {
				b.Fatalf("batch %d page %d: decoded page differs", i, j)
			}
		}
	}

	b.ResetTimer()
	out := make([]byte, 0, encBytes)
	encT := passTime(func() {
		for _, batch := range batches {
			var err error
			if out, err = enc.AppendBatch(out[:0], batch); err != nil {
				b.Fatal(err)
			}
		}
	})
	decT := passTime(func() {
		for _, e := range encoded {
			if _, err := dec.DecodeBatch(e, wire.MaxBatchPages, dst, buf); err != nil {
				b.Fatal(err)
			}
		}
	})
	copyBuf := make([]byte, wire.MaxBatchPages*wire.PageSize)
	cpyT := passTime(func() {
		for _, batch := range batches {
			for j, p := range batch {
				copy(copyBuf[j*wire.PageSize:], p.Data)
			}
		}
	})
	b.StopTimer()

	rawBytes := float64(len(pages) * wire.PageSize)
	mib := rawBytes / (1 << 20)
	fmt.Printf("bench ft-wan-compress: ratio=%.3f mib_s=%.0f zero_pages_pct=%.1f level=%v input_mib=%.0f decode_mib_s=%.0f memcpy_mib_s=%.0f\n",
		float64(encBytes)/rawBytes, mib/encT.Seconds(), 100*float64(st.ZeroPages)/float64(st.Pages), level, mib,
		mib/decT.Seconds(), mib/cpyT.Seconds())
}
