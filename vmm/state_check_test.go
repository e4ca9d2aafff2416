package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/internal/linuxtest"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// checkTestTransport is a virtio-blk transport state of linuxTestState's
// 8 MiB machine, its queue ready at testQueue.
func checkTestTransport() virtio.TransportState {
	return virtio.TransportState{
		Status:         virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK,
		DriverFeatures: virtio.FeatureVersion1 | virtio.BlockFFlush,
		Queues:         []virtio.QueueState{testQueue},
	}
}

var testQueue = virtio.QueueState{Size: 8, Ready: true, LastAvail: 3, UsedIdx: 3, Desc: 0x10000, Driver: 0x10400, Device: 0x10800}

// stateWithTransport encodes a Linux machine's state (linuxVirtioTestState,
// with regions if given) whose first virtio device is a block device in
// transport state ts.
func stateWithTransport(t testing.TB, ts virtio.TransportState, regions ...mmu.Region) []byte {
	t.Helper()
	st := linuxVirtioTestState(t, 1)
	if regions != nil {
		st.Config.Regions = regions
		st.Config.MemSize = 0
		for _, r := range regions {
			st.Config.MemSize += r.Size
		}
	}
	body, err := (&virtio.BlockState{Capacity: 2048, DiskSize: 2048 * 512}).AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Devices.Virtio[0], err = virtio.AppendTransportState(nil, virtio.DeviceIDBlock, &ts, body); err != nil {
		t.Fatal(err)
	}
	return mustMarshal(t, st)
}

