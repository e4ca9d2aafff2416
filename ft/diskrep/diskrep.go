package diskrep

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"syscall"

	"github.com/understudy-vmm/understudy/vmm/virtio"
	"golang.org/x/sys/unix"
)

// Errors a Replica wraps.
var (
	// ErrNotSeeded: the replica has no disk content yet (or lost it in a
	// crash during Seed); it needs a Seed before it can stage epochs.
	ErrNotSeeded = errors.New("disk replica is not seeded")
	// ErrFingerprint: a seed, or an epoch's writes applied to the replica,
	// would not give the disk the primary fingerprinted. Nothing changed.
	ErrFingerprint = errors.New("disk fingerprint mismatch")
	// ErrCorrupt: Open found a disk whose content is not the one its
	// epoch record names (changed by something else, or damaged). The
	// replica must be seeded again (Remove, Open, Seed).
	ErrCorrupt = errors.New("disk replica is corrupt")
	// ErrEpoch: an epoch that is not after the committed one, or a Commit
	// of an epoch that is not the staged one.
	ErrEpoch = errors.New("disk replica epoch out of order")
	// ErrBroken: an earlier Commit or Seed failed halfway; the replica
	// refuses everything until it is opened again, which recovers it.
	ErrBroken = errors.New("disk replica broken by an earlier failure; open it again")
)

// Replica is the backup's copy of one of the guest's disks, advanced only
// by whole epochs. It is not safe for concurrent use.
type Replica struct {
	path    string
	size    int64
	disk    *os.File
	journal *os.File
	rec     *os.File
	state   record
	fp      *virtio.Fingerprint // of the committed disk; nil while not seeded
	// staged are the epochs staged and not committed, ascending; the
	// journal holds them (and spent entries) in jlen bytes, the last
	// entry's sum jsum.
	staged []*staged
	jlen   int64
	jsum   uint32
	broken error
	// recovered says what Open did with the journal it found.
	recovered string
}

// staged is an epoch's writes, durable in the journal, with the
// fingerprint the disk will have once they and the epochs staged before
// them are applied.
type staged struct {
	epoch   uint64
	writes  *virtio.DiskWrites
	payload []byte // the writes' encoding; writes aliases it
	fp      *virtio.Fingerprint
}

// testHook, when set (by tests only), is called at each step of Stage,
// Commit and Seed: "stage-partial" (half an entry written, not synced),
// "staged", "marked" (the commit entry is durable, the disk untouched),
// "range" (i: the i-th range of the commit written, counted across its
// epochs), "applied" (the disk synced), "recorded" (the epoch record
// durable, the journal not yet compacted), "seed-written" (the verified
// seed synced in its temporary file), "seed-unrecorded" (the record says
// not seeded, the old disk still in place), "seed-renamed".
var testHook func(step string, i int)

func hook(step string, i int) {
	if testHook != nil {
		testHook(step, i)
	}
}

// JournalPath, RecordPath and SeedPath name the files a replica keeps next
// to its disk.
func JournalPath(disk string) string { return disk + ".journal" }
func RecordPath(disk string) string  { return disk + ".epoch" }
func SeedPath(disk string) string    { return disk + ".seed" }

// Open opens the replica of a disk of size bytes at path, creating it (not
// seeded, epoch 0) if there is none. It recovers from a crash: if the
// journal holds a valid commit entry of an epoch after the recorded one
// (its chain of checksums intact), the writes it commits are applied
// again, since the Commit may have written part of them; everything else
// in the journal is discarded (the disk was not touched for it). The disk
// is then exactly the last committed epoch's, which Open checks by
// fingerprinting the whole disk (one read of it) against the record; a
// mismatch is ErrCorrupt. Recovered says what was done.
func Open(path string, size int64) (*Replica, error) {
	if size <= 0 || size > virtio.MaxReplicatedDisk {
		return nil, fmt.Errorf("disk replica %s: size %d, want 1 to %d", path, size, int64(virtio.MaxReplicatedDisk))
	}
	r := &Replica{path: path, size: size}
	if err := r.open(); err != nil {
		r.closeFiles()
		return nil, fmt.Errorf("disk replica %s: %w", path, err)
	}
	return r, nil
}

