package vmm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/internal/testutil"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/payload"
)

// restoreChildEnv makes the test binary, re-executed by
// TestSnapshotRestoreContinues, restore the snapshot in the directory it
// names and report how the guest ended, instead of running tests.
const restoreChildEnv = "UNDERSTUDY_TEST_RESTORE_CHILD"

func TestMain(m *testing.M) {
	if dir := os.Getenv(restoreChildEnv); dir != "" {
		if err := restoreChild(dir); err != nil {
			fmt.Fprintf(os.Stderr, "restore child: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The counter run of the restore tests.
const (
	proofPages      = 64
	proofIterations = 20000
	proofSaveAfter  = 7000
)

var proofOptions = map[string]string{"pages": "64", "hot": "8", "cold_every": "3", "iterations": "20000", "report": "0"}

// runOutcome is how a counter run ended: what the restore child reports.
type runOutcome struct {
	ExitCode int
	Records  uint64   // Result.Records: all records the machine counted
	Values   []uint64 // the record values this process saw, in order
	Pages    []byte   // the counter pages at the end
	MemSHA   string   // SHA-256 of all guest memory at the end
}

// recordLog collects record values from OnRecord.
type recordLog struct {
	mu   sync.Mutex
	vals []uint64
}

func (l *recordLog) add(r Record) {
	l.mu.Lock()
	l.vals = append(l.vals, r.Value)
	l.mu.Unlock()
}

func (l *recordLog) values() []uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]uint64(nil), l.vals...)
}

// outcome reads the end state of a counter machine.
func outcome(m *Machine, res Result, vals []uint64) (runOutcome, error) {
	o := runOutcome{ExitCode: res.ExitCode, Records: res.Records, Values: vals}
	base, err := m.Memory().Uint64(paramsAddr + payload.ParamDataBase)
	if err != nil {
		return o, err
	}
	p, err := m.Memory().Slice(base, proofPages*mmu.PageSize)
	if err != nil {
		return o, err
	}
	o.Pages = bytes.Clone(p)
	sum := sha256.Sum256(m.Memory().Backing())
	o.MemSHA = hex.EncodeToString(sum[:])
	return o, nil
}

// restoreChild restores dir/snapshot in this fresh process, runs it to the
// end and writes its outcome to dir/outcome.json.
func restoreChild(dir string) error {
	f, err := os.Open(filepath.Join(dir, "snapshot"))
	if err != nil {
		return err
	}
	defer f.Close()
	var log recordLog
	m, err := RestoreSnapshot(RestoreConfig{OnRecord: log.add}, bufio.NewReader(f))
	if err != nil {
		return err
	}
	defer m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := m.Run(ctx)
	if err != nil {
		return err
	}
	o, err := outcome(m, res, log.values())
	if err != nil {
		return err
	}
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "outcome.json"), b, 0o644)
}

// TestSnapshotRestoreContinues is the proof that a captured machine
// continues exactly: counter runs uninterrupted once; then a second run is
// stopped right after record 7000 (RequestPause from OnRecord), captured
// and saved with all its memory; a fresh process restores the snapshot and
// runs it to the end. Its records must be exactly 7001..20000, and its
// counter pages (and all of guest memory) must equal the uninterrupted run's.
func TestSnapshotRestoreContinues(t *testing.T) {
	requireKVM(t)
	for _, cpus := range []int{1, 2} {
		t.Run(fmt.Sprintf("cpus=%d", cpus), func(t *testing.T) { testRestoreContinues(t, cpus) })
	}
}

