package kvstore

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// Entry is a key's value and the sequence number of the PUT that wrote it.
type Entry struct {
	Value string
	Seq   uint64
}

// Info describes an open store.
type Info struct {
	Path      string
	Direct    bool   // the log is written with O_DIRECT
	Block     int    // bytes per write
	Capacity  uint64 // PUT records the device holds
	Records   uint64 // PUT records in the log
	Keys      int
	Formatted bool // Open found no log and wrote an empty one
}

// VerifyResult is what Verify found on the device.
type VerifyResult struct {
	Records    uint64 // PUT records in the log on the device
	Keys       int    // keys in memory
	Matched    int    // keys whose value on the device is the one in memory
	Mismatched int    // keys that differ, or are on one side only
	Direct     bool   // the device was read with O_DIRECT (else the page cache was dropped first)
}

// OK reports whether the device holds exactly what memory holds.
func (v VerifyResult) OK(records uint64) bool {
	return v.Mismatched == 0 && v.Matched == v.Keys && v.Records == records
}

// Store is the key-value map and its log. It is safe for concurrent use.
type Store struct {
	mu        sync.Mutex // guards everything below
	log       *diskLog
	data      map[string]Entry
	formatted bool
}

// Open opens the store whose log is on path (a block device, or a regular
// file standing in for one), replaying the log into memory. A device with
// no log (slot 0 zero or not a record) is formatted; a damaged log is
// refused with an error wrapping ErrCorrupt.
func Open(path string) (*Store, error) {
	data := map[string]Entry{}
	l, formatted, err := openLog(path, func(r Record) { data[r.Key] = Entry{r.Value, r.Seq} })
	if err != nil {
		return nil, err
	}
	return &Store{log: l, data: data, formatted: formatted}, nil
}

// Close closes the log.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.close()
}

// Info describes the store.
func (s *Store) Info() Info {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.log
	return Info{Path: l.path, Direct: l.direct, Block: l.block, Capacity: l.slots - 1, Records: l.n, Keys: len(s.data), Formatted: s.formatted}
}

// Put stores value under key and returns the record's sequence number once
// the device has it. A key or value that ValidToken refuses is an error.
func (s *Store) Put(key, value string) (uint64, error) {
	if !ValidToken(key, MaxKey) {
		return 0, fmt.Errorf("key: want 1..%d printable bytes without spaces", MaxKey)
	}
	if !ValidToken(value, MaxValue) {
		return 0, fmt.Errorf("value: want 1..%d printable bytes without spaces", MaxValue)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	seq, err := s.log.append(key, value)
	if err != nil {
		return 0, err
	}
	s.data[key] = Entry{value, seq}
	return seq, nil
}

// Get returns key's value.
func (s *Store) Get(key string) (Entry, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.data[key]
	return e, ok
}

// Count returns the number of keys and of PUT records.
func (s *Store) Count() (keys int, records uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.data), s.log.n
}

// Sync runs sync(2) and flushes the log's device.
func (s *Store) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.sync()
}

// Verify does what a remount would: it opens the device again, reads the
// whole log from it past the page cache (O_DIRECT, or after dropping the
// file's cached pages where O_DIRECT is refused), and compares what it
// finds with memory. Writes wait while it runs.
func (s *Store) Verify() (VerifyResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f, g, err := openFile(s.log.path, false)
	if err != nil {
		return VerifyResult{}, err
	}
	defer f.Close()
	if !g.direct {
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			return VerifyResult{}, fmt.Errorf("drop the cached pages of %s: %w", s.log.path, err)
		}
	}
	disk := map[string]Entry{}
	res, err := scan(f, g, func(r Record) { disk[r.Key] = Entry{r.Value, r.Seq} })
	if err != nil {
		return VerifyResult{}, fmt.Errorf("%s: %w", s.log.path, err)
	}
	v := VerifyResult{Records: res.n, Keys: len(s.data), Direct: g.direct}
	if res.id != s.log.id {
		return v, fmt.Errorf("%s: %w: log id %#x on the device, %#x in memory", s.log.path, ErrCorrupt, res.id, s.log.id)
	}
	for k, e := range s.data {
		if d, ok := disk[k]; ok && d == e {
			v.Matched++
		} else {
			v.Mismatched++
		}
	}
	for k := range disk {
		if _, ok := s.data[k]; !ok {
			v.Mismatched++
		}
	}
	return v, nil
}
