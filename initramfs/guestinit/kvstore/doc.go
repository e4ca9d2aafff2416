// Package kvstore is the key-value service that the nested Linux guest runs
// in guest.mode=kv (initramfs/guestinit): a map of short keys to short
// values kept in memory and, durably, in an append-only log on a raw block
// device (the guest's virtio-blk disk). It exists to prove that a protected
// or restored guest loses nothing it acknowledged: a write is answered only
// after the record holding it was written to the device and fdatasync
// returned, and VERIFY re-reads the whole log from the device (bypassing
// the page cache) and compares it with memory.
//
// # Disk format
//
// The device is an array of RecordSize-byte slots. Slot 0 holds the header
// record (a random log id); slot i ≥ 1 holds the i-th PUT, whose sequence
// number is i. Every record carries the log id, its own sequence number and
// a CRC-32C, so a record of an earlier log (the disk was reused) or a torn
// write ends the log instead of being read as data. Records are written in
// aligned blocks of BlockSize bytes (O_DIRECT where the file system or
// device allows it, then fdatasync); the block holding the log's tail is
// rewritten whole, with the records already in it unchanged, so a torn
// block write can only lose the record being written (a 512-byte sector is
// written atomically).
//
// # Protocol
//
// TCP, one request per line, one answer line per request; a connection
// stays open for any number of requests, and many connections may be open
// at once. On accept the server says
//
//	HELLO understudy-kv 1 instance=HEX conn=N
//
// where instance is random per server start (a client that sees another
// instance after reconnecting knows the service restarted rather than
// resumed). Requests and answers:
//
//	PUT key value    OK seq                 (value durable on the device)
//	GET key          VALUE value | MISSING
//	COUNT            COUNT keys=K records=R
//	SYNC             OK synced              (sync(2) and fdatasync of the log)
//	VERIFY           VERIFIED records=R keys=K matched=M mismatched=X direct=true|false
//	PING             PONG
//	QUIT             BYE                    (the server closes the connection)
//	POWEROFF         OK powering off        (Serve returns: the guest powers off)
//
// Keys are 1..MaxKey and values 1..MaxValue printable ASCII bytes without
// spaces (0x21..0x7e). Anything else is answered "ERR reason" and the
// connection stays usable; a line longer than MaxLine bytes is answered
// "ERR ..." once it ends. VERIFY's matched counts the keys whose value on
// the device equals the one in memory; mismatched counts keys that differ
// or exist on one side only, and records the log records found on the
// device (equal to COUNT's records when nothing was lost).
//
// The package is linked into the guest's static /init: it must stay free
// of cgo and of the VMM's packages. Its client is internal/kvclient, and
// internal/cmd/kvload drives it in tests.
package kvstore