func (r *Replica) open() error {
	var err error
	created := false
	r.disk, err = os.OpenFile(r.path, os.O_RDWR|syscall.O_CLOEXEC, 0)
	if errors.Is(err, fs.ErrNotExist) {
		r.disk, err = os.OpenFile(r.path, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_CLOEXEC, 0o600)
		if err == nil {
			created = true
			err = r.disk.Truncate(r.size)
		}
	}
	if err != nil {
		return err
	}
	if fi, err := r.disk.Stat(); err != nil {
		return err
	} else if !fi.Mode().IsRegular() || fi.Size() != r.size {
		return fmt.Errorf("the disk file is a %v of %d bytes, want a regular file of %d bytes", fi.Mode().Type(), fi.Size(), r.size)
	}
	if r.journal, err = os.OpenFile(JournalPath(r.path), os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600); err != nil {
		return err
	}
	if r.rec, err = os.OpenFile(RecordPath(r.path), os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC, 0o600); err != nil {
		return err
	}
	if created {
		if err := syncDir(r.path); err != nil {
			return err
		}
	}
	if r.state, err = readRecord(r.rec); err != nil {
		return fmt.Errorf("read epoch record: %w", err)
	}
	if r.state.seeded && r.state.size != uint64(r.size) {
		return fmt.Errorf("%w: the epoch record is of a disk of %d bytes, not %d", ErrCorrupt, r.state.size, r.size)
	}
	jb, err := io.ReadAll(io.NewSectionReader(r.journal, 0, 1<<62))
	if err != nil {
		return fmt.Errorf("read journal: %w", err)
	}
	entries, why := readJournal(jb, uint64(r.size))
	epoch, ws, ok := committed(entries, r.state.epoch)
	switch {
	case ok && r.state.seeded:
		var writes []*virtio.DiskWrites
		for _, e := range ws {
			w, err := virtio.DecodeDiskWrites(e.payload)
			if err != nil || w.Size != uint64(r.size) {
				return fmt.Errorf("%w: the journal commits epoch %d, but its writes of epoch %d do not decode: %v", ErrCorrupt, epoch, e.epoch, err)
			}
			writes = append(writes, w)
		}
		if len(writes) == 0 || ws[len(ws)-1].epoch != epoch {
			return fmt.Errorf("%w: the journal commits epoch %d without its writes", ErrCorrupt, epoch)
		}
		if err := r.apply(epoch, writes); err != nil {
			return fmt.Errorf("apply committed epoch %d again: %w", epoch, err)
		}
		r.recovered = fmt.Sprintf("applied the committed journal of epoch %d again (%d epochs of writes)", epoch, len(writes))
	case len(jb) > 0:
		r.recovered = fmt.Sprintf("discarded a journal of %d bytes with nothing to commit after epoch %d (%d valid entries", len(jb), r.state.epoch, len(entries))
		if why != "" {
			r.recovered += "; then " + why
		}
		r.recovered += ")"
	}
	if err := r.journal.Truncate(0); err != nil {
		return err
	}
	if !r.state.seeded {
		return nil
	}
	fp, err := virtio.NewFingerprint(r.disk, r.size)
	if err != nil {
		return err
	}
	if root := fp.Root(); rootPrefix(root) != r.state.root {
		return fmt.Errorf("%w: the disk's fingerprint %x is not epoch %d's %x", ErrCorrupt, root[:8], r.state.epoch, r.state.root[:8])
	}
	r.fp = fp
	return nil
}

// Path returns the path of the replica's disk file.
func (r *Replica) Path() string { return r.path }

// Size returns the disk's size in bytes.
func (r *Replica) Size() int64 { return r.size }

// Seeded reports whether the replica holds a disk (from Seed).
func (r *Replica) Seeded() bool { return r.state.seeded }

// Epoch returns the last committed epoch (the seed's, or that of the last
// Commit); 0 if not seeded.
func (r *Replica) Epoch() uint64 { return r.state.epoch }

// Fingerprint returns virtio.Fingerprint.Root of the committed disk (zero
// if not seeded): the one a virtio-blk state of the committed epoch names.
func (r *Replica) Fingerprint() [sha256.Size]byte {
	if r.fp == nil {
		return [sha256.Size]byte{}
	}
	return r.fp.Root()
}

