package diskrep

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// testSize is an odd size: the last write block is 1000 bytes.
const testSize = 1<<20 + 1000

func rootOf(t testing.TB, disk []byte) [sha256.Size]byte {
	t.Helper()
	fp, err := virtio.NewFingerprint(bytes.NewReader(disk), int64(len(disk)))
	if err != nil {
		t.Fatal(err)
	}
	return fp.Root()
}

// randomDisk returns size bytes of pseudo-random content with an all-zero
// stretch (a hole in a seeded replica).
func randomDisk(seed uint64, size int) []byte {
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	clear(b[256<<10 : 512<<10])
	return b
}

// nextEpoch changes model in ranges (offset, length) with fresh bytes and
// returns the writes that do the same, with model's new fingerprint.
func nextEpoch(t testing.TB, model []byte, seed uint64, ranges ...[2]uint64) *virtio.DiskWrites {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 2))
	w := &virtio.DiskWrites{Size: uint64(len(model))}
	for _, rg := range ranges {
		for i := rg[0]; i < rg[0]+rg[1]; i++ {
			model[i] = byte(r.Uint32())
		}
		w.Ranges = append(w.Ranges, virtio.DiskRange{Off: rg[0], Data: bytes.Clone(model[rg[0] : rg[0]+rg[1]])})
	}
	w.Fingerprint = rootOf(t, model)
	return w
}

// epoch2Ranges are three ranges, the last one ending at the disk's end.
var epoch2Ranges = [][2]uint64{{4096, 8192}, {300 << 10, 64 << 10}, {testSize - 1000 - 4096, 4096 + 1000}}

// seeded returns a replica at dir/disk.img seeded at epoch 1 with a random
// disk, and that disk.
func seeded(t *testing.T, dir string) (*Replica, []byte) {
	t.Helper()
	disk := randomDisk(1, testSize)
	r, err := Open(filepath.Join(dir, "disk.img"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	if r.Seeded() || r.Epoch() != 0 {
		t.Fatalf("fresh replica: seeded %v epoch %d, want not seeded, 0", r.Seeded(), r.Epoch())
	}
	if err := r.Seed(1, bytes.NewReader(disk), testSize, rootOf(t, disk)); err != nil {
		t.Fatal(err)
	}
	return r, disk
}

// checkDisk checks that the replica file at path holds want, byte for byte.
func checkDisk(t *testing.T, path string, want []byte, what string) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		n := 0
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				n++
			}
		}
		t.Fatalf("%s: the disk (%d bytes) differs from the expected epoch (%d bytes) in %d bytes", what, len(got), len(want), n)
	}
}