func testRestoreContinues(t *testing.T, cpus int) {
	cfg := func(onRecord func(Record)) Config {
		return Config{MemSize: 8 << 20, CPUs: cpus, Payload: &PayloadConfig{Name: "counter", Options: proofOptions, OnRecord: onRecord}}
	}

	// The uninterrupted run.
	var refLog recordLog
	refCfg := cfg(refLog.add)
	res, m, err := runMachine(t, refCfg)
	if err != nil || res.ExitCode != 0 || res.Records != proofIterations {
		t.Fatalf("uninterrupted run = %+v, %v; want exit 0 after %d records", res, err, proofIterations)
	}
	ref, err := outcome(m, res, refLog.values())
	if err != nil {
		t.Fatal(err)
	}
	for i, v := range ref.Values {
		if v != uint64(i+1) {
			t.Fatalf("uninterrupted run: record %d = %d, want %d", i, v, i+1)
		}
	}

	// The run that is saved after record proofSaveAfter.
	dir := t.TempDir()
	var saveLog recordLog
	var n atomic.Uint64
	saveReq := make(chan struct{})
	var sm *Machine
	saveCfg := cfg(func(r Record) {
		saveLog.add(r)
		if n.Add(1) == proofSaveAfter {
			sm.RequestPause()
			close(saveReq)
		}
	})
	sm, err = New(saveCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sm.Close()
	done := make(chan error, 1)
	go func() { _, err := sm.Run(context.Background()); done <- err }()
	select {
	case <-saveReq:
	case err := <-done:
		t.Fatalf("Run ended before record %d: %v", proofSaveAfter, err)
	case <-time.After(60 * time.Second):
		t.Fatalf("no record %d after 60 s", proofSaveAfter)
	}
	if _, err := sm.Pause(); err != nil {
		t.Fatalf("Pause() = %v", err)
	}
	f, err := os.Create(filepath.Join(dir, "snapshot"))
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriter(f)
	if err := sm.SaveSnapshot(w); err != nil {
		t.Fatalf("SaveSnapshot() = %v", err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	sm.Stop(0)
	if err := <-done; err != nil {
		t.Fatalf("Run of the saved machine = %v", err)
	}
	if got := saveLog.values(); !reflect.DeepEqual(got, ref.Values[:proofSaveAfter]) {
		t.Fatalf("saved run emitted %d records (last %v), want exactly 1..%d", len(got), got[len(got)-1:], proofSaveAfter)
	}

	// Restore in a fresh process.
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), restoreChildEnv+"="+dir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("restoring in a fresh process: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, "outcome.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got runOutcome
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got.ExitCode != 0 || got.Records != proofIterations {
		t.Errorf("restored run ended with code %d after %d records, want 0 after %d", got.ExitCode, got.Records, proofIterations)
	}
	want := ref.Values[proofSaveAfter:]
	if !reflect.DeepEqual(got.Values, want) {
		first := 0
		for first < len(got.Values) && first < len(want) && got.Values[first] == want[first] {
			first++
		}
		t.Errorf("restored run emitted %d records, want %d..%d; first difference at index %d (%v vs %v)",
			len(got.Values), proofSaveAfter+1, proofIterations, first, got.Values[first:min(first+3, len(got.Values))], want[first:min(first+3, len(want))])
	}
	if !bytes.Equal(got.Pages, ref.Pages) {
		for p := 0; p < proofPages; p++ {
			g, w := got.Pages[p*mmu.PageSize:][:24], ref.Pages[p*mmu.PageSize:][:24]
			if !bytes.Equal(g, w) {
				t.Errorf("counter page %d after restore starts % x, uninterrupted % x", p, g, w)
			}
		}
		t.Errorf("counter pages after restore differ from the uninterrupted run's")
	}
	if got.MemSHA != ref.MemSHA {
		t.Errorf("guest memory after restore has SHA-256 %s, the uninterrupted run's %s", got.MemSHA, ref.MemSHA)
	}
	t.Logf("%d vCPU(s): saved after %d records, restored in a fresh process: records %d..%d, %d counter pages and all %s of memory equal the uninterrupted run's",
		cpus, proofSaveAfter, got.Values[0], got.Values[len(got.Values)-1], proofPages, option.FormatSize(refCfg.MemSize))
}

// endlessCounter returns a counter machine (not running) that emits records
// until stopped, and the last record value it emitted. The test closes it.
func endlessCounter(t *testing.T, mem uint64, cpus int) (*Machine, *atomic.Uint64) {
	t.Helper()
	recs := new(atomic.Uint64)
	m, err := New(Config{MemSize: mem, CPUs: cpus, Payload: &PayloadConfig{Name: "counter",
		Options:  map[string]string{"iterations": "0", "report": "0"},
		OnRecord: func(r Record) { recs.Store(r.Value) }}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m, recs
}

// TestCaptureStateRoundTrip captures a running counter machine's state and
// checks that it survives MarshalBinary/UnmarshalBinary unchanged and holds
// what the machine should.
func TestCaptureStateRoundTrip(t *testing.T) {
	requireKVM(t)
	m, recs := endlessCounter(t, 8<<20, 2)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	defer func() { cancel(); <-done }()
	testutil.WaitFor(t, "100 records", func() bool { return recs.Load() >= 100 })
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	st, err := m.CaptureState()
	if err != nil {
		t.Fatalf("CaptureState() = %v", err)
	}
	b, err := st.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary() = %v", err)
	}
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatalf("UnmarshalBinary(MarshalBinary()) = %v", err)
	}
	if !reflect.DeepEqual(&got, st) {
		t.Errorf("UnmarshalBinary(MarshalBinary(st)) differs from st")
	}

	// What the state must hold.
	if st.Config.MemSize != 8<<20 || st.Config.CPUs != 2 || st.Config.Payload != "counter" || !reflect.DeepEqual(st.Config.Regions, m.Memory().Regions()) {
		t.Errorf("state config = %+v, want 8 MiB, 2 vCPUs, counter and the machine's regions", st.Config)
	}
	if r := st.Devices.DebugPort.Records; r != recs.Load() {
		t.Errorf("state says %d records were emitted, the last record was %d", r, recs.Load())
	}
	msrs := map[uint32]bool{}
	for _, e := range st.VCPUs[0].MSRs {
		msrs[e.Index] = true
	}
	for _, idx := range []uint32{msrTSC, msrSysenterCS, msrSysenterESP, msrSysenterEIP, msrSTAR, msrLSTAR, msrCSTAR, msrSFMASK, msrKernelGSBase, msrPAT} {
		if !msrs[idx] {
			t.Errorf("state lacks MSR %#x", idx)
		}
	}
	for i, v := range st.VCPUs {
		if v.Regs.RIP < payloadBase || v.Regs.RIP >= payloadBase+4096 || v.Sregs.CR3 != pageTablesAddr || v.Sregs.CS.DPL != 3 {
			t.Errorf("vCPU %d: RIP %#x, CR3 %#x, CS.DPL %d; want RIP in the payload, CR3 %#x, CPL3", i, v.Regs.RIP, v.Sregs.CR3, v.Sregs.CS.DPL, pageTablesAddr)
		}
		if len(v.XSave) < xsaveLegacySize || len(v.CPUID) == 0 || v.TSCKHz == 0 || v.LAPIC.Regs[0x23] != byte(i) {
			t.Errorf("vCPU %d: xsave %d bytes, %d CPUID entries, TSC %d kHz, APIC id %d; want a full state", i, len(v.XSave), len(v.CPUID), v.TSCKHz, v.LAPIC.Regs[0x23])
		}
	}
	t.Logf("state: %d bytes for 2 vCPUs; %d MSRs saved per vCPU; unreadable MSRs dropped: %#x", len(b), len(st.VCPUs[0].MSRs), m.msrs.Load().dropped)
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
}

func TestCaptureStateNotPaused(t *testing.T) {
	requireKVM(t)
	m, recs := endlessCounter(t, 4<<20, 1)
	if _, err := m.CaptureState(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("CaptureState() before Run = %v, want ErrNotPaused", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	defer func() { cancel(); <-done }()
	testutil.WaitFor(t, "10 records", func() bool { return recs.Load() >= 10 })
	if st, err := m.CaptureState(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("CaptureState() while running = %v, %v; want ErrNotPaused", st, err)
	}
	if err := m.SaveSnapshot(&bytes.Buffer{}); !errors.Is(err, ErrNotPaused) {
		t.Errorf("SaveSnapshot() while running = %v, want ErrNotPaused", err)
	}
	// A requested but not completed pause does not count as paused.
	m.RequestPause()
	if _, err := m.CaptureState(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("CaptureState() after RequestPause = %v, want ErrNotPaused", err)
	}
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.CaptureState(); err != nil {
		t.Errorf("CaptureState() after Pause = %v", err)
	}
	if _, err := m.Resume(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.CaptureState(); !errors.Is(err, ErrNotPaused) {
		t.Errorf("CaptureState() after Resume = %v, want ErrNotPaused", err)
	}
}

// TestRequestPause stops the guest from OnRecord at an exact record and
// checks that no record follows until Resume.
func TestRequestPause(t *testing.T) {
	requireKVM(t)
	var last atomic.Uint64
	var m *Machine
	reached := make(chan struct{})
	m, err := New(Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "counter",
		Options: map[string]string{"iterations": "1000", "report": "0"},
		OnRecord: func(r Record) {
			last.Store(r.Value)
			if r.Value == 500 {
				m.RequestPause()
				m.RequestPause() // a second request while one is under way does nothing
				close(reached)
			}
		}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := make(chan Result, 1)
	go func() { res, _ := m.Run(context.Background()); done <- res }()
	<-reached
	if _, err := m.Pause(); err != nil {
		t.Fatalf("Pause() after RequestPause = %v", err)
	}
	time.Sleep(20 * time.Millisecond)
	if got := last.Load(); got != 500 {
		t.Errorf("last record while paused = %d, want 500", got)
	}
	if _, err := m.Resume(); err != nil {
		t.Fatalf("Resume() = %v", err)
	}
	if res := <-done; res.ExitCode != 0 || res.Records != 1000 {
		t.Errorf("Run() = %+v, want exit 0 after 1000 records", res)
	}
}

func TestRestoreRejects(t *testing.T) {
	st := testState(1)
	noKVM := RestoreConfig{KVMDevice: filepath.Join(t.TempDir(), "absent-kvm")}
	small, err := mmu.New(mmu.Config{Size: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := RestoreMemory(noKVM, st, small); err == nil || !strings.Contains(err.Error(), "guest memory of 4 MiB given, the state needs 8 MiB") {
		t.Errorf("RestoreMemory(8 MiB state, 4 MiB memory) = %v, want a size mismatch", err)
	}
	bad := testState(2)
	bad.VCPUs = bad.VCPUs[:1]
	if _, err := Restore(noKVM, bad, bytes.NewReader(nil)); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), "1 vCPU states for 2 vCPUs") {
		t.Errorf("Restore(state with 1 of 2 vCPUs) = %v, want ErrBadState", err)
	}
	if _, err := Restore(noKVM, nil, bytes.NewReader(nil)); err == nil || !strings.Contains(err.Error(), "no machine state") {
		t.Errorf("Restore(nil state) = %v, want an error", err)
	}
	if _, err := Restore(noKVM, testState(1), nil); err == nil || !strings.Contains(err.Error(), "no memory image") {
		t.Errorf("Restore(nil image) = %v, want an error", err)
	}

	requireKVM(t)
	image := make([]byte, 8<<20)
	tests := []struct {
		name  string
		st    *MachineState
		image []byte
		want  string
	}{
		{"image short", st, image[:1<<20], "memory image ends after 1048576 of 8388608 bytes"},
		{"image long", st, append(bytes.Clone(image), 0), "memory image is longer than the state's 8 MiB"},
		{"layout", func() *MachineState {
			s := testState(1)
			s.Config.DataSize = 0
			s.Config.Regions = []mmu.Region{{Size: 4 << 20}, {GPA: 1 << 32, Size: 4 << 20, Offset: 4 << 20, Slot: 1}}
			return s
		}(), image, "memory layout"},
	}
	for _, tc := range tests {
		m, err := Restore(RestoreConfig{}, tc.st, bytes.NewReader(tc.image))
		if err == nil {
			m.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Restore() = %v, want %q", tc.name, err, tc.want)
		}
	}
}

// TestRestoreMemory restores a state with guest RAM that already holds the
// image, without going through a snapshot.
func TestRestoreMemory(t *testing.T) {
	requireKVM(t)
	st, mem := counterAt1000(t)
	restoreCounter(t, RestoreConfig{}, st, mem)
}

// TestRestoreOtherTSCRate restores a state captured at a TSC rate this
// host does not run (half of it, as from another host): the machine must
// come up and continue, with the rate either scaled to the state's or left
// at this host's with a warning, as QEMU's incoming migration does.
func TestRestoreOtherTSCRate(t *testing.T) {
	requireKVM(t)
	st, mem := counterAt1000(t)
	host := st.VCPUs[0].TSCKHz
	for i := range st.VCPUs {
		st.VCPUs[i].TSCKHz = host / 2
	}
	var logged bytes.Buffer
	var mu sync.Mutex
	log := slog.New(slog.NewTextHandler(lockedWriter{&mu, &logged}, nil))
	r := restoreCounter(t, RestoreConfig{Logger: log}, st, mem)
	var khz uint32
	if err := r.OnVCPU(0, func(c *arch.VCPU) (err error) { khz, err = c.TSCKHz(); return err }); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	warned := strings.Contains(logged.String(), "TSC frequency differs and cannot be scaled")
	if khz != host/2 && !warned {
		t.Errorf("restored vCPU's TSC runs at %d kHz, the state's %d kHz, and nothing was logged; want the state's rate or a warning", khz, host/2)
	}
	t.Logf("host %d kHz, state %d kHz, restored %d kHz, warned %v", host, host/2, khz, warned)
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// counterAt1000 runs the counter payload to its 1000th of 3000 records and
// returns its state and a copy of its memory.
func counterAt1000(t *testing.T) (*MachineState, *mmu.Memory) {
	t.Helper()
	var recs atomic.Uint64
	var m *Machine // set before Run starts, so before OnRecord runs
	m, err := New(Config{MemSize: 4 << 20, Payload: &PayloadConfig{Name: "counter",
		Options: map[string]string{"iterations": "3000", "report": "0"},
		OnRecord: func(r Record) {
			if recs.Add(1) == 1000 {
				m.RequestPause()
			}
		}}})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	testutil.WaitFor(t, "record 1000", func() bool { return recs.Load() >= 1000 })
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	st, err := m.CaptureState()
	if err != nil {
		t.Fatal(err)
	}
	mem, err := mmu.New(mmu.Config{Size: m.Memory().Size(), Backing: mmu.Memfd})
	if err != nil {
		t.Fatal(err)
	}
	copy(mem.Backing(), m.Memory().Backing())
	m.Stop(0)
	<-done
	return st, mem
}

// restoreCounter restores counterAt1000's state and checks that the guest
// continues from record 1001 to 3000 and exits 0.
func restoreCounter(t *testing.T, cfg RestoreConfig, st *MachineState, mem *mmu.Memory) *Machine {
	t.Helper()
	var last atomic.Uint64
	var first atomic.Uint64
	cfg.OnRecord = func(r Record) {
		first.CompareAndSwap(0, r.Value)
		last.Store(r.Value)
	}
	r, err := RestoreMemory(cfg, st, mem)
	if err != nil {
		t.Fatalf("RestoreMemory() = %v", err)
	}
	t.Cleanup(func() { r.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := r.Run(ctx)
	if err != nil || res.ExitCode != 0 || res.Records != 3000 || first.Load() != 1001 || last.Load() != 3000 {
		t.Errorf("restored Run() = %+v, %v, records %d..%d; want exit 0 after 3000 records, 1001..3000", res, err, first.Load(), last.Load())
	}
	return r
}

// TestRestoreKeepsKVMState sets distinctive values in the parts of KVM's
// state a payload guest does not touch (debug registers, an MSR, the PIT,
// kvmclock), captures, restores into a new machine, and reads them back
// from KVM there: restore must have put each one into KVM.
func TestRestoreKeepsKVMState(t *testing.T) {
	requireKVM(t)
	m, recs := endlessCounter(t, 4<<20, 1)
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	testutil.WaitFor(t, "100 records", func() bool { return recs.Load() >= 100 })
	if _, err := m.Pause(); err != nil {
		t.Fatal(err)
	}
	const (
		lstar = 0xffff800012345000
		clock = 1000 * uint64(time.Second) // kvmclock at 1000 s
	)
	dbs := [4]uint64{0x1000, 0x2000, 0x3000, 0x4000} // DR7 stays 0: no breakpoint armed
	err := m.OnVCPU(0, func(c *arch.VCPU) error {
		d, err := c.DebugRegs()
		if err != nil {
			return err
		}
		d.DB = dbs
		if err := c.SetDebugRegs(d); err != nil {
			return err
		}
		return c.SetMSRs([]arch.MSREntry{{Index: msrLSTAR, Data: lstar}})
	})
	if err != nil {
		t.Fatal(err)
	}
	pit, err := m.VM().PIT2()
	if err != nil {
		t.Fatal(err)
	}
	pit.Channels[0].Count, pit.Channels[0].Mode, pit.Channels[0].RWMode = 0x1234, 2, 3
	if err := m.VM().SetPIT2(pit); err != nil {
		t.Fatal(err)
	}
	if err := m.VM().SetClock(arch.ClockData{Clock: clock}); err != nil {
		t.Fatal(err)
	}
	st, err := m.CaptureState()
	if err != nil {
		t.Fatal(err)
	}
	captured := time.Now()
	mem, err := mmu.New(mmu.Config{Size: m.Memory().Size()})
	if err != nil {
		t.Fatal(err)
	}
	copy(mem.Backing(), m.Memory().Backing())
	m.Stop(0)
	<-done

	var r *Machine
	var restored atomic.Uint64
	r, err = RestoreMemory(RestoreConfig{OnRecord: func(Record) {
		if restored.Add(1) == 1 {
			r.RequestPause()
		}
	}}, st, mem)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	rdone := make(chan error, 1)
	go func() { _, err := r.Run(context.Background()); rdone <- err }()
	defer func() { r.Stop(0); <-rdone }()
	testutil.WaitFor(t, "a record from the restored guest", func() bool { return restored.Load() >= 1 })
	if _, err := r.Pause(); err != nil {
		t.Fatal(err)
	}
	var (
		d    arch.DebugRegs
		msrs []arch.MSREntry
	)
	err = r.OnVCPU(0, func(c *arch.VCPU) (err error) {
		if d, err = c.DebugRegs(); err != nil {
			return err
		}
		msrs, err = c.MSRs([]uint32{msrLSTAR})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if d.DB != dbs {
		t.Errorf("restored DR0..DR3 = %#x, want %#x", d.DB, dbs)
	}
	if len(msrs) != 1 || msrs[0].Data != lstar {
		t.Errorf("restored LSTAR = %+v, want %#x", msrs, uint64(lstar))
	}
	rpit, err := r.VM().PIT2()
	if err != nil {
		t.Fatal(err)
	}
	if c := rpit.Channels[0]; c.Count != 0x1234 || c.Mode != 2 || c.RWMode != 3 {
		t.Errorf("restored PIT channel 0: count %#x mode %d rw %d, want 0x1234, 2, 3", c.Count, c.Mode, c.RWMode)
	}
	rclock, err := r.VM().Clock()
	if err != nil {
		t.Fatal(err)
	}
	// kvmclock goes on from where it was captured, not from the new VM's
	// start: at least the captured value, at most that plus the time since.
	if elapsed := uint64(time.Since(captured)); rclock.Clock < clock || rclock.Clock > clock+elapsed+uint64(time.Second) {
		t.Errorf("restored kvmclock = %d ns, want %d..%d (captured at %d)", rclock.Clock, clock, clock+elapsed, clock)
	}
}