// Recovered says what Open did with the journal it found ("" if there was
// none), for the log.
func (r *Replica) Recovered() string { return r.recovered }

// Staged returns the staged epochs, ascending.
func (r *Replica) Staged() []uint64 {
	out := make([]uint64, len(r.staged))
	for i, st := range r.staged {
		out[i] = st.epoch
	}
	return out
}

func (r *Replica) usable() error {
	switch {
	case r.disk == nil:
		return fmt.Errorf("disk replica %s is closed", r.path)
	case r.broken != nil:
		return fmt.Errorf("disk replica %s: %w (%v)", r.path, ErrBroken, r.broken)
	}
	return nil
}

// Stage makes epoch's writes to this disk durable in the journal without
// touching the disk, after checking them: epoch must be after the
// committed one and after every staged one, the writes must be for a disk
// of this size and follow the encoding's rules, and the disk with the
// staged epochs and these writes applied must have their fingerprint
// (w.Fingerprint), which Stage computes by hashing again only the chunks
// they touch. A refused epoch changes nothing. Every epoch is staged, one
// without writes too (its DiskWrites has no ranges; its fingerprint is
// still checked), so that Commit can name it.
func (r *Replica) Stage(epoch uint64, w *virtio.DiskWrites) error {
	if err := r.usable(); err != nil {
		return err
	}
	last, fp := r.state.epoch, r.fp
	if n := len(r.staged); n > 0 {
		last, fp = r.staged[n-1].epoch, r.staged[n-1].fp
	}
	switch {
	case !r.state.seeded:
		return fmt.Errorf("disk replica %s: stage epoch %d: %w", r.path, epoch, ErrNotSeeded)
	case epoch <= last:
		return fmt.Errorf("disk replica %s: stage epoch %d: %w: epoch %d is committed, the last staged is %d", r.path, epoch, ErrEpoch, r.state.epoch, last)
	case w == nil || w.Size != uint64(r.size):
		return fmt.Errorf("disk replica %s: stage epoch %d: writes for a disk of %v bytes, the replica has %d", r.path, epoch, sizeOf(w), r.size)
	}
	payload, err := w.AppendBinary(make([]byte, 0, w.EncodedLen()))
	if err != nil {
		return fmt.Errorf("disk replica %s: stage epoch %d: %w", r.path, epoch, err)
	}
	// The writes kept alias the payload, which nothing changes.
	dw, err := virtio.DecodeDiskWrites(payload)
	if err != nil {
		return fmt.Errorf("disk replica %s: stage epoch %d: %w", r.path, epoch, err)
	}
	fp = fp.Clone()
	ov := &overlay{base: r.disk}
	for _, st := range r.staged {
		ov.layers = append(ov.layers, st.writes)
	}
	ov.layers = append(ov.layers, dw)
	if err := fp.UpdateRanges(ov, rangesOf(dw)); err != nil {
		return fmt.Errorf("disk replica %s: stage epoch %d: %w", r.path, epoch, err)
	}
	if root := fp.Root(); root != w.Fingerprint {
		return fmt.Errorf("disk replica %s: stage epoch %d: %w: the replica with the epoch's %d writes would be %x, the primary's disk is %x",
			r.path, epoch, ErrFingerprint, len(w.Ranges), root[:8], w.Fingerprint[:8])
	}
	if err := r.appendEntry(kindWrites, epoch, payload, true); err != nil {
		return r.fail(fmt.Errorf("stage epoch %d: %w", epoch, err))
	}
	r.staged = append(r.staged, &staged{epoch: epoch, writes: dw, payload: payload, fp: fp})
	hook("staged", 0)
	return nil
}

func sizeOf(w *virtio.DiskWrites) any {
	if w == nil {
		return "no"
	}
	return w.Size
}

