// Package wire is the fault-tolerance wire format: the frames and messages
// that primary, intermediary and backup exchange. It owns framing (magic,
// version, type, length, CRC-32C), the byte layout of every message, their
// strict validation, the pages' end-to-end sums and the checkpoint digest. It must not do I/O policy
// (connections, TLS, retries: package ft/transport), interpret VM state (the
// StateBlob bytes are opaque here) or decide what a checkpoint means (the ft
// roles do).
//
// # Frames
//
// Every message travels in one frame. All integers are little-endian.
//
//	offset size  field
//	0      4     magic "USFT" (0x55 0x53 0x46 0x54)
//	4      1     protocol version (Version, currently 2)
//	5      1     message type (Type)
//	6      2     frame flags; none are defined in version 2, so must be 0
//	8      4     payload length in bytes, at most MaxPayload (64 MiB)
//	12     4     CRC-32C (Castagnoli) of bytes 0..11
//	16     n     payload: the message body, laid out as below
//	16+n   4     CRC-32C of the header and the covered payload
//
// The header CRC lets a Reader reject a corrupt length before it waits for
// or allocates the payload; the trailing CRC covers the header and the
// payload, except the page data of a PageBatch (the payload bytes after its
// first 16 + 12 × count, count read from payload bytes 8..11): each page
// carries its own end-to-end sum instead (see "Integrity" below). A Reader
// checks, in order: magic (ErrBadMagic), header CRC (ErrChecksum), version
// (ErrVersion, *VersionError), type (ErrUnknownType), flags (ErrMalformed),
// length (ErrTooLarge), then the trailing CRC (ErrChecksum). A stream that
// ends inside a frame gives io.ErrUnexpectedEOF; one that ends between frames
// gives io.EOF. A payload buffer grows as its bytes arrive (1 MiB first,
// then doubling), so a header that claims 64 MiB costs at most 1 MiB, or
// twice what has arrived, until the bytes are there.
//
// # Messages
//
// Decoding is strict: every length and count must match the payload size
// exactly, enums must be in range, reserved fields and unknown flag bits must
// be zero, and nothing may trail the message. Encoding applies the same rules,
// so a decoded message re-encodes to the same bytes. Strings are a length
// (u8 or u16 as noted) followed by that many bytes of valid UTF-8. Epochs
// start at 1; epoch 0 means "none".
//
//	type  name             payload layout
//	0x01  Hello            version u8 | role u8 | vm id [16] | memory size u64 | name len u8 | name
//	0x02  Heartbeat        seq u64 | send time i64 (Unix nanoseconds)
//	0x03  Error            code u16 | reason len u16 | reason (at most 1024 bytes)
//	0x04  Bye              reason len u16 | reason (at most 1024 bytes)
//	0x05  Status           role u8 | committed epoch u64 (0: none)
//	0x06  Ready            (empty)
//	0x10  CheckpointBegin  epoch u64 | base epoch u64 | pages u64 | state length u64 | flags u32
//	0x11  PageBatch        epoch u64 | count u32 | reserved u32 (0) | pfn u64 × count | sum u32 × count | page data 4096 B × count
//	0x12  StateBlob        epoch u64 | offset u64 | data (the rest of the payload, at least 1 byte)
//	0x13  CheckpointEnd    epoch u64 | pages u64 | state length u64 | digest u32
//	0x14  Ack              epoch u64
//	0x15  CompressedBatch  epoch u64 | count u32 | sum u32 × count | a PageBatch of count pages in the ft/wanzip encoding (the rest, at least 3 bytes)
//	0x16  DiskWrites       epoch u64 | disk u32 | disks u32 | part u32 | parts u32 | an encoded virtio.DiskWrites (the rest, at least 1 byte)
//	0x17  DiskSeed         epoch u64 | disk u32 | disks u32 | size u64 | offset u64 | fingerprint [32] | data (the rest, at least 1 byte)
//	0x20  Activate         epoch u64
//	0x30  Policy           version u64 | spec len u16 | spec (at most 1024 bytes of UTF-8)
//	0x31  PolicyAck        version u64
//	0x32  Manifest         epoch u64 | count u32 | pfn u64 × count | frequency u16 × count
//	0x33  PageRequest      id u64 | count u32 | pfn u64 × count
//	0x34  Served           id u64 | epoch u64 | pages u32
//
// Type numbers are grouped so later protocol versions can add messages
// without renumbering: 0x01–0x0f session control, 0x10–0x1f the checkpoint
// stream, 0x20–0x2f failover, 0x30–0x3f backup-driven retrieval (policies,
// manifests and page requests), 0x40–0xff unassigned. Type 0 is never
// valid. A type a Reader does not know is an error (ErrUnknownType): a newer
// message needs a newer protocol version, negotiated by Hello.
//
// Field rules beyond sizes: a Hello version is not 0 (whether it is one
// this node speaks is the handshake's business); a role is primary (1),
// intermediary (2) or backup (3); a node name is 1..64 bytes of [A-Za-z0-9._-] starting with a
// letter or digit; the memory size is a multiple of 4096. A checkpoint is
// either a full image (flag FlagFullImage, base epoch 0) or a delta on an
// earlier base epoch (1 ≤ base < epoch). A PageBatch holds 1..MaxBatchPages
// records with strictly ascending page frame numbers, each at most MaxPFN;
// a CompressedBatch 1..MaxBatchPages sums.
// A StateBlob chunk ends at most MaxStateLen bytes into the blob. A Policy
// has a version above 0. A Manifest lists 1..MaxManifestPages pages and a
// PageRequest 1..MaxRequestPages, both with strictly ascending page frame
// numbers, each at most MaxPFN; Manifest and Served epochs are above 0. A
// CheckpointBegin may set FlagStaged (a delta that commits the pages staged
// before it as bare PageBatches), never with FlagFullImage. Error codes
// are those listed for Code. A DiskWrites or DiskSeed names disk < disks
// <= MaxDisks and has an epoch above 0; a DiskWrites part < parts <=
// MaxDiskParts; a DiskSeed a size of 1..MaxDiskSize bytes and a chunk that
// ends within it. What a DiskWrites holds is the ft roles' to check (its
// ranges carry CRC-32Cs, see package vmm/virtio's DiskWrites).
//
// A checkpoint from the primary carries its epoch's disk writes as
// DiskWrites frames between Begin and End (every disk, every part), and a
// full image the whole of every disk as DiskSeed frames (disk after disk,
// chunks ascending from offset 0, chunks of zeros left out); the
// intermediary sends the backup each epoch's DiskWrites on their own,
// before the checkpoint that commits the epoch (see package ft's disk.go).
//
// # A checkpoint on the wire
//
//	CheckpointBegin{Epoch: e, ...}
//	PageBatch{Epoch: e, ...} and StateBlob{Epoch: e, ...}, in any interleaving
//	CheckpointEnd{Epoch: e, Pages: n, StateLen: s, Digest: d}
//
// The digest (see Digester) covers the Begin fields, every page record (its
// PFN and sum) in the order sent and the state bytes in offset order, so a
// receiver that recomputes it, and verifies each page against its sum,
// knows it holds the whole checkpoint before it sends Ack{e}.
//
// # Integrity
//
// TLS guards each hop against tampering and corruption. On top of it there
// is exactly one end-to-end check of the pages, which guards against our
// own bookkeeping (a page copied to the wrong place, staged or merged
// wrongly, or damaged in memory) anywhere from the primary's guest memory
// to the backup's: each page record carries PageSum, CRC-32C (Castagnoli)
// of its PFN and data. The primary computes it once, from the page it
// captured; the intermediary verifies it when the page arrives, keeps it
// with its image and forwards it unchanged (also compressed, and in
// re-seeds, syncs and staged pages); the backup verifies it again before it
// commits. CRC-32C is chosen because it runs near memory speed (about
// 24 GB/s here, with the SSE4.2 instruction, against SHA-256's 1.8 and
// AES-GCM's 5.6), so the check costs a small part of the TLS hop it rides
// on; it detects every burst error up to 32 bits and misplaced pages (the
// PFN is summed), which is what bookkeeping faults look like. It is not a
// cryptographic hash and need not be one: an attacker on the wire is TLS's
// business. The checkpoint digest and the frame CRCs cover only headers,
// sums and state (a few KiB per checkpoint), never the page data again.
//
// Version 1 hashed every page with SHA-256 at each end of each hop (four
// SHA-256 and four CRC-32C passes per page end to end); version 2 frames
// are refused by version 1 nodes and the other way round (ErrVersion).
package wire
