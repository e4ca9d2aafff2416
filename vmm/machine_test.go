package vmm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/internal/testutil"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/payload"
)

var requireKVM = kvmtest.Require

// runMachine builds and runs cfg to completion with a timeout.
func runMachine(t *testing.T, cfg Config) (Result, *Machine, error) {
	t.Helper()
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v) = %v", cfg, err)
	}
	t.Cleanup(func() { m.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := m.Run(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run did not finish in 60 s")
	}
	return res, m, err
}

func TestHello(t *testing.T) {
	requireKVM(t)
	for _, cpus := range []int{1, 3} {
		var out testutil.Buffer
		res, _, err := runMachine(t, Config{MemSize: 16 << 20, CPUs: cpus, Console: &out, Payload: &PayloadConfig{Name: "hello"}})
		if err != nil {
			t.Fatalf("hello with %d vCPUs: Run = %v", cpus, err)
		}
		want := "Hello from the Understudy payload guest! vCPUs: " + string(rune('0'+cpus)) + "\n"
		if out.String() != want || res.ExitCode != 0 {
			t.Errorf("hello with %d vCPUs: console %q, exit %d; want %q, 0", cpus, out.String(), res.ExitCode, want)
		}
	}
}

func TestCounter(t *testing.T) {
	requireKVM(t)
	const iters, pages, hot, coldEvery = 3000, 32, 4, 10
	var (
		mu   sync.Mutex
		recs []uint64
	)
	var out testutil.Buffer
	res, m, err := runMachine(t, Config{MemSize: 16 << 20, Console: &out, Payload: &PayloadConfig{Name: "counter",
		Options: map[string]string{"pages": "32", "hot": "4", "cold_every": "10", "iterations": "3000", "report": "1000"},
		OnRecord: func(r Record) {
			mu.Lock()
			recs = append(recs, r.Value)
			mu.Unlock()
		}},
	})
	if err != nil {
		t.Fatalf("Run = %v", err)
	}
	if res.ExitCode != 0 || res.Records != iters || len(recs) != iters {
		t.Fatalf("exit %d, %d records (%d seen), want 0, %d", res.ExitCode, res.Records, len(recs), iters)
	}
	for i, r := range recs {
		if r != uint64(i+1) {
			t.Fatalf("record %d = %d, want %d", i, r, i+1)
		}
	}
	for _, line := range []string{"counter: iteration 1000\n", "counter: iteration 3000\n", "counter: done after 3000\n"} {
		if !strings.Contains(out.String(), line) {
			t.Errorf("console %q lacks %q", out.String(), line)
		}
	}
	// Check the counter pages against the payload's documented pattern.
	base := dataBase(t, m)
	const ncold = pages - hot
	writes := uint64(iters / coldEvery) // cold writes happened at iterations 10, 20, ...
	for p := uint64(0); p < pages; p++ {
		var want uint64
		if p < hot {
			want = iters
		} else {
			// Cold page k was last written by cold write number w with w%ncold == k.
			k := p - hot
			for w := uint64(0); w < writes; w++ {
				if w%ncold == k {
					want = (w + 1) * coldEvery
				}
			}
		}
		seq := mustU64(t, m, base+p*4096)
		if seq != want {
			t.Errorf("page %d: seq %d, want %d", p, seq, want)
		}
		if want != 0 {
			if idx, inv := mustU64(t, m, base+p*4096+8), mustU64(t, m, base+p*4096+16); idx != p || inv != ^want {
				t.Errorf("page %d: index %d, check %#x; want %d, %#x", p, idx, inv, p, ^want)
			}
		}
	}
}

func dataBase(t *testing.T, m *Machine) uint64 {
	t.Helper()
	return mustU64(t, m, paramsAddr+payload.ParamDataBase)
}

func mustU64(t *testing.T, m *Machine, gpa uint64) uint64 {
	t.Helper()
	v, err := m.Memory().Uint64(gpa)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestTouch(t *testing.T) {
	requireKVM(t)
	var marks, records atomic.Int32
	res, m, err := runMachine(t, Config{MemSize: 64 << 20, Payload: &PayloadConfig{Name: "touch",
		Options:  map[string]string{"regions": "8", "hot": "2", "accesses": "20000", "rounds": "3"},
		OnMark:   func(cpu int, phase uint32) { marks.Add(1) },
		OnRecord: func(Record) { records.Add(1) }},
	})
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	if marks.Load() != 1 || records.Load() != 3 {
		t.Errorf("marks %d, records %d; want 1, 3", marks.Load(), records.Load())
	}
	// Phase 0 wrote every page of the working set with its own address.
	base := dataBase(t, m)
	for p := uint64(0); p < 8*512; p += 97 {
		if got := mustU64(t, m, base+p*4096); got != base+p*4096 {
			t.Fatalf("page %d holds %#x, want %#x", p, got, base+p*4096)
		}
	}
	// The page after the working set was not touched.
	if got := mustU64(t, m, base+8*mmu.RegionSize); got != 0 {
		t.Errorf("page past the working set holds %#x, want 0", got)
	}
}

func TestPIO(t *testing.T) {
	requireKVM(t)
	var last atomic.Uint64
	res, m, err := runMachine(t, Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "pio", Options: map[string]string{"count": "500"},
		OnRecord: func(r Record) { last.Store(r.Value) }}})
	if err != nil || res.ExitCode != 0 || res.Records != 500 || last.Load() != 500 {
		t.Fatalf("Run = %+v, %v, last record %d; want 500 records ending in 500", res, err, last.Load())
	}
	if n := m.Exits(0); n < 501 {
		t.Errorf("Exits(0) = %d, want at least 501", n)
	}
}

