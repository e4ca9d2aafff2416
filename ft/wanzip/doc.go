// Package wanzip is the codec that makes one batch of checkpoint pages small
// for the slow intermediary→backup link: zero-page elision plus one zstd
// frame (github.com/klauspost/compress/zstd) of the remaining pages. A
// primary may use it on its own links too (LevelStore: zero pages only).
//
// It owns the byte layout of one compressed batch, its strict decoding and
// the choice of zstd level. It must not frame messages or carry epochs (that
// is ft/wire's job, which embeds these bytes in a message), decide when to
// compress (the link does: compression is optional per link), or do I/O.
//
// # Use
//
//	enc, _ := wanzip.NewEncoder(wanzip.DefaultLevel)
//	b, err := enc.AppendBatch(nil, batch.Pages) // on the intermediary
//
//	dec, _ := wanzip.NewDecoder()
//	buf := make([]byte, wanzip.BufSize(wire.MaxBatchPages))
//	pages, err := dec.DecodeBatch(b, wire.MaxBatchPages, nil, buf) // on the backup
//
// An Encoder is for one goroutine at a time; its Stats may be read from any
// goroutine. A Decoder may be shared: concurrent DecodeBatch calls are safe
// but run one at a time (it holds one zstd decoder state).
//
// # Encoding (format version 1)
//
// Integers are unsigned LEB128 varints (encoding/binary's Uvarint) in their
// shortest form; a longer form of the same value is refused.
//
//	field        size              meaning
//	version      1 byte            FormatVersion (1)
//	flags        1 byte            none defined in version 1: must be 0
//	count        varint            n, the number of pages, 1..wire.MaxBatchPages
//	first PFN    varint            page frame number of page 0
//	PFN gaps     n-1 varints       PFN[i] - PFN[i-1] - 1 (PFNs strictly ascend, so
//	                               a run of consecutive pages costs 1 byte a page)
//	zero bitmap  ceil(n/8) bytes   bit i%8 (LSB first) of byte i/8 is set when page i
//	                               is all zero; such a page carries no data. Unused
//	                               bits of the last byte must be 0
//	data         the rest          absent when every page is zero; otherwise exactly
//	                               one zstd frame (RFC 8878) whose content is the data
//	                               pages (bit clear) concatenated in page order
//
// Every PFN is at most wire.MaxPFN. The frame must declare its content size,
// which must equal (data pages × wire.PageSize); it carries a content
// checksum, uses no dictionary and ends the encoding (no skippable frame,
// no second frame, no trailing bytes). A page marked as data must not be all
// zero, so each batch has one bitmap and the encoder's choice is never
// ambiguous. The encoding carries no epoch and no length: the enclosing
// message does.
//
// # Stored frames
//
// LevelStore elides the zero pages and sends the rest as they are: its data
// is one zstd frame of raw blocks (block type 0, at most 128 KiB each) with
// a 128 KiB window, a 4-byte content size and the content checksum (xxHash64,
// as every zstd frame's). It is an ordinary frame under the rules above, so
// a decoder reads it without knowing the level; it costs the sender a copy
// and a checksum of the data pages, no compressor. It is for links where
// bytes are cheap but zero pages are many: a fresh guest's first image is
// mostly zero pages (the primary's --compress store).
//
// # Decoding hostile input
//
// DecodeBatch treats its input as coming from a network peer. It checks the
// count against the caller's limit and wire.MaxBatchPages, and that the
// input holds at least one byte per PFN and the whole bitmap, before it
// allocates anything sized by the count. It walks the zstd frame's block
// headers (without decompressing) to check the frame's structure, that it
// ends exactly at the end of the input, and that its blocks can produce the
// declared size at all. Only then does it decompress, into a destination
// whose capacity is the expected size plus BufSize's slack of one zstd block,
// with the zstd decoder limited to that capacity (WithDecodeAllCapLimit),
// to wire.MaxBatchPages pages in all (WithDecoderMaxMemory) and to that window
// (WithDecoderMaxWindow). So a "zip bomb" stops after at most one block past
// the declared size, inside memory already sized for the batch. Every error
// wraps ErrCorrupt.
//
// # Level
//
// DefaultLevel is LevelFastest (zstd's "fastest", about zstd -1). Measured
// with BenchmarkWANCompress on this 2-core host (busy with other work, so
// speeds vary by ±20%), one core, its 41 MiB guest-memory-like input, 58%
// zero pages: fastest encoded 1090–1110 MiB/s to ratio 0.153, default
// (about zstd -3) 820–850 MiB/s to 0.151. On the input's code and data
// pages alone, default's output is 5% smaller (0.415 against 0.437); on its
// guest pages (0.0007) and random pages (1.0003) the levels tie. Default costs
// about a third more CPU per byte for 1–5% fewer bytes, while fastest already
// compresses about ninety times faster than a 100 Mbit/s link carries bytes, so
// fastest it is; the link can choose another Level.
//
// # Benchmark
//
//	go test -run '^$' -bench . -benchtime 1x ./ft/wanzip/
//
// prints one line
//
//	bench ft-wan-compress: ratio=X mib_s=Y zero_pages_pct=Z level=L input_mib=M decode_mib_s=D memcpy_mib_s=C
//
// ratio is encoded bytes / raw page bytes (smaller is better: 0.25 means the
// link carries a quarter of the bytes); mib_s and decode_mib_s are raw page
// MiB encoded and decoded per second on one core; memcpy_mib_s is copying the
// same pages page by page in the same run, the anchor the speeds read
// against. The input is guest-memory-like and built from real bytes (see
// BenchmarkWANCompress): the whole memory of a counter payload guest after it
// ran (32 MiB, mostly zero pages), the pages of the test binary itself (x86
// code and data; about 5 MiB as go test builds it), and 4 MiB of random pages
// standing for compressed or encrypted data. It needs /dev/kvm and skips,
// saying so, without it. Pass -args -wanzip.level=default to measure another
// level.
package wanzip
