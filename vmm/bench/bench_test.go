package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/arch/kvmtest"

	"github.com/understudy-vmm/understudy/vmm"
	"golang.org/x/sys/unix"
)

var requireKVM = kvmtest.Require

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 3, 64) }
func us(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e3, 'f', 1, 64) }

// firstByte records when the first console byte arrives.
type firstByte struct {
	once sync.Once
	at   time.Time
}

func (f *firstByte) Write(p []byte) (int, error) {
	f.once.Do(func() { f.at = time.Now() })
	return len(p), nil
}

// BenchmarkVMStart: from vmm.New to the guest's first console byte, median
// of 20 runs of the hello payload (64 MiB, 1 vCPU). Anchor: starting and
// reaping /bin/true.
func BenchmarkVMStart(b *testing.B) {
	requireKVM(b)
	const runs = 20
	var starts, spawns []time.Duration
	for i := 0; i < runs; i++ {
		fb := &firstByte{}
		t0 := time.Now()
		m, err := vmm.New(vmm.Config{MemSize: 64 << 20, Console: fb, Payload: &vmm.PayloadConfig{Name: "hello"}})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.Run(context.Background()); err != nil {
			b.Fatal(err)
		}
		m.Close()
		starts = append(starts, fb.at.Sub(t0))

		t1 := time.Now()
		if err := exec.Command("/bin/true").Run(); err != nil {
			b.Fatal(err)
		}
		spawns = append(spawns, time.Since(t1))
	}
	fmt.Printf("bench vm-start: create_to_first_output_ms=%s runs=%d process_spawn_ms=%s ratio=%.2f\n",
		ms(median(starts)), runs, ms(median(spawns)), float64(median(starts))/float64(median(spawns)))
}