// appendEntry appends an entry to the journal and syncs it. split writes
// it in two halves (Stage, whose test hook stops between them).
func (r *Replica) appendEntry(kind uint16, epoch uint64, payload []byte, split bool) error {
	b, sum := appendEntry(nil, r.jsum, kind, epoch, uint64(r.size), payload)
	half := 0
	if split {
		half = len(b) / 2
		if _, err := r.journal.WriteAt(b[:half], r.jlen); err != nil {
			return err
		}
		hook("stage-partial", 0)
	}
	if _, err := r.journal.WriteAt(b[half:], r.jlen+int64(half)); err != nil {
		return err
	}
	if err := datasync(r.journal); err != nil {
		return err
	}
	r.jlen += int64(len(b))
	r.jsum = sum
	return nil
}

// Discard drops every staged epoch (the journal is cleared). The committed
// epoch is unchanged.
func (r *Replica) Discard() error {
	if err := r.usable(); err != nil {
		return err
	}
	r.staged = nil
	if err := r.resetJournal(); err != nil {
		return r.fail(err)
	}
	return nil
}

// resetJournal empties the journal. It needs no sync: a journal that
// comes back after a crash holds nothing to commit beyond the record.
func (r *Replica) resetJournal() error {
	if err := r.journal.Truncate(0); err != nil {
		return fmt.Errorf("clear journal: %w", err)
	}
	r.jlen, r.jsum = 0, 0
	return nil
}

// Commit applies every staged epoch up to epoch, which must be staged, to
// the disk: it appends a commit entry to the journal (durably), writes the
// epochs' ranges into the disk file in epoch order, syncs it, records
// epoch durably, and keeps only later staged epochs in the journal. A crash
// anywhere in it leaves either the previous epoch (before the commit entry
// is durable) or, after Open, this one: never a mix. An error halfway
// leaves the replica broken (ErrBroken) until it is opened again.
func (r *Replica) Commit(epoch uint64) error {
	if err := r.usable(); err != nil {
		return err
	}
	k := -1
	for i, st := range r.staged {
		if st.epoch == epoch {
			k = i
		}
	}
	if k < 0 {
		return fmt.Errorf("disk replica %s: commit epoch %d: %w: staged epochs are %v", r.path, epoch, ErrEpoch, r.Staged())
	}
	if err := r.appendEntry(kindCommit, epoch, nil, false); err != nil {
		return r.fail(fmt.Errorf("commit epoch %d: %w", epoch, err))
	}
	hook("marked", 0)
	done, rest := r.staged[:k+1], r.staged[k+1:]
	writes := make([]*virtio.DiskWrites, len(done))
	for i, st := range done {
		writes[i] = st.writes
	}
	if err := r.apply(epoch, writes); err != nil {
		return r.fail(fmt.Errorf("commit epoch %d: %w", epoch, err))
	}
	r.fp = done[k].fp
	r.staged = rest
	if err := r.compact(); err != nil {
		return r.fail(fmt.Errorf("commit epoch %d: %w", epoch, err))
	}
	return nil
}

// apply writes the ranges of writes (in order: later epochs win) into the
// disk, syncs it and records epoch with the last one's fingerprint.
func (r *Replica) apply(epoch uint64, writes []*virtio.DiskWrites) error {
	n := 0
	for _, w := range writes {
		for _, rg := range w.Ranges {
			if _, err := r.disk.WriteAt(rg.Data, int64(rg.Off)); err != nil {
				return fmt.Errorf("write range [%d, +%d): %w", rg.Off, len(rg.Data), err)
			}
			hook("range", n)
			n++
		}
	}
	if err := datasync(r.disk); err != nil {
		return fmt.Errorf("sync disk: %w", err)
	}
	hook("applied", 0)
	next := r.state
	next.seq++
	next.epoch = epoch
	next.root = rootPrefix(writes[len(writes)-1].Fingerprint)
	if err := writeRecord(r.rec, next); err != nil {
		return fmt.Errorf("record epoch: %w", err)
	}
	r.state = next
	hook("recorded", 0)
	return nil
}