// ValidateState accepts real states (a payload machine's, a Linux
// machine's with a block and a net device, a ring ending exactly at the
// end of RAM, indices that wrapped) and refuses, naming what is wrong, a
// state that breaks any rule of a ready queue or of the features, which
// UnmarshalBinary accepts (but for the index rule, which decoding already
// enforces).
func TestValidateState(t *testing.T) {
	for _, n := range []int{1, 2} {
		if err := ValidateState(mustMarshal(t, testState(n))); err != nil {
			t.Errorf("ValidateState(payload state, %d vCPUs) = %v", n, err)
		}
	}
	if err := ValidateState(mustMarshal(t, linuxVirtioTestState(t, 2))); err != nil {
		t.Errorf("ValidateState(Linux state with virtio-blk and virtio-net) = %v", err)
	}
	const mem = 8 << 20
	// Two regions as mmu.Layout makes above 3 GiB, with a gap between.
	split := []mmu.Region{{GPA: 0, Size: 4 << 20}, {GPA: 16 << 20, Size: 4 << 20, Offset: 4 << 20, Slot: 1}}
	good := []struct {
		name    string
		f       func(ts *virtio.TransportState)
		regions []mmu.Region
	}{
		{"descriptor table ending at the end of RAM", func(ts *virtio.TransportState) { ts.Queues[0].Desc = mem - 16*8 }, nil},
		{"indices that wrapped", func(ts *virtio.TransportState) { ts.Queues[0].LastAvail, ts.Queues[0].UsedIdx = 2, 65530 }, nil},
		{"a read-only disk's feature", func(ts *virtio.TransportState) { ts.DriverFeatures |= virtio.BlockFRO }, nil},
		{"a queue that is not ready is not checked", func(ts *virtio.TransportState) { ts.Queues[0] = virtio.QueueState{Size: 3, Desc: 1 << 50} }, nil},
		{"an unoffered feature before FEATURES_OK", func(ts *virtio.TransportState) {
			ts.Status = virtio.StatusAcknowledge | virtio.StatusDriver
			ts.DriverFeatures |= 1 << 28
		}, nil},
		{"rings in the second region", func(ts *virtio.TransportState) {
			ts.Queues[0].Desc, ts.Queues[0].Driver, ts.Queues[0].Device = 16<<20, 16<<20+0x400, 16<<20+0x800
		}, split},
	}
	for _, c := range good {
		ts := checkTestTransport()
		c.f(&ts)
		if err := ValidateState(stateWithTransport(t, ts, c.regions...)); err != nil {
			t.Errorf("%s: ValidateState() = %v", c.name, err)
		}
	}

	bad := []struct {
		name    string
		f       func(ts *virtio.TransportState)
		regions []mmu.Region
		want    string
	}{
		{"queue size not a power of 2", func(ts *virtio.TransportState) { ts.Queues[0].Size = 6 }, nil, "queue size 6: want a power of 2 from 1 to 256"},
		{"queue size 0", func(ts *virtio.TransportState) { ts.Queues[0].Size = 0 }, nil, "queue size 0"},
		{"queue larger than the device type's", func(ts *virtio.TransportState) { ts.Queues[0].Size = 512 }, nil, "queue size 512"},
		{"descriptor table outside RAM", func(ts *virtio.TransportState) { ts.Queues[0].Desc = mem }, nil, "descriptor table at 0x800000"},
		{"descriptor table misaligned", func(ts *virtio.TransportState) { ts.Queues[0].Desc = 0x10008 }, nil, "descriptor table at 0x10008 is not 16-byte aligned"},
		{"available ring outside RAM", func(ts *virtio.TransportState) { ts.Queues[0].Driver = 1 << 40 }, nil, "available ring at 0x10000000000"},
		{"available ring across the end of RAM", func(ts *virtio.TransportState) { ts.Queues[0].Driver = mem - 4 }, nil, "available ring at 0x7ffffc (22 bytes)"},
		{"used ring outside RAM", func(ts *virtio.TransportState) { ts.Queues[0].Device = mem }, nil, "used ring at 0x800000"},
		{"descriptor table across the end of RAM", func(ts *virtio.TransportState) { ts.Queues[0].Desc = mem - 16*8 + 16 }, nil, "descriptor table at 0x7fff90 (128 bytes): guest-physical address out of range: [0x7fff90, +0x80) crosses the end of RAM"},
		{"used ring misaligned", func(ts *virtio.TransportState) { ts.Queues[0].Device = 0x10802 }, nil, "used ring at 0x10802 is not 4-byte aligned"},
		{"descriptor table across a gap between regions", func(ts *virtio.TransportState) { ts.Queues[0].Desc = 4<<20 - 64 }, split, "descriptor table at 0x3fffc0"},
		{"used ring in the gap between regions", func(ts *virtio.TransportState) { ts.Queues[0].Device = 8 << 20 }, split, "used ring at 0x800000"},
		{"a feature no block device offers", func(ts *virtio.TransportState) { ts.DriverFeatures |= 1 << 28 }, nil, "include 0x10000000, which the device does not offer"},
		{"two queues on a block device", func(ts *virtio.TransportState) { ts.Queues = append(ts.Queues, testQueue) }, nil, "the state has 2 queues, the device 1"},
	}
	for _, c := range bad {
		ts := checkTestTransport()
		c.f(&ts)
		b := stateWithTransport(t, ts, c.regions...)
		var st MachineState
		if err := st.UnmarshalBinary(b); err != nil {
			t.Errorf("%s: UnmarshalBinary() = %v; the encoding should carry this state", c.name, err)
			continue
		}
		err := ValidateState(b)
		if !errors.Is(err, ErrBadState) || !errors.Is(err, virtio.ErrBadState) || !strings.Contains(err.Error(), "virtio device 0") ||
			!strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: ValidateState() = %v; want one line wrapping ErrBadState, naming virtio device 0 and %q", c.name, err, c.want)
		}
		if err := st.CheckVirtio(); err == nil {
			t.Errorf("%s: CheckVirtio() = nil", c.name)
		}
	}

	// A ready queue's next available index more than its size ahead of its
	// next used index (mod 2^16): no encoder writes it, decoding refuses it.
	b := stateWithTransport(t, checkTestTransport())
	i := bytes.Index(b, []byte("USVT"))
	q := i + 48 // queue 0's record
	used := binary.LittleEndian.Uint16(b[q+6:])
	binary.LittleEndian.PutUint16(b[q+4:], used+testQueue.Size+1)
	if err := ValidateState(b); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), "more than the queue size 8") {
		t.Errorf("next available index size+1 ahead: ValidateState() = %v, want ErrBadState naming the queue size", err)
	}
	binary.LittleEndian.PutUint16(b[q+4:], used+testQueue.Size)
	if err := ValidateState(b); err != nil {
		t.Errorf("next available index exactly size ahead: ValidateState() = %v", err)
	}

	// What does not decode is refused as UnmarshalBinary refuses it.
	if err := ValidateState([]byte("USVS")); !errors.Is(err, ErrBadState) {
		t.Errorf("ValidateState(truncated) = %v, want ErrBadState", err)
	}
}

func TestIsEncodedState(t *testing.T) {
	for _, c := range []struct {
		b    []byte
		want bool
	}{{mustMarshal(t, testState(1)), true}, {[]byte("USVS"), true}, {[]byte("USV"), false}, {[]byte("state-1"), false}, {nil, false}} {
		if got := IsEncodedState(c.b); got != c.want {
			t.Errorf("IsEncodedState(%.8q) = %v, want %v", c.b, got, c.want)
		}
	}
}

