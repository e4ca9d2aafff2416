package wanzip

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"github.com/klauspost/compress/zstd"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// FormatVersion is the encoding's version, its first byte.
const FormatVersion = 1

// Errors, wrapped with detail; test for them with errors.Is.
var (
	// ErrCorrupt: DecodeBatch refused its input. Every DecodeBatch error
	// wraps it: a bad version, flags, count, PFN, bitmap or zstd frame, a
	// decompressed size other than the declared one, or trailing bytes.
	ErrCorrupt = errors.New("wanzip: corrupt page batch encoding")
	// ErrInvalidBatch: AppendBatch was given pages that do not form a
	// batch (the rules of wire.PageBatch: 1..wire.MaxBatchPages pages of
	// wire.PageSize bytes, PFNs strictly ascending and at most wire.MaxPFN).
	ErrInvalidBatch = errors.New("wanzip: pages do not form a valid batch")
)

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

// Level is a zstd compression level, or LevelStore.
type Level uint8

// The levels, named after klauspost/compress/zstd's, fastest first, and
// LevelStore. The zero Level selects DefaultLevel.
const (
	LevelFastest Level = 1 // zstd.SpeedFastest, about zstd -1
	LevelDefault Level = 2 // zstd.SpeedDefault, about zstd -3
	LevelBetter  Level = 3 // zstd.SpeedBetterCompression, about zstd -7
	LevelBest    Level = 4 // zstd.SpeedBestCompression, about zstd -11
	// LevelStore elides zero pages and compresses nothing: the data pages
	// go as raw zstd blocks (see "Stored frames" in the package
	// documentation), which cost a copy and a checksum, not a compressor.
	LevelStore Level = 5

	// DefaultLevel is the level chosen by measurement (see the package
	// documentation): LevelFastest.
	DefaultLevel = LevelFastest
)

var levelNames = [...]string{LevelFastest: "fastest", LevelDefault: "default", LevelBetter: "better", LevelBest: "best", LevelStore: "store"}

var levelZstd = [...]zstd.EncoderLevel{
	LevelFastest: zstd.SpeedFastest, LevelDefault: zstd.SpeedDefault,
	LevelBetter: zstd.SpeedBetterCompression, LevelBest: zstd.SpeedBestCompression,
}

// Valid reports whether l is one of the defined levels.
func (l Level) Valid() bool { return l >= LevelFastest && l <= LevelStore }

// String returns the name ParseLevel accepts.
func (l Level) String() string {
	if l.Valid() {
		return levelNames[l]
	}
	return fmt.Sprintf("level(%d)", uint8(l))
}

// ParseLevel parses "fastest", "default", "better", "best" or "store".
func ParseLevel(s string) (Level, error) {
	for l := LevelFastest; l <= LevelStore; l++ {
		if levelNames[l] == s {
			return l, nil
		}
	}
	return 0, fmt.Errorf("wanzip: compression level %q: want one of %s", s, strings.Join(levelNames[1:], ", "))
}

// maxBatchBytes is the most page data one batch holds.
const maxBatchBytes = wire.MaxBatchPages * wire.PageSize

// maxBlockSize is the largest zstd block content (RFC 8878
// Block_Maximum_Size), so the most one block can decode to.
const maxBlockSize = 128 << 10

// decodeSlack is room past the expected data for the zstd decoder: one
// block, which is as far as a frame can overshoot its declared size before
// the decoder notices, plus the decoder's own 32-byte over-allocation for
// its fast copies, rounded up.
const decodeSlack = maxBlockSize + 256

// BufSize is the buffer capacity DecodeBatch needs for a batch of n pages so
// that it decodes in place without allocating. Decoders that run for a while
// allocate BufSize(wire.MaxBatchPages) bytes once.
func BufSize(n int) int { return n*wire.PageSize + decodeSlack }

var zeroPage [wire.PageSize]byte

func isZero(p []byte) bool { return bytes.Equal(p, zeroPage[:]) }