// compact leaves in the journal only the staged epochs. With none, it
// empties the journal. Otherwise it writes them to a new journal, synced,
// and renames it into place, durably: a later commit entry must never land
// in a journal that a crash could swap for the old one.
func (r *Replica) compact() error {
	if len(r.staged) == 0 {
		return r.resetJournal()
	}
	var b []byte
	var sum uint32
	for _, st := range r.staged {
		b, sum = appendEntry(b, sum, kindWrites, st.epoch, uint64(r.size), st.payload)
	}
	tmp := JournalPath(r.path) + ".tmp"
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("compact journal: %w", err)
	}
	_, err = f.WriteAt(b, 0)
	if err == nil {
		err = datasync(f)
	}
	if err == nil {
		err = os.Rename(tmp, JournalPath(r.path))
	}
	if err == nil {
		err = syncDir(r.path)
	}
	if err != nil {
		f.Close()
		os.Remove(tmp)
		return fmt.Errorf("compact journal: %w", err)
	}
	r.journal.Close()
	r.journal, r.jlen, r.jsum = f, int64(len(b)), sum
	return nil
}

func (r *Replica) fail(err error) error {
	r.broken = err
	r.staged = nil
	return fmt.Errorf("disk replica %s: %w", r.path, err)
}

// Seed replaces the replica's disk with size bytes read from src (the
// primary's disk as of epoch, sent with the full memory image), checked
// against fingerprint (virtio.Fingerprint.Root, as the disk's virtio-blk
// state names it). The seed is written to a temporary file next to the
// disk (SeedPath; all-zero 64 KiB chunks are left as holes), fingerprinted,
// and refused with ErrFingerprint if it differs, leaving the replica as it
// was; otherwise it is synced and renamed over the disk, and the replica
// is at epoch, with nothing staged. A crash during the switch leaves a
// replica that is not seeded (never one whose record names another disk's
// content).
func (r *Replica) Seed(epoch uint64, src io.Reader, size int64, fingerprint [sha256.Size]byte) error {
	if err := r.usable(); err != nil {
		return err
	}
	if size != r.size {
		return fmt.Errorf("disk replica %s: seed of %d bytes for a disk of %d bytes", r.path, size, r.size)
	}
	fp, tmp, err := r.writeSeed(src)
	if err != nil {
		return fmt.Errorf("disk replica %s: seed: %w", r.path, err)
	}
	if root := fp.Root(); root != fingerprint {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("disk replica %s: seed of epoch %d refused: %w: it has fingerprint %x, the primary's disk %x",
			r.path, epoch, ErrFingerprint, root[:8], fingerprint[:8])
	}
	hook("seed-written", 0)
	// From here the old replica is given up: first say so durably, then
	// switch the files, then record the seed.
	r.staged = nil
	unseeded := record{seq: r.state.seq + 1}
	if err := writeRecord(r.rec, unseeded); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return r.fail(fmt.Errorf("seed: %w", err))
	}
	r.state, r.fp = unseeded, nil
	hook("seed-unrecorded", 0)
	if err := r.resetJournal(); err != nil {
		tmp.Close()
		return r.fail(fmt.Errorf("seed: %w", err))
	}
	if err := os.Rename(tmp.Name(), r.path); err != nil {
		tmp.Close()
		return r.fail(fmt.Errorf("seed: %w", err))
	}
	r.disk.Close()
	r.disk = tmp
	if err := syncDir(r.path); err != nil {
		return r.fail(fmt.Errorf("seed: %w", err))
	}
	hook("seed-renamed", 0)
	seeded := record{seq: unseeded.seq + 1, seeded: true, epoch: epoch, size: uint64(r.size), root: rootPrefix(fingerprint)}
	if err := writeRecord(r.rec, seeded); err != nil {
		return r.fail(fmt.Errorf("seed: %w", err))
	}
	r.state, r.fp = seeded, fp
	return nil
}