func TestStageCommit(t *testing.T) {
	dir := t.TempDir()
	r, disk := seeded(t, dir)
	defer r.Close()
	path := r.Path()
	if r.Epoch() != 1 || !r.Seeded() || r.Fingerprint() != rootOf(t, disk) {
		t.Fatalf("after Seed: epoch %d seeded %v", r.Epoch(), r.Seeded())
	}
	checkDisk(t, path, disk, "seeded")
	epoch1 := bytes.Clone(disk)

	w := nextEpoch(t, disk, 2, epoch2Ranges...)
	if err := r.Stage(2, w); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, epoch1, "staged, not committed")
	if got := r.Staged(); len(got) != 1 || got[0] != 2 {
		t.Errorf("Staged() = %v, want [2]", got)
	}
	if err := r.Commit(3); !errors.Is(err, ErrEpoch) {
		t.Errorf("Commit(3) with 2 staged = %v, want ErrEpoch", err)
	}
	if err := r.Commit(2); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, disk, "committed")
	if r.Epoch() != 2 || r.Fingerprint() != w.Fingerprint {
		t.Errorf("after Commit(2): epoch %d, fingerprint %x; want 2, %x", r.Epoch(), r.Fingerprint(), w.Fingerprint)
	}
	if fi, err := os.Stat(JournalPath(path)); err != nil || fi.Size() != 0 {
		t.Errorf("journal after Commit: %v, %v; want empty", fi, err)
	}

	// Refusals change nothing.
	epoch2 := bytes.Clone(disk)
	bad := nextEpoch(t, bytes.Clone(disk), 3, [2]uint64{0, 4096})
	bad.Fingerprint[0] ^= 1
	if err := r.Stage(3, bad); !errors.Is(err, ErrFingerprint) {
		t.Errorf("Stage with a wrong fingerprint = %v, want ErrFingerprint", err)
	}
	if err := r.Stage(2, nextEpoch(t, bytes.Clone(disk), 3)); !errors.Is(err, ErrEpoch) {
		t.Errorf("Stage(2) at epoch 2 = %v, want ErrEpoch", err)
	}
	other := nextEpoch(t, make([]byte, 8192), 3, [2]uint64{0, 4096})
	if err := r.Stage(3, other); err == nil || !strings.Contains(err.Error(), "8192") {
		t.Errorf("Stage of another size's writes = %v", err)
	}
	if got := r.Staged(); len(got) != 0 {
		t.Errorf("a refused Stage left epochs %v staged", got)
	}
	checkDisk(t, path, epoch2, "after refusals")

	// Discard drops staged epochs; an empty epoch commits.
	if err := r.Stage(3, nextEpoch(t, bytes.Clone(disk), 4, [2]uint64{8192, 4096})); err != nil {
		t.Fatal(err)
	}
	if err := r.Discard(); err != nil {
		t.Fatal(err)
	}
	w3 := nextEpoch(t, disk, 5, [2]uint64{0, 4096}, [2]uint64{1 << 19, 3 * 4096})
	if err := r.Stage(3, w3); err != nil {
		t.Fatal(err)
	}
	if err := r.Stage(3, w3); !errors.Is(err, ErrEpoch) {
		t.Errorf("Stage(3) twice = %v, want ErrEpoch", err)
	}
	if err := r.Commit(3); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, disk, "epoch 3")
	if err := r.Stage(5, nextEpoch(t, disk, 6)); err != nil {
		t.Fatal(err)
	}
	if err := r.Commit(5); err != nil {
		t.Fatal(err)
	}
	if err := r.Stage(6, nextEpoch(t, bytes.Clone(disk), 7, [2]uint64{0, 4096})); err != nil {
		t.Fatal(err)
	}
	if err := r.Discard(); err != nil {
		t.Fatal(err)
	}
	if err := r.Commit(6); !errors.Is(err, ErrEpoch) {
		t.Errorf("Commit after Discard = %v, want ErrEpoch", err)
	}
	r.Close()

	r, err := Open(path, testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Epoch() != 5 || r.Recovered() != "" || r.Fingerprint() != rootOf(t, disk) {
		t.Errorf("reopened: epoch %d, recovered %q; want 5, nothing", r.Epoch(), r.Recovered())
	}
	checkDisk(t, path, disk, "reopened")
	if _, err := Open(path, testSize+512); err == nil {
		t.Errorf("Open with another size succeeded")
	}
}

