package kvstore

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// newDisk makes a zeroed file of size bytes standing in for a block device.
func newDisk(t testing.TB, dir string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

func mustOpen(t testing.TB, p string) *Store {
	t.Helper()
	s, err := Open(p)
	if err != nil {
		t.Fatalf("Open(%s) = %v", p, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// putAll writes n values and returns what was acknowledged.
func putAll(t testing.TB, s *Store, n int, round string) map[string]Entry {
	t.Helper()
	want := map[string]Entry{}
	for i := range n {
		k, v := fmt.Sprintf("key%d", i%37), fmt.Sprintf("%s-value-%d", round, i)
		seq, err := s.Put(k, v)
		if err != nil {
			t.Fatalf("Put(%s) = %v", k, err)
		}
		want[k] = Entry{v, seq}
	}
	return want
}

func checkStore(t testing.TB, s *Store, want map[string]Entry, records uint64) {
	t.Helper()
	for k, e := range want {
		if got, ok := s.Get(k); !ok || got != e {
			t.Errorf("Get(%s) = %+v, %v, want %+v", k, got, ok, e)
		}
	}
	if keys, n := s.Count(); keys != len(want) || n != records {
		t.Errorf("Count() = %d keys, %d records, want %d, %d", keys, n, len(want), records)
	}
	v, err := s.Verify()
	if err != nil || !v.OK(records) {
		t.Errorf("Verify() = %+v, %v, want every key matched and %d records", v, err, records)
	}
}

// storeOn runs the store's life cycle on the file or device at p: format,
// write across many blocks, reopen, verify, write more.
func storeOn(t *testing.T, p string, wantDirect bool) {
	s, err := Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if info := s.Info(); !info.Formatted || info.Records != 0 || info.Direct != wantDirect {
		t.Errorf("Open(empty %s).Info() = %+v, want formatted, no records, direct=%v", p, info, wantDirect)
	}
	want := putAll(t, s, 100, "a")
	checkStore(t, s, want, 100)
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = mustOpen(t, p)
	if info := s.Info(); info.Formatted || info.Records != 100 || info.Keys != len(want) {
		t.Errorf("Open(%s) again: Info() = %+v, want 100 records, %d keys", p, info, len(want))
	}
	checkStore(t, s, want, 100)
	for k, e := range putAll(t, s, 20, "b") {
		want[k] = e
	}
	checkStore(t, s, want, 120)
}

func TestStoreOnFile(t *testing.T) {
	storeOn(t, newDisk(t, t.TempDir(), 1<<20), true)
}

// TestStoreWithoutODirect runs the store as it runs where O_DIRECT is
// refused (tmpfs before Linux 6.6): it writes through the page cache and
// fdatasync, and Verify drops the file's cached pages before reading.
func TestStoreWithoutODirect(t *testing.T) {
	tryDirect = false
	defer func() { tryDirect = true }()
	storeOn(t, newDisk(t, t.TempDir(), 1<<20), false)
}

// TestStoreOnLoopDevice runs the store on a real block device: a loop
// device over a file, with 512-byte and with 4 KiB logical blocks.
func TestStoreOnLoopDevice(t *testing.T) {
	for _, lbs := range []int{512, 4096} {
		t.Run(fmt.Sprint(lbs), func(t *testing.T) {
			dev := loopDevice(t, newDisk(t, t.TempDir(), 1<<20), lbs)
			storeOn(t, dev, true)
		})
	}
}

// loopDevice attaches file to a free loop device with logical block size
// lbs, for the test's duration; it skips the test where it cannot.
func loopDevice(t *testing.T, file string, lbs int) string {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no loop devices here: %v", err)
	}
	defer ctl.Close()
	backing, err := os.OpenFile(file, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer backing.Close()
	for range 5 { // another process may take the free device first
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			t.Skipf("no free loop device: %v", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			t.Skipf("open %s: %v", dev, err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: uint32(lbs)}
		if err := unix.IoctlLoopConfigure(int(f.Fd()), &cfg); err != nil {
			f.Close()
			if errors.Is(err, unix.EBUSY) {
				continue
			}
			t.Skipf("configure %s: %v", dev, err)
		}
		t.Cleanup(func() {
			if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil {
				t.Errorf("detach %s: %v", dev, err)
			}
			f.Close()
		})
		got, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKSSZGET)
		if err != nil || got != lbs {
			t.Fatalf("%s: logical block size %d, %v, want %d", dev, got, err, lbs)
		}
		return dev
	}
	t.Skip("no loop device stayed free")
	return ""
}

// writeSlot overwrites one slot of the log file.
func writeSlot(t testing.TB, p string, slot uint64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, int64(slot*RecordSize)); err != nil {
		t.Fatal(err)
	}
}

func readSlot(t testing.TB, p string, slot uint64) []byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, RecordSize)
	if _, err := f.ReadAt(b, int64(slot*RecordSize)); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTornTail: a write that never completed (its slot holds a damaged
// record) ends the log; the next PUT takes the slot.
func TestTornTail(t *testing.T) {
	p := newDisk(t, t.TempDir(), 1<<20)
	s := mustOpen(t, p)
	want := putAll(t, s, 10, "a")
	s.Close()
	torn := encode(t, Record{Kind: kindPut, LogID: 1, Seq: 11, Key: "torn", Value: "write"})
	torn[offValue] ^= 0xff
	writeSlot(t, p, 11, torn)

	s = mustOpen(t, p)
	checkStore(t, s, want, 10)
	if seq, err := s.Put("after", "torn"); err != nil || seq != 11 {
		t.Fatalf("Put after a torn tail = %d, %v, want 11", seq, err)
	}
	want["after"] = Entry{"torn", 11}
	s.Close()
	checkStore(t, mustOpen(t, p), want, 11)
}

// TestReusedDisk: a disk whose header was cleared is formatted with a new
// log id, and the old log's records after it are never read as the new
// log's.
func TestReusedDisk(t *testing.T) {
	p := newDisk(t, t.TempDir(), 1<<20)
	s := mustOpen(t, p)
	putAll(t, s, 50, "old")
	s.Close()
	writeSlot(t, p, 0, make([]byte, RecordSize))

	s = mustOpen(t, p)
	if !s.Info().Formatted {
		t.Fatal("a disk with its header cleared was not formatted")
	}
	want := putAll(t, s, 3, "new")
	s.Close()
	s = mustOpen(t, p)
	checkStore(t, s, want, 3)
	if _, ok := s.Get("key20"); ok {
		t.Error("a record of the old log came back")
	}
}

// TestHole: a record lost in the middle of the log (or a damaged header)
// is refused as corruption, never silently cut off.
func TestHole(t *testing.T) {
	p := newDisk(t, t.TempDir(), 1<<20)
	s := mustOpen(t, p)
	want := putAll(t, s, 20, "a")
	checkStore(t, s, want, 20)
	slot5 := readSlot(t, p, 5)
	bad := append([]byte(nil), slot5...)
	bad[offKey] ^= 1
	writeSlot(t, p, 5, bad)
	if v, err := s.Verify(); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Verify() with slot 5 damaged = %+v, %v, want ErrCorrupt", v, err)
	}
	s.Close()
	if _, err := Open(p); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Open with slot 5 damaged = %v, want ErrCorrupt", err)
	}

	writeSlot(t, p, 5, slot5)
	hdr := readSlot(t, p, 0)
	hdr[offLogID] ^= 1
	writeSlot(t, p, 0, hdr)
	if _, err := Open(p); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "header") {
		t.Errorf("Open with a damaged header = %v, want ErrCorrupt naming the header", err)
	}
}