// writeSeed copies the seed into SeedPath, fingerprints it and syncs it.
func (r *Replica) writeSeed(src io.Reader) (*virtio.Fingerprint, *os.File, error) {
	tmp, err := os.OpenFile(SeedPath(r.path), os.O_RDWR|os.O_CREATE|os.O_TRUNC|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, nil, err
	}
	fail := func(err error) (*virtio.Fingerprint, *os.File, error) {
		tmp.Close()
		os.Remove(tmp.Name())
		return nil, nil, err
	}
	if err := tmp.Truncate(r.size); err != nil {
		return fail(err)
	}
	buf := make([]byte, virtio.FingerprintChunk)
	zero := make([]byte, virtio.FingerprintChunk)
	for off := int64(0); off < r.size; {
		p := buf[:min(int64(len(buf)), r.size-off)]
		if _, err := io.ReadFull(src, p); err != nil {
			return fail(fmt.Errorf("read the seed at %d of %d bytes: %w", off, r.size, err))
		}
		if !bytes.Equal(p, zero[:len(p)]) {
			if _, err := tmp.WriteAt(p, off); err != nil {
				return fail(err)
			}
		}
		off += int64(len(p))
	}
	fp, err := virtio.NewFingerprint(tmp, r.size)
	if err != nil {
		return fail(err)
	}
	if err := datasync(tmp); err != nil {
		return fail(err)
	}
	return fp, tmp, nil
}

// Activate ends replication at failover: it closes the replica, removes
// its journal and epoch record (the guest is about to write the disk,
// which then is no epoch's any more), and returns the disk's path for the
// machine's virtio-blk device with the committed disk's fingerprint, which
// virtio.Block.SetFingerprint takes so that the restore does not read the
// whole disk again. Staged epochs not committed are dropped.
func (r *Replica) Activate() (string, *virtio.Fingerprint, error) {
	if err := r.usable(); err != nil {
		return "", nil, err
	}
	if !r.state.seeded {
		return "", nil, fmt.Errorf("disk replica %s: activate: %w", r.path, ErrNotSeeded)
	}
	fp := r.fp
	r.staged = nil
	r.closeFiles()
	os.Remove(JournalPath(r.path) + ".tmp")
	var errs []error
	for _, p := range []string{JournalPath(r.path), RecordPath(r.path)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return "", nil, fmt.Errorf("disk replica %s: activate: %w", r.path, err)
	}
	return r.path, fp, nil
}

// Close closes the replica's files; staged epochs stay in the journal but
// the next Open discards them (nothing commits them).
func (r *Replica) Close() error {
	if r.disk == nil {
		return nil
	}
	return r.closeFiles()
}

func (r *Replica) closeFiles() error {
	var errs []error
	for _, f := range []**os.File{&r.disk, &r.journal, &r.rec} {
		if *f != nil {
			errs = append(errs, (*f).Close())
			*f = nil
		}
	}
	return errors.Join(errs...)
}

// Remove deletes a replica's disk and its side files (for a replica Open
// found corrupt, before seeding it again).
func Remove(path string) error {
	var errs []error
	for _, p := range []string{path, JournalPath(path), RecordPath(path), SeedPath(path)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("remove disk replica %s: %w", path, err)
	}
	return nil
}

// overlay reads the disk as it will be with layers of writes applied in
// order.
type overlay struct {
	base   io.ReaderAt
	layers []*virtio.DiskWrites
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	n, err := o.base.ReadAt(p, off)
	if err != nil {
		return n, err
	}
	end := uint64(off) + uint64(len(p))
	for _, w := range o.layers {
		rs := w.Ranges
		i := sort.Search(len(rs), func(i int) bool { return rs[i].Off+uint64(len(rs[i].Data)) > uint64(off) })
		for ; i < len(rs) && rs[i].Off < end; i++ {
			lo, hi := max(rs[i].Off, uint64(off)), min(rs[i].Off+uint64(len(rs[i].Data)), end)
			copy(p[lo-uint64(off):hi-uint64(off)], rs[i].Data[lo-rs[i].Off:hi-rs[i].Off])
		}
	}
	return n, nil
}

func rangesOf(w *virtio.DiskWrites) []virtio.WriteRange {
	out := make([]virtio.WriteRange, len(w.Ranges))
	for i, rg := range w.Ranges {
		out[i] = virtio.WriteRange{Off: rg.Off, Len: uint64(len(rg.Data))}
	}
	return out
}

func datasync(f *os.File) error {
	for {
		err := unix.Fdatasync(int(f.Fd()))
		if err != unix.EINTR {
			if err != nil {
				return fmt.Errorf("fdatasync %s: %w", f.Name(), err)
			}
			return nil
		}
	}
}

func syncDir(path string) error {
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory of %s: %w", path, err)
	}
	return nil
}