func TestGuestFault(t *testing.T) {
	requireKVM(t)
	_, _, err := runMachine(t, Config{MemSize: 8 << 20, Payload: &PayloadConfig{Name: "fault"}})
	var ee *ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("Run = %v, want an *ExitError", err)
	}
	msg := err.Error()
	for _, sub := range []string{"KVM_EXIT_SHUTDOWN", "triple fault", "#PF page fault", "CR2 0x800000", "RIP 0x1000", "mov qword ptr [rax], 0x1"} {
		if !strings.Contains(msg, sub) {
			t.Errorf("error %q lacks %q", msg, sub)
		}
	}
	if ee.RIP < payloadBase || ee.CPU != 0 {
		t.Errorf("ExitError RIP %#x CPU %d, want RIP inside the payload on vCPU 0", ee.RIP, ee.CPU)
	}
}

func TestPayloadFile(t *testing.T) {
	requireKVM(t)
	dir := t.TempDir()
	// A payload file: "mov eax, 7; mov dx, 0x504; out dx, eax".
	prog := []byte{0xb8, 7, 0, 0, 0, 0x66, 0xba, 0x04, 0x05, 0xef}
	path := filepath.Join(dir, "seven.bin")
	if err := os.WriteFile(path, prog, 0o644); err != nil {
		t.Fatal(err)
	}
	res, _, err := runMachine(t, Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: path}})
	if err != nil || res.ExitCode != 7 {
		t.Fatalf("Run(%s) = %+v, %v; want exit code 7", path, res, err)
	}
}