func TestNotSeeded(t *testing.T) {
	r, err := Open(filepath.Join(t.TempDir(), "disk.img"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	w := nextEpoch(t, make([]byte, testSize), 1, [2]uint64{0, 4096})
	if err := r.Stage(2, w); !errors.Is(err, ErrNotSeeded) {
		t.Errorf("Stage on a fresh replica = %v, want ErrNotSeeded", err)
	}
	if _, _, err := r.Activate(); !errors.Is(err, ErrNotSeeded) {
		t.Errorf("Activate of a fresh replica = %v, want ErrNotSeeded", err)
	}
}

func TestSeedVerified(t *testing.T) {
	dir := t.TempDir()
	r, disk := seeded(t, dir)
	defer r.Close()
	path := r.Path()
	other := randomDisk(9, testSize)
	wrong := rootOf(t, disk) // the old disk's, not the seed's
	err := r.Seed(7, bytes.NewReader(other), testSize, wrong)
	if !errors.Is(err, ErrFingerprint) || !strings.Contains(err.Error(), "refused") {
		t.Errorf("Seed with a wrong fingerprint = %v, want ErrFingerprint", err)
	}
	if err := r.Seed(7, bytes.NewReader(other[:1000]), testSize, rootOf(t, other)); err == nil {
		t.Errorf("Seed from a short reader succeeded")
	}
	if err := r.Seed(7, bytes.NewReader(other), testSize-1, rootOf(t, other)); err == nil {
		t.Errorf("Seed of another size succeeded")
	}
	if r.Epoch() != 1 {
		t.Errorf("epoch %d after refused seeds, want 1", r.Epoch())
	}
	checkDisk(t, path, disk, "after refused seeds")
	if _, err := os.Stat(SeedPath(path)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused seed left %s: %v", SeedPath(path), err)
	}
	// A staged epoch does not survive a seed.
	if err := r.Stage(2, nextEpoch(t, bytes.Clone(disk), 2, [2]uint64{0, 4096})); err != nil {
		t.Fatal(err)
	}
	if err := r.Seed(7, bytes.NewReader(other), testSize, rootOf(t, other)); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, other, "seeded again")
	if got := r.Staged(); len(got) != 0 || r.Epoch() != 7 {
		t.Errorf("after the seed: epoch %d, staged %v; want 7, nothing", r.Epoch(), got)
	}
	r.Close()
	r, err = Open(path, testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Epoch() != 7 {
		t.Errorf("reopened after the seed: epoch %d, want 7", r.Epoch())
	}
}

// stagedJournal seeds a replica at epoch 1, stages epochs 2 and 3 and
// closes it without a commit; it returns the disk path, the journal and
// the disk as of epochs 1, 2 and 3.
func stagedJournal(t *testing.T) (string, []byte, [3][]byte) {
	t.Helper()
	r, disk := seeded(t, t.TempDir())
	path := r.Path()
	var ds [3][]byte
	ds[0] = bytes.Clone(disk)
	if err := r.Stage(2, nextEpoch(t, disk, 2, epoch2Ranges...)); err != nil {
		t.Fatal(err)
	}
	ds[1] = bytes.Clone(disk)
	if err := r.Stage(3, nextEpoch(t, disk, 3, [2]uint64{4096, 4096}, [2]uint64{1 << 19, 4096})); err != nil {
		t.Fatal(err)
	}
	ds[2] = bytes.Clone(disk)
	r.Close()
	j, err := os.ReadFile(JournalPath(path))
	if err != nil {
		t.Fatal(err)
	}
	return path, j, ds
}

// withCommit returns journal j with a commit entry of epoch appended.
func withCommit(j []byte, epoch uint64) []byte {
	b, _ := appendEntry(bytes.Clone(j), le.Uint32(j[len(j)-4:]), kindCommit, epoch, testSize, nil)
	return b
}

func TestIncompleteJournalDiscarded(t *testing.T) {
	path, j, ds := stagedJournal(t)
	flipped := func(b []byte, at int) []byte { b = bytes.Clone(b); b[at] ^= 1; return b }
	for _, c := range []struct {
		name    string
		journal []byte
		epoch   uint64
		why     string
	}{
		{"staged without a commit", j, 1, "discarded"},
		{"torn", j[:len(j)/2], 1, "discarded"},
		{"commit after a damaged entry", flipped(withCommit(j, 3), 100), 1, "discarded"},
		{"torn commit", withCommit(j, 3)[:len(j)+20], 1, "discarded"},
		{"garbage", bytes.Repeat([]byte{0xa5}, 5000), 1, "discarded"},
		{"commit of epoch 2", withCommit(j, 2), 2, "applied"},
		{"commit of epoch 3", withCommit(j, 3), 3, "applied"},
		{"commit of an unstaged epoch", withCommit(j, 4), 0, ""},
	} {
		if err := os.WriteFile(JournalPath(path), c.journal, 0o600); err != nil {
			t.Fatal(err)
		}
		// Every case starts from epoch 1.
		if err := os.WriteFile(path, ds[0], 0o600); err != nil {
			t.Fatal(err)
		}
		r, err := Open(path, testSize)
		if c.epoch == 0 {
			if !errors.Is(err, ErrCorrupt) {
				t.Errorf("%s: Open = %v, want ErrCorrupt", c.name, err)
			}
			if r != nil {
				r.Close()
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if r.Epoch() != c.epoch || !strings.Contains(r.Recovered(), c.why) {
			t.Errorf("%s: epoch %d, recovered %q; want %d, %s", c.name, r.Epoch(), r.Recovered(), c.epoch, c.why)
		}
		r.Close()
		checkDisk(t, path, ds[c.epoch-1], c.name)
		if fi, err := os.Stat(JournalPath(path)); err != nil || fi.Size() != 0 {
			t.Errorf("%s: journal not cleared: %v", c.name, err)
		}
		// Back to epoch 1 for the next case: the record too.
		if c.epoch != 1 {
			os.Remove(RecordPath(path))
			r, err := Open(path, testSize)
			if err != nil {
				t.Fatal(err)
			}
			if err := r.Seed(1, bytes.NewReader(ds[0]), testSize, rootOf(t, ds[0])); err != nil {
				t.Fatal(err)
			}
			r.Close()
		}
	}
}

// Several staged epochs commit together up to the one named; later ones
// stay staged, in the journal, and commit next.
func TestCommitSeveralEpochs(t *testing.T) {
	dir := t.TempDir()
	r, disk := seeded(t, dir)
	defer r.Close()
	path := r.Path()
	var ds [6][]byte
	ds[1] = bytes.Clone(disk)
	for e := uint64(2); e <= 5; e++ {
		w := nextEpoch(t, disk, e, [2]uint64{8192, 4096}, [2]uint64{4096 * (e + 10), 4096}, [2]uint64{1 << 19, 64 << 10})
		if err := r.Stage(e, w); err != nil {
			t.Fatalf("Stage(%d): %v", e, err)
		}
		ds[e] = bytes.Clone(disk)
	}
	checkDisk(t, path, ds[1], "4 epochs staged")
	if err := r.Commit(3); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, ds[3], "committed up to 3")
	if got := r.Staged(); len(got) != 2 || got[0] != 4 || got[1] != 5 {
		t.Errorf("Staged() after Commit(3) = %v, want [4 5]", got)
	}
	if err := r.Commit(2); !errors.Is(err, ErrEpoch) {
		t.Errorf("Commit(2) after Commit(3) = %v, want ErrEpoch", err)
	}
	if err := r.Commit(5); err != nil {
		t.Fatal(err)
	}
	checkDisk(t, path, ds[5], "committed up to 5")
	if r.Epoch() != 5 || r.Fingerprint() != rootOf(t, ds[5]) {
		t.Errorf("epoch %d, want 5 with epoch 5's fingerprint", r.Epoch())
	}
}

func TestOpenDetectsCorruption(t *testing.T) {
	dir := t.TempDir()
	r, _ := seeded(t, dir)
	path := r.Path()
	r.Close()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{1, 2, 3}, 70000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := Open(path, testSize); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open of a changed disk = %v, want ErrCorrupt", err)
	}
	if err := Remove(path); err != nil {
		t.Fatal(err)
	}
	r, err = Open(path, testSize)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Seeded() {
		t.Errorf("a removed replica reopens seeded")
	}
}

func TestActivate(t *testing.T) {
	dir := t.TempDir()
	r, disk := seeded(t, dir)
	got, fp, err := r.Activate()
	if err != nil || got != filepath.Join(dir, "disk.img") {
		t.Fatalf("Activate() = %q, %v", got, err)
	}
	if fp == nil || fp.Root() != rootOf(t, disk) {
		t.Errorf("Activate's fingerprint is not the disk's")
	}
	checkDisk(t, got, disk, "activated")
	for _, p := range []string{JournalPath(got), RecordPath(got)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s after Activate: %v, want gone", p, err)
		}
	}
	if err := r.Stage(2, nil); err == nil {
		t.Errorf("Stage after Activate succeeded")
	}
}

// The crash tests run the replica in a child process (this test binary
// again) that stops at a step of Stage+Commit or Seed, tells the parent,
// and is killed there with SIGKILL. Open must then find the previous epoch
// or the new one, whole.

const childEnv = "DISKREP_CRASH_CHILD"

// TestCrashChild is the child's body; it does nothing in a normal run.
func TestCrashChild(t *testing.T) {
	spec := os.Getenv(childEnv)
	if spec == "" {
		t.Skip("the child of the crash tests")
	}
	parts := strings.Split(spec, ",") // dir,op,step,index
	dir, op, step := parts[0], parts[1], parts[2]
	index, _ := strconv.Atoi(parts[3])
	armed := false
	testHook = func(s string, i int) {
		if armed && s == step && i == index {
			fmt.Println("stopped at", s, i)
			// The parent kills us here. A sleep, not an empty select:
			// with every goroutine blocked the runtime ends the process
			// itself ("all goroutines are asleep"), with status 2, and
			// on a busy machine that could come before the SIGKILL.
			for {
				time.Sleep(time.Hour)
			}
		}
	}
	r, err := Open(filepath.Join(dir, "disk.img"), testSize)
	if err != nil {
		t.Fatal(err)
	}
	load := func(name string) *virtio.DiskWrites {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		w, err := virtio.DecodeDiskWrites(b)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	do := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	switch op {
	case "commit": // stage 2, commit 2
		armed = true
		do(r.Stage(2, load("writes2.bin")))
		do(r.Commit(2))
	case "commit2": // stage 2 and 3, commit both at once
		armed = true
		do(r.Stage(2, load("writes2.bin")))
		do(r.Stage(3, load("writes3.bin")))
		do(r.Commit(3))
	case "compact1", "compact2": // stage 2 and 3, commit 2 (compaction), then 3
		do(r.Stage(2, load("writes2.bin")))
		do(r.Stage(3, load("writes3.bin")))
		armed = op == "compact1"
		do(r.Commit(2))
		armed = true
		do(r.Commit(3))
	case "seed":
		seed, err := os.ReadFile(filepath.Join(dir, "seed.bin"))
		if err != nil {
			t.Fatal(err)
		}
		armed = true
		do(r.Seed(9, bytes.NewReader(seed), testSize, rootOf(t, seed)))
	}
	fmt.Println("finished")
}

// crashAt runs the child on the replica in dir until it stops at step
// (index i) and kills it with SIGKILL.
func crashAt(t *testing.T, dir, op, step string, i int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s,%s,%s,%d", childEnv, dir, op, step, i))
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	var lines []string
	stopped := false
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if strings.HasPrefix(sc.Text(), "stopped at") {
			stopped = true
			break
		}
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil && stopped {
		t.Fatal(err)
	}
	err = cmd.Wait()
	if !stopped {
		t.Fatalf("the child did not stop at %s %d (%v): %q", step, i, err, lines)
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("the child ended with %v, want killed by SIGKILL", cmd.ProcessState)
	}
}

// epoch3Ranges are epoch 3's writes: one overlaps epoch 2's first range.
var epoch3Ranges = [][2]uint64{{8192, 4096}, {1 << 19, 8192}}

func TestCrashDuringCommit(t *testing.T) {
	for _, c := range []struct {
		op    string
		step  string
		index int
		want  uint64 // the epoch Open finds
	}{
		{"commit", "stage-partial", 0, 1},
		{"commit", "staged", 0, 1},
		{"commit", "marked", 0, 2},
		{"commit", "range", 0, 2},
		{"commit", "range", 1, 2},
		{"commit", "applied", 0, 2},
		{"commit", "recorded", 0, 2},
		{"commit2", "marked", 0, 3},
		{"commit2", "range", 1, 3}, // in epoch 2's ranges
		{"commit2", "range", 3, 3}, // in epoch 3's
		{"compact1", "recorded", 0, 2},
		{"compact2", "marked", 0, 3},
		{"compact2", "range", 0, 3},
	} {
		t.Run(fmt.Sprintf("%s-%s-%d", c.op, c.step, c.index), func(t *testing.T) {
			dir := t.TempDir()
			r, disk := seeded(t, dir)
			r.Close()
			ds := [][]byte{nil, bytes.Clone(disk)}
			for e, rs := range [][][2]uint64{epoch2Ranges, epoch3Ranges} {
				w := nextEpoch(t, disk, uint64(e+2), rs...)
				ds = append(ds, bytes.Clone(disk))
				b, err := w.AppendBinary(nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("writes%d.bin", e+2)), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			crashAt(t, dir, c.op, c.step, c.index)
			path := filepath.Join(dir, "disk.img")
			if c.step == "range" {
				// Killed between range writes: the disk itself is no epoch now.
				got, _ := os.ReadFile(path)
				for e := 1; e <= 3; e++ {
					if bytes.Equal(got, ds[e]) {
						t.Fatalf("killed after range %d, the disk is already epoch %d whole: the hook is not between ranges", c.index, e)
					}
				}
			}
			r, err := Open(path, testSize)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Epoch() != c.want {
				t.Fatalf("after a crash: epoch %d, want %d (recovered: %q)", r.Epoch(), c.want, r.Recovered())
			}
			want := ds[c.want]
			checkDisk(t, path, want, "after the crash")
			if r.Fingerprint() != rootOf(t, want) {
				t.Errorf("fingerprint after recovery is not the disk's")
			}
			// The replica goes on: the next epoch commits.
			w := nextEpoch(t, want, 9, [2]uint64{0, 4096})
			if err := r.Stage(c.want+1, w); err != nil {
				t.Fatal(err)
			}
			if err := r.Commit(c.want + 1); err != nil {
				t.Fatal(err)
			}
			checkDisk(t, path, want, "the next epoch after recovery")
		})
	}
}

// A journal damaged after the disk was partly written cannot be applied
// again; Open then refuses the replica (ErrCorrupt) instead of using a
// disk that is neither epoch.
func TestCrashThenCorruptJournal(t *testing.T) {
	dir := t.TempDir()
	r, disk := seeded(t, dir)
	r.Close()
	w := nextEpoch(t, disk, 2, epoch2Ranges...)
	b, _ := w.AppendBinary(nil)
	if err := os.WriteFile(filepath.Join(dir, "writes2.bin"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	crashAt(t, dir, "commit", "range", 1)
	path := filepath.Join(dir, "disk.img")
	j, err := os.ReadFile(JournalPath(path))
	if err != nil {
		t.Fatal(err)
	}
	j[200] ^= 0xff
	if err := os.WriteFile(JournalPath(path), j, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, testSize); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Open after a crash with a damaged journal = %v, want ErrCorrupt", err)
	}
}

func TestCrashDuringSeed(t *testing.T) {
	for _, c := range []struct {
		step   string
		seeded bool // at the old epoch 1; else not seeded
	}{
		{"seed-written", true},
		{"seed-unrecorded", false},
		{"seed-renamed", false},
	} {
		t.Run(c.step, func(t *testing.T) {
			dir := t.TempDir()
			r, disk := seeded(t, dir)
			r.Close()
			if err := os.WriteFile(filepath.Join(dir, "seed.bin"), randomDisk(5, testSize), 0o600); err != nil {
				t.Fatal(err)
			}
			crashAt(t, dir, "seed", c.step, 0)
			path := filepath.Join(dir, "disk.img")
			r, err := Open(path, testSize)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			if r.Seeded() != c.seeded {
				t.Fatalf("after a crash at %s: seeded %v, want %v", c.step, r.Seeded(), c.seeded)
			}
			if c.seeded {
				if r.Epoch() != 1 {
					t.Errorf("epoch %d, want 1", r.Epoch())
				}
				checkDisk(t, path, disk, "old replica")
			}
		})
	}
}

// FuzzReadJournal reads fuzzed journals: the entries it accepts are
// chained, of this disk size, and writes entries are ascending.
func FuzzReadJournal(f *testing.F) {
	model := randomDisk(1, testSize)
	w := nextEpoch(f, model, 2, [2]uint64{0, 4096}, [2]uint64{testSize - 1000, 1000})
	p, _ := w.AppendBinary(nil)
	j, sum := appendEntry(nil, 0, kindWrites, 2, testSize, p)
	f.Add(j)
	j, _ = appendEntry(j, sum, kindCommit, 2, testSize, nil)
	f.Add(j)
	f.Fuzz(func(t *testing.T, b []byte) {
		entries, why := readJournal(b, testSize)
		var n int
		var last uint64
		for _, e := range entries {
			n += journalHeaderSize + len(e.payload) + journalSumSize
			if e.kind == kindWrites {
				if e.epoch <= last {
					t.Fatalf("accepted writes of epoch %d after %d", e.epoch, last)
				}
				last = e.epoch
			}
		}
		if (n == len(b)) != (why == "") {
			t.Fatalf("read %d of %d bytes, reason %q", n, len(b), why)
		}
		if epoch, ws, ok := committed(entries, 0); ok {
			for _, e := range ws {
				if e.kind != kindWrites || e.epoch > epoch {
					t.Fatalf("commit of %d covers entry %d of kind %d", epoch, e.epoch, e.kind)
				}
			}
		}
	})
}

// FuzzRecordSlot decodes fuzzed epoch record slots: what decodes
// re-encodes to the same bytes.
func FuzzRecordSlot(f *testing.F) {
	f.Add((&record{seq: 3, seeded: true, epoch: 9, size: testSize, root: [28]byte{1}}).encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		r, ok := decodeSlot(b)
		if !ok {
			return
		}
		if !bytes.Equal(r.encode(), b) {
			t.Fatalf("slot re-encodes differently")
		}
	})
}