// BenchmarkExitRoundTrip: the pio payload emits 100k records, one port-I/O
// exit each; the time between consecutive records is one full round trip
// guest → KVM → VMM → guest. Anchor: a getppid system call.
func BenchmarkExitRoundTrip(b *testing.B) {
	requireKVM(b)
	const n = 100000
	stamps := make([]time.Time, 0, n)
	m, err := vmm.New(vmm.Config{MemSize: 4 << 20, Payload: &vmm.PayloadConfig{Name: "pio", Options: map[string]string{"count": strconv.Itoa(n)},
		OnRecord: func(vmm.Record) { stamps = append(stamps, time.Now()) }}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	if _, err := m.Run(context.Background()); err != nil {
		b.Fatal(err)
	}
	if len(stamps) != n {
		b.Fatalf("%d records, want %d", len(stamps), n)
	}
	deltas := make([]time.Duration, 0, n-1)
	for i := 1; i < n; i++ {
		deltas = append(deltas, stamps[i].Sub(stamps[i-1]))
	}
	sys := make([]time.Duration, 0, 1000)
	for i := 0; i < 1000; i++ {
		t0 := time.Now()
		for j := 0; j < 100; j++ {
			unix.Getppid()
		}
		sys = append(sys, time.Since(t0)/100)
	}
	exit, call := median(deltas), median(sys)
	fmt.Printf("bench exit-roundtrip: pio_exit_ns=%d samples=%d syscall_ns=%d ratio=%.0f\n",
		exit.Nanoseconds(), len(deltas), call.Nanoseconds(), float64(exit)/float64(call))
}

// BenchmarkPause: 1000 Pause/Resume cycles of a 2-vCPU machine whose vCPU 0
// runs counter and whose vCPU 1 spins in the guest.
func BenchmarkPause(b *testing.B) {
	requireKVM(b)
	const cycles = 1000
	m, err := vmm.New(vmm.Config{MemSize: 16 << 20, CPUs: 2, Payload: &vmm.PayloadConfig{Name: "counter", Options: map[string]string{"iterations": "0", "report": "0"}}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	time.Sleep(50 * time.Millisecond)
	var pauses, resumes []time.Duration
	for i := 0; i < cycles; i++ {
		p, err := m.Pause()
		if err != nil {
			b.Fatal(err)
		}
		r, err := m.Resume()
		if err != nil {
			b.Fatal(err)
		}
		pauses, resumes = append(pauses, p), append(resumes, r)
		time.Sleep(200 * time.Microsecond) // let the guest run between cycles
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		b.Fatal(err)
	}
	sort.Slice(pauses, func(i, j int) bool { return pauses[i] < pauses[j] })
	fmt.Printf("bench pause: pause_all_us=%s resume_all_us=%s pause_p99_us=%s cycles=%d vcpus=2\n",
		us(median(pauses)), us(median(resumes)), us(pauses[len(pauses)*99/100]), cycles)
}

// BenchmarkCapture: 1000 pause cycles of a 2-vCPU machine (vCPU 0 runs
// counter, vCPU 1 spins) with capture at parking on, as a checkpointer
// takes them, memory aside: Pause, CaptureState, MarshalBinary, Resume. The
// anchor is one vCPU ioctl (KVM_GET_MP_STATE on a parked vCPU's thread),
// measured in the same run; stun_ioctls is the stun in units of it. Each
// vCPU reads its state with 9 such ioctls, all vCPUs at once, after it has
// stopped (Pause returns then), so capture_wait is what is left of those
// when CaptureState is called.
func BenchmarkCapture(b *testing.B) {
	requireKVM(b)
	const cycles = 1000
	m, err := vmm.New(vmm.Config{MemSize: 16 << 20, CPUs: 2, Payload: &vmm.PayloadConfig{Name: "counter", Options: map[string]string{"iterations": "0", "report": "0"}}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	m.CaptureOnPause(true)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := m.Run(ctx); done <- err }()
	time.Sleep(50 * time.Millisecond)
	var pauses, captures, encodes, resumes, ioctls, stuns []time.Duration
	for i := 0; i < cycles; i++ {
		t0 := time.Now()
		p, err := m.Pause()
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		st, err := m.CaptureState()
		if err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if _, err := st.MarshalBinary(); err != nil {
			b.Fatal(err)
		}
		t3 := time.Now()
		if i%10 == 0 {
			// The anchor, after the capture (which it would undo).
			if err := m.OnVCPU(0, func(c *arch.VCPU) error {
				s := time.Now()
				_, err := c.MPState()
				ioctls = append(ioctls, time.Since(s))
				return err
			}); err != nil {
				b.Fatal(err)
			}
		}
		t4 := time.Now()
		r, err := m.Resume()
		if err != nil {
			b.Fatal(err)
		}
		pauses, captures, encodes, resumes = append(pauses, p), append(captures, t2.Sub(t1)), append(encodes, t3.Sub(t2)), append(resumes, r)
		stuns = append(stuns, t3.Sub(t0)+time.Since(t4))
		time.Sleep(200 * time.Microsecond) // let the guest run between cycles
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		b.Fatal(err)
	}
	fmt.Printf("bench capture: stun_us=%s pause_us=%s capture_wait_us=%s encode_us=%s resume_us=%s ioctl_us=%s stun_ioctls=%.1f cycles=%d vcpus=2\n",
		us(median(stuns)), us(median(pauses)), us(median(captures)), us(median(encodes)), us(median(resumes)), us(median(ioctls)),
		float64(median(stuns))/float64(median(ioctls)), cycles)
}

// BenchmarkRSS runs the real binary with a 256 MiB guest whose touch payload
// writes every data page, and reports the process RSS minus the guest memory
// resident on the host.
func BenchmarkRSS(b *testing.B) {
	requireKVM(b)
	bin := filepath.Join(b.TempDir(), "understudy")
	build := exec.Command("go", "build", "-o", bin, "../cmd/understudy")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "run", "--payload", "touch,rounds=1,accesses=1000", "--mem", "256M", "--stats").CombinedOutput()
	if err != nil {
		b.Fatalf("understudy run: %v\n%s", err, out)
	}
	re := regexp.MustCompile(`rss_kib=(\d+) guest_resident_kib=(\d+)`)
	f := re.FindSubmatch(out)
	if f == nil {
		b.Fatalf("no stats line in %q", out)
	}
	rss, _ := strconv.ParseUint(string(f[1]), 10, 64)
	guest, _ := strconv.ParseUint(string(f[2]), 10, 64)
	fmt.Printf("bench rss: vmm_overhead_mib=%.1f rss_mib=%.1f guest_resident_mib=%.1f guest_mib=256\n",
		float64(rss-guest)/1024, float64(rss)/1024, float64(guest)/1024)
}