func TestBadConfig(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big.bin")
	if err := os.WriteFile(big, make([]byte, 3<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty.bin")
	if err := os.WriteFile(empty, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		cfg    Config
		errSub string
		noKVM  bool // error must come before KVM is opened
	}{
		{"no kvm device", Config{KVMDevice: filepath.Join(dir, "kvm"), MemSize: 4 << 20, Payload: &PayloadConfig{Name: "hello"}}, "does not exist", false},
		{"unknown payload", Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "nope"}}, `unknown payload "nope"`, true},
		{"no payload", Config{MemSize: 4 << 20}, "no payload given", true},
		{"memory too small", Config{MemSize: 1 << 20, Payload: &PayloadConfig{Name: "hello"}}, "too small", true},
		{"memory not 2 MiB multiple", Config{MemSize: 5 << 20, Payload: &PayloadConfig{Name: "hello"}}, "multiple of 2 MiB", true},
		{"too many vCPUs", Config{MemSize: 4 << 20, CPUs: MaxCPUs + 1, Payload: &PayloadConfig{Name: "hello"}}, "vCPUs: want 1..", true},
		{"negative vCPUs", Config{MemSize: 4 << 20, CPUs: -1, Payload: &PayloadConfig{Name: "hello"}}, "vCPUs: want 1..", true},
		{"payload larger than memory", Config{MemSize: 2 << 20, Payload: &PayloadConfig{Name: big}}, "does not fit", true},
		{"empty payload file", Config{MemSize: 2 << 20, Payload: &PayloadConfig{Name: empty}}, "is empty", true},
		{"missing payload file", Config{MemSize: 2 << 20, Payload: &PayloadConfig{Name: filepath.Join(dir, "none.bin")}}, "no such file", true},
		{"options for a file", Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: empty, Options: map[string]string{"a": "1"}}}, "", true},
		{"bad payload option", Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "counter", Options: map[string]string{"pages": "x"}}}, "not a non-negative integer", true},
		{"data too small", Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "counter", Options: map[string]string{"pages": "100000"}}}, "raise --mem", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if tc.noKVM {
				// Point at a device that does not exist: the error must be
				// about the configuration, found before KVM is touched.
				cfg.KVMDevice = filepath.Join(dir, "absent-kvm")
			}
			m, err := New(cfg)
			if err == nil {
				m.Close()
				t.Fatalf("New(%+v) succeeded, want an error", cfg)
			}
			if tc.errSub != "" && !strings.Contains(err.Error(), tc.errSub) {
				t.Errorf("New() = %q, want it to contain %q", err, tc.errSub)
			}
			if tc.noKVM && errors.Is(err, arch.ErrNoKVM) {
				t.Errorf("New() = %q: configuration error reported as missing KVM", err)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Errorf("New() = %q: want one line", err)
			}
		})
	}
	if _, err := New(Config{KVMDevice: filepath.Join(dir, "kvm"), MemSize: 4 << 20, Payload: &PayloadConfig{Name: "hello"}}); !errors.Is(err, arch.ErrNoKVM) {
		t.Errorf("New with a missing device = %v, want ErrNoKVM", err)
	}
}

