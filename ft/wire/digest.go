package wire

import (
	"crypto/sha256"
	"encoding/binary"
	"hash"
)

// digestDomain separates checkpoint digests from any other SHA-256 use.
const digestDomain = "understudy checkpoint digest v1\x00"

// A Digester computes a checkpoint's digest, the CheckpointEnd.Digest:
//
//	SHA-256(domain | epoch | base | pages | state length | flags (from the Begin)
//	        | SHA-256(pfn u64 | data, for each page record in the order sent)
//	        | SHA-256(state bytes in offset order))
//
// Integers are little-endian. Pages and state are hashed separately, so the
// sender may interleave PageBatch and StateBlob frames freely. Sender and
// receiver each feed it what they send or receive and compare the sums.
type Digester struct {
	begin        CheckpointBegin
	pages, state hash.Hash
	n            uint64
}

// NewDigester starts the digest of the checkpoint that begin opens.
func NewDigester(begin CheckpointBegin) *Digester {
	return &Digester{begin: begin, pages: sha256.New(), state: sha256.New()}
}

// AddPage adds one page record.
func (d *Digester) AddPage(pfn uint64, data []byte) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], pfn)
	d.pages.Write(b[:])
	d.pages.Write(data)
	d.n++
}

// AddBatch adds every page record of b, in order.
func (d *Digester) AddBatch(b *PageBatch) {
	for _, p := range b.Pages {
		d.AddPage(p.PFN, p.Data)
	}
}

// AddState adds the next bytes of the state blob.
func (d *Digester) AddState(data []byte) { d.state.Write(data) }

// Pages returns how many page records have been added.
func (d *Digester) Pages() uint64 { return d.n }

// Sum returns the digest of everything added so far.
func (d *Digester) Sum() [32]byte {
	h := sha256.New()
	h.Write([]byte(digestDomain))
	var b [36]byte
	binary.LittleEndian.PutUint64(b[0:], d.begin.Epoch)
	binary.LittleEndian.PutUint64(b[8:], d.begin.Base)
	binary.LittleEndian.PutUint64(b[16:], d.begin.Pages)
	binary.LittleEndian.PutUint64(b[24:], d.begin.StateLen)
	binary.LittleEndian.PutUint32(b[32:], d.begin.Flags)
	h.Write(b[:])
	h.Write(d.pages.Sum(nil))
	h.Write(d.state.Sum(nil))
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