// FuzzValidateState: never a panic; a refusal is one line wrapping
// ErrBadState; an accepted state decodes, and every ready queue of its
// virtio devices lies, rings and all, inside one memory region of its
// configuration with indices at most its size apart (checked here
// independently of the validator).
func FuzzValidateState(f *testing.F) {
	f.Add(mustMarshal(f, testState(1)))
	f.Add(mustMarshal(f, linuxVirtioTestState(f, 1)))
	f.Add(stateWithTransport(f, checkTestTransport()))
	f.Add(stateWithTransport(f, checkTestTransport(), mmu.Region{Size: 4 << 20}, mmu.Region{GPA: 16 << 20, Size: 4 << 20, Offset: 4 << 20, Slot: 1}))
	f.Fuzz(func(t *testing.T, data []byte) {
		err := ValidateState(data)
		if err != nil {
			if !errors.Is(err, ErrBadState) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("ValidateState() = %q, want one line wrapping ErrBadState", err)
			}
			return
		}
		var st MachineState
		if err := st.UnmarshalBinary(data); err != nil {
			t.Fatalf("ValidateState accepted what UnmarshalBinary refuses: %v", err)
		}
		inside := func(gpa, n uint64) bool {
			for _, r := range st.Config.Regions {
				if gpa >= r.GPA && gpa+n >= gpa && gpa+n <= r.GPA+r.Size {
					return true
				}
			}
			return false
		}
		for i, v := range st.Devices.Virtio {
			ts, _, _, err := virtio.DecodeTransportState(v)
			if err != nil {
				t.Fatalf("virtio device %d does not decode: %v", i, err)
			}
			for j, q := range ts.Queues {
				n := uint64(q.Size)
				if !q.Ready {
					continue
				}
				if q.Size == 0 || q.Size&(q.Size-1) != 0 || q.Size > virtio.DefaultQueueSize || q.LastAvail-q.UsedIdx > q.Size ||
					!inside(q.Desc, 16*n) || !inside(q.Driver, 6+2*n) || !inside(q.Device, 6+8*n) {
					t.Fatalf("virtio device %d queue %d accepted: %+v in regions %+v", i, j, q, st.Config.Regions)
				}
			}
		}
	})
}

// BenchmarkValidateState measures the intermediary's per-checkpoint check
// of a real Linux machine's state: captured from a paused machine on this
// host's KVM with 2 vCPUs (their XSAVE area, MSR and CPUID lists as KVM
// gives them) and a virtio-blk device whose queue is ready, and a
// virtio-net transport state as a guest's would be. It prints the time
// per check against decoding alone (UnmarshalBinary) and against a copy
// of the state's bytes, measured in the same run, and as a share of a
// 25 ms epoch.
func BenchmarkValidateState(b *testing.B) {
	kvmtest.Require(b)
	dir := b.TempDir()
	kernel := filepath.Join(dir, "bzImage")
	disk := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(kernel, linuxtest.Kernel(linuxtest.CodeSpin, 0x100000), 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(disk, make([]byte, 1<<20), 0o600); err != nil {
		b.Fatal(err)
	}
	m, err := New(Config{MemSize: 64 << 20, CPUs: 2, Linux: &LinuxConfig{Kernel: kernel, Disks: []DiskConfig{{Path: disk}}}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	blk := &linuxtest.Driver{T: b, Mem: m.Memory(), Tr: m.VirtioTransport(0), Base: tBlkRings, Hdr: tHdr, TxBufs: tTxBufs}
	blk.Setup(1)
	done := make(chan error, 1)
	go func() { _, err := m.Run(context.Background()); done <- err }()
	if _, err := m.Pause(); err != nil {
		b.Fatal(err)
	}
	st, err := m.CaptureState()
	if err != nil {
		b.Fatal(err)
	}
	if _, err := m.Resume(); err != nil {
		b.Fatal(err)
	}
	m.Stop(0)
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	nic := virtioTestStates(b, 0, 0)[1]
	ts, _, body, err := virtio.DecodeTransportState(nic)
	if err != nil {
		b.Fatal(err)
	}
	for i := range ts.Queues { // the net queues next to the block queue
		ts.Queues[i] = virtio.QueueState{Size: 256, Ready: true, Desc: tNetRings + uint64(i)*0x10000, Driver: tNetRings + uint64(i)*0x10000 + 0x1000, Device: tNetRings + uint64(i)*0x10000 + 0x2000}
	}
	if nic, err = virtio.AppendTransportState(nil, virtio.DeviceIDNet, &ts, body); err != nil {
		b.Fatal(err)
	}
	st.Devices.Virtio = append(st.Devices.Virtio, nic)
	enc := mustMarshal(b, st)
	if err := ValidateState(enc); err != nil {
		b.Fatal(err)
	}
	// Each measured for a while, interleaved, so that load on the shared
	// machine falls on all three alike.
	sink := make([]byte, len(enc))
	var spent [3]time.Duration
	var runs [3]int
	fs := [3]func(){
		func() { _ = ValidateState(enc) },
		func() { var s MachineState; _ = s.UnmarshalBinary(enc) },
		func() { copy(sink, enc) },
	}
	for b.Loop() {
		if err := ValidateState(enc); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	for range 20 {
		for i, f := range fs {
			start := time.Now()
			for time.Since(start) < 10*time.Millisecond {
				f()
				runs[i]++
			}
			spent[i] += time.Since(start)
		}
	}
	per := func(i int) float64 { return float64(spent[i].Nanoseconds()) / float64(runs[i]) }
	validate, unmarshal, cp := per(0), per(1), per(2)
	b.Logf("bench validate-state: state_bytes=%d validate_us=%.1f unmarshal_us=%.1f validate_per_unmarshal=%.2f validate_per_copy=%.0f share_of_25ms_epoch=%.4f",
		len(enc), validate/1e3, unmarshal/1e3, validate/unmarshal, validate/cp, validate/25e6)
}