func TestContextCancel(t *testing.T) {
	requireKVM(t)
	m, err := New(Config{MemSize: 8 << 20, Payload: &PayloadConfig{Name: "counter", Options: map[string]string{"iterations": "0", "report": "0"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	res, err := m.Run(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %+v, %v; want DeadlineExceeded", res, err)
	}
	if res.Records == 0 {
		t.Errorf("no records before the deadline")
	}
	if _, err := m.Run(context.Background()); err == nil {
		t.Errorf("second Run succeeded, want an error")
	}
}

// counterMachine makes a 2-vCPU machine running the counter payload
// forever (not started); recs holds its latest record's value. The test's
// cleanup closes it.
func counterMachine(t *testing.T) (*Machine, *atomic.Uint64) {
	t.Helper()
	recs := new(atomic.Uint64)
	m, err := New(Config{MemSize: 8 << 20, CPUs: 2, Payload: &PayloadConfig{Name: "counter",
		Options:  map[string]string{"iterations": "0", "report": "0"},
		OnRecord: func(r Record) { recs.Store(r.Value) }}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, recs
}

// TestPauseResume pauses a running two-vCPU machine many times and checks
// that no record appears while it is paused, that OnVCPU runs on a parked
// vCPU, and that the guest continues afterwards.
func TestPauseResume(t *testing.T) {
	requireKVM(t)
	m, recs := counterMachine(t)
	if _, err := m.Resume(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("Resume before Pause = %v, want ErrNotPaused", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()

	waitRecords := func(min uint64) {
		deadline := time.Now().Add(20 * time.Second)
		for recs.Load() < min {
			if time.Now().After(deadline) {
				t.Fatalf("records stuck at %d, want %d", recs.Load(), min)
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitRecords(10)
	for i := 0; i < 50; i++ {
		d, err := m.Pause()
		if err != nil {
			t.Fatalf("Pause %d: %v", i, err)
		}
		if d <= 0 {
			t.Errorf("Pause %d took %v", i, d)
		}
		if _, err := m.Pause(); !errors.Is(err, ErrPaused) {
			t.Errorf("second Pause = %v, want ErrPaused", err)
		}
		before := recs.Load()
		for c := 0; c < 2; c++ {
			var rip uint64
			if err := m.OnVCPU(c, func(v *arch.VCPU) error {
				r, err := v.Regs()
				rip = r.RIP
				return err
			}); err != nil {
				t.Fatalf("OnVCPU(%d): %v", c, err)
			}
			if rip < payloadBase || rip > payloadBase+4096 {
				t.Errorf("vCPU %d paused at RIP %#x, outside the payload", c, rip)
			}
		}
		if i%10 == 0 {
			time.Sleep(20 * time.Millisecond)
		}
		if after := recs.Load(); after != before {
			t.Fatalf("records went from %d to %d while paused", before, after)
		}
		if _, err := m.Resume(); err != nil {
			t.Fatalf("Resume %d: %v", i, err)
		}
		waitRecords(before + 1)
	}
	if err := m.OnVCPU(0, func(*arch.VCPU) error { return nil }); !errors.Is(err, ErrNotPaused) {
		t.Errorf("OnVCPU while running = %v, want ErrNotPaused", err)
	}
	// Stop while paused must not hang.
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want Canceled", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel while paused")
	}
	if _, err := m.Pause(); !errors.Is(err, ErrStopped) {
		t.Errorf("Pause after stop = %v, want ErrStopped", err)
	}
}

func TestVMMWritesAreDirty(t *testing.T) {
	requireKVM(t)
	m, err := New(Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "hello"}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	// Loading the payload wrote the GDT, TSS, params, page tables and image:
	// all of them must be in the VMM dirty bitmap.
	bm := make([]uint64, (m.Memory().Size()/4096+63)/64)
	if _, err := m.Memory().TakeVMMDirty(bm); err != nil {
		t.Fatal(err)
	}
	for _, gpa := range []uint64{gdtAddr, paramsAddr, tssAddr, pageTablesAddr, payloadBase} {
		if p := gpa / 4096; bm[p/64]&(1<<(p%64)) == 0 {
			t.Errorf("page at %#x not marked dirty after loading", gpa)
		}
	}
}

// TestResumeWithImmediateExitSet: a pause's kick can set a vCPU's
// immediate_exit after the vCPU has parked (it saw the pause before the
// kick came). Resume must still let the guest run: the vCPU clears the flag
// after the KVM_RUN it cut short, instead of returning EINTR forever. The
// late kick is played here by setting the flag on each parked vCPU.
func TestResumeWithImmediateExitSet(t *testing.T) {
	requireKVM(t)
	m, recs := counterMachine(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	defer func() { cancel(); <-done }()
	testutil.WaitFor(t, "the first records", func() bool { return recs.Load() >= 10 })
	for round := 0; round < 3; round++ {
		if _, err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		for c := 0; c < 2; c++ {
			if err := m.OnVCPU(c, func(v *arch.VCPU) error { v.SetImmediateExit(true); return nil }); err != nil {
				t.Fatal(err)
			}
		}
		before := recs.Load()
		if _, err := m.Resume(); err != nil {
			t.Fatal(err)
		}
		testutil.WaitFor(t, "records after a resume with immediate_exit set", func() bool { return recs.Load() > before+5 })
	}
}