// TestVerifyFindsChangedRecord: Verify reads the device, not memory or the
// page cache: a record changed underneath the store is a mismatch.
func TestVerifyFindsChangedRecord(t *testing.T) {
	p := newDisk(t, t.TempDir(), 1<<20)
	s := mustOpen(t, p)
	putAll(t, s, 5, "a") // key0..key4 in slots 1..5
	hdr, err := DecodeRecord(readSlot(t, p, 0))
	if err != nil {
		t.Fatal(err)
	}
	writeSlot(t, p, 3, encode(t, Record{Kind: kindPut, LogID: hdr.LogID, Seq: 3, Key: "key2", Value: "changed"}))
	v, err := s.Verify()
	if err != nil || v.Mismatched != 1 || v.Matched != 4 || v.Records != 5 || v.OK(5) {
		t.Errorf("Verify() with record 3 changed on the disk = %+v, %v, want 1 mismatched, 4 matched", v, err)
	}
}

func TestFull(t *testing.T) {
	p := newDisk(t, t.TempDir(), 2*BlockSize) // 16 slots: the header and 15 records
	s := mustOpen(t, p)
	if c := s.Info().Capacity; c != 15 {
		t.Fatalf("Capacity = %d, want 15", c)
	}
	want := putAll(t, s, 15, "a")
	if _, err := s.Put("one", "more"); !errors.Is(err, ErrFull) {
		t.Errorf("Put into a full log = %v, want ErrFull", err)
	}
	checkStore(t, s, want, 15)
}

func TestOpenRefuses(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(newDisk(t, dir, BlockSize-1)); err == nil || !strings.Contains(err.Error(), "too small") {
		t.Errorf("Open(tiny file) = %v, want too small", err)
	}
	if _, err := Open(dir); err == nil {
		t.Error("Open(a directory) succeeded")
	}
	if _, err := Open(filepath.Join(dir, "none")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) = %v, want ErrNotExist", err)
	}
	// A disk with text at its start is formatted (the service owns it).
	p := newDisk(t, t.TempDir(), 1<<20)
	writeSlot(t, p, 0, []byte("some text\n"))
	if s := mustOpen(t, p); !s.Info().Formatted {
		t.Error("a disk with text at its start was not formatted")
	}
}

func TestPutRefuses(t *testing.T) {
	s := mustOpen(t, newDisk(t, t.TempDir(), 1<<20))
	for _, kv := range [][2]string{{"", "v"}, {"k", ""}, {"a b", "v"}, {"k", "a\tb"}, {strings.Repeat("k", MaxKey+1), "v"}, {"k", strings.Repeat("v", MaxValue+1)}, {"k\xff", "v"}} {
		if _, err := s.Put(kv[0], kv[1]); err == nil {
			t.Errorf("Put(%q, %q) succeeded", kv[0], kv[1])
		}
	}
	if _, n := s.Count(); n != 0 {
		t.Errorf("refused PUTs wrote %d records", n)
	}
}
