package wire

import (
	"encoding/binary"
	"hash/crc32"
)

// digestDomain separates checkpoint digests from any other CRC-32C use.
const digestDomain = "understudy checkpoint digest v2\x00"

// A Digester computes a checkpoint's digest, the CheckpointEnd.Digest:
//
//	CRC-32C(domain | epoch | base | pages | state length | flags (from the Begin)
//	        | page records added | CRC-32C(pfn u64 | sum u32, for each page record in the order sent)
//	        | CRC-32C(state bytes in offset order))
//
// Integers are little-endian. It covers the page records through their
// end-to-end sums (PageSum), not their data, so it costs nothing per page
// byte: whoever receives the pages verifies their data against the sums
// (VerifyPages) once. Pages and state are summed separately, so the sender
// may interleave PageBatch and StateBlob frames freely. Sender and receiver
// each feed it what they send or receive and compare the sums.
type Digester struct {
	begin        CheckpointBegin
	pages, state uint32
	n            uint64
}

// NewDigester starts the digest of the checkpoint that begin opens.
func NewDigester(begin CheckpointBegin) *Digester { return &Digester{begin: begin} }

// AddPage adds one page record by its PFN and sum.
func (d *Digester) AddPage(pfn uint64, sum uint32) {
	var b [12]byte
	binary.LittleEndian.PutUint64(b[:], pfn)
	binary.LittleEndian.PutUint32(b[8:], sum)
	d.pages = crc32.Update(d.pages, castagnoli, b[:])
	d.n++
}

// AddBatch adds every page record of b, in order.
func (d *Digester) AddBatch(b *PageBatch) {
	for _, p := range b.Pages {
		d.AddPage(p.PFN, p.Sum)
	}
}

// AddState adds the next bytes of the state blob.
func (d *Digester) AddState(data []byte) { d.state = crc32.Update(d.state, castagnoli, data) }

// Pages returns how many page records have been added.
func (d *Digester) Pages() uint64 { return d.n }

// Sum returns the digest of everything added so far.
func (d *Digester) Sum() uint32 {
	b := make([]byte, 0, len(digestDomain)+52)
	b = append(b, digestDomain...)
	b = binary.LittleEndian.AppendUint64(b, d.begin.Epoch)
	b = binary.LittleEndian.AppendUint64(b, d.begin.Base)
	b = binary.LittleEndian.AppendUint64(b, d.begin.Pages)
	b = binary.LittleEndian.AppendUint64(b, d.begin.StateLen)
	b = binary.LittleEndian.AppendUint32(b, d.begin.Flags)
	b = binary.LittleEndian.AppendUint64(b, d.n)
	b = binary.LittleEndian.AppendUint32(b, d.pages)
	b = binary.LittleEndian.AppendUint32(b, d.state)
	return crc32.Checksum(b, castagnoli)
}
