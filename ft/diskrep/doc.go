// Package diskrep keeps the backup's copy of a protected guest's disk: a
// replica that advances only by whole epochs, in step with the backup's
// memory image, so that after a failover the guest finds on its disk
// exactly what it had written by the committed epoch.
//
// Disk writes are state, not output (DESIGN.md section 4): the primary
// writes its disk at once, harvests at each checkpoint the blocks the
// guest wrote in the epoch (vmm.Machine.TakeDiskWrites, one
// virtio.DiskWrites per disk: the written ranges' bytes, a CRC-32C per
// range and the disk's fingerprint after them) and ships them in the
// checkpoint. The backup, per disk:
//
//	r, err := diskrep.Open(path, size) // recovers from a crash; not seeded the first time
//	err = r.Seed(epoch, src, size, fp) // with the full image: the whole disk, verified
//	...
//	err = r.Stage(e, writes)           // epoch e's writes arrived: journal them (fsync), disk untouched
//	// ... when the memory image commits epoch s (every epoch up to s is staged):
//	err = r.Commit(s)                  // apply every staged epoch up to s to the disk (fsync), record s
//	...
//	path, fp, err := r.Activate()      // failover: the guest's disk from now on;
//	                                   // blk.SetFingerprint(fp) spares the restore a read of it
//
// Every epoch is staged, one without writes too, in order; Commit(s)
// commits all staged epochs up to s at once, as the backup's image
// commits a hold-back sync covering several epochs, and keeps later ones
// staged. Staged epochs do not survive a restart (Open discards them),
// just as the memory image's staged pages do not.
//
// Stage refuses writes that would not give the primary's fingerprint (a
// tracking bug, a corrupt or misrouted checkpoint, a lost epoch), with
// nothing changed, by hashing again only the 64 KiB chunks the writes
// touch. Commit is crash-safe: it makes a commit entry durable in the
// journal before it touches the disk, so Open finds either no commit
// beyond the recorded epoch (the disk is the previous epoch's) or a
// complete one, whose writes it applies again (the same bytes to the same
// places: idempotent). Journal entries are chained by their CRC-32C, so a
// valid commit entry implies every entry before it is intact. Open then
// fingerprints the whole disk and compares it with the epoch record, so a
// replica that is not exactly its recorded epoch is never used
// (ErrCorrupt: Remove, Open, Seed).
//
// Files, next to the disk: <disk>.journal (staged epochs and commit
// entries), <disk>.epoch (two checksummed slots written alternately: the
// committed epoch, whether the replica is seeded, the disk's fingerprint),
// and <disk>.seed while a seed is written. The package owns these files and
// the disk file until Activate or Close; nothing else may write them.
//
// Cost of an epoch staged and committed alone: four fdatasyncs (the
// writes entry, the commit entry, the disk, the record), the data written
// twice (journal and disk) and the touched chunks hashed; see
// BenchmarkDiskWrites for the ratio against writing the same bytes once
// with one fsync. A commit that leaves later epochs staged also rewrites
// the journal with them (one more fsync and a rename).
//
// # Hot blocks at the intermediary
//
// The intermediary does not hold back hot disk blocks the way it holds back
// hot pages: it forwards every epoch's DiskWrites to the backup as they
// come. Holding back pays off for memory because a hot page is rewritten
// many times per second and only its latest version matters, and because
// pages are the bulk of a checkpoint. Disk writes are neither: a guest's
// rewrites of one block within seconds are rare beside its page churn (the
// page cache absorbs them; what reaches the disk is mostly journal and
// data written once), an epoch's disk bytes are small beside its dirty
// pages, and holding a block back would make the backup's disk lag its
// memory, so that each sync would have to merge and ship the held blocks
// before the epoch could commit, lengthening the failover path. Forwarding
// each epoch as it is keeps the backup's disk and memory on the same
// epoch with no merge logic. If measurements ever show hot blocks
// dominating (a database rewriting its log head), merging consecutive
// epochs' writes at the intermediary (later ranges win) is the place to
// add it.
package diskrep
