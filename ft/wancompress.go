package ft

import (
	"fmt"
	"io"
	"sync/atomic"

	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// Compression of page batches: on the intermediary→backup link (the WAN,
// Intermediary.SetWANCompression) and on a primary's links
// (PrimaryConfig.Compression), the sender sends every page batch as a
// wire.CompressedBatch (zero-page elision and zstd, or zero-page elision
// alone at wanzip.LevelStore) with the pages' end-to-end sums beside it;
// the intermediary and the backup accept either form and verify the same
// sums.

// compressingConn sends PageBatch messages compressed.
type compressingConn struct {
	MessageConn
	enc  *wanzip.Encoder
	buf  []byte
	sums []uint32
	// Page bytes handed in and bytes put on the link for them.
	raw, wire *atomic.Uint64
}

func (c *compressingConn) WriteMessage(m wire.Message) error {
	pb, ok := m.(*wire.PageBatch)
	if !ok {
		return c.MessageConn.WriteMessage(m)
	}
	var err error
	c.buf, err = c.enc.AppendBatch(c.buf[:0], pb.Pages)
	if err != nil {
		return fmt.Errorf("compress page batch of epoch %d: %w", pb.Epoch, err)
	}
	c.raw.Add(uint64(len(pb.Pages)) * wire.PageSize)
	c.wire.Add(uint64(len(c.buf)))
	c.sums = c.sums[:0]
	for _, p := range pb.Pages {
		c.sums = append(c.sums, p.Sum) // the end-to-end sums travel as they came
	}
	return c.MessageConn.WriteMessage(&wire.CompressedBatch{Epoch: pb.Epoch, Sums: c.sums, Data: c.buf})
}

// Close closes the link, if it can be closed.
func (c *compressingConn) Close() error {
	if cl, ok := c.MessageConn.(io.Closer); ok {
		return cl.Close()
	}
	return nil
}

// decompressingConn returns every CompressedBatch as the PageBatch it
// stands for; a batch that does not decode is a bad checkpoint.
type decompressingConn struct {
	MessageConn
	dec *wanzip.Decoder
}

func (c *decompressingConn) ReadMessage() (wire.Message, error) {
	m, err := c.MessageConn.ReadMessage()
	if err != nil {
		return nil, err
	}
	cb, ok := m.(*wire.CompressedBatch)
	if !ok {
		return m, nil
	}
	pages, err := c.dec.DecodeBatch(cb.Data, wire.MaxBatchPages, nil, nil)
	if err == nil && len(pages) != len(cb.Sums) {
		err = fmt.Errorf("%d pages for %d sums", len(pages), len(cb.Sums))
	}
	if err != nil {
		return nil, fmt.Errorf("%w: compressed page batch of epoch %d: %w", ErrBadCheckpoint, cb.Epoch, err)
	}
	for i := range pages {
		pages[i].Sum = cb.Sums[i]
	}
	return &wire.PageBatch{Epoch: cb.Epoch, Pages: pages}, nil
}

// SetPagePlace passes page placing on to the link (compressed batches are
// decoded, not placed).
func (c *decompressingConn) SetPagePlace(place func(pages int) []byte) {
	if pp, ok := c.MessageConn.(pagePlacer); ok {
		pp.SetPagePlace(place)
	}
}

// WAN compression level of the intermediary (0: off).
func (in *Intermediary) SetWANCompression(level wanzip.Level) error {
	if level != 0 && !level.Valid() {
		return fmt.Errorf("WAN compression level %v", level)
	}
	in.bmu.Lock()
	in.wanLevel = level
	in.bmu.Unlock()
	return nil
}

// wrapBackupConn returns c compressing if WAN compression is on.
func (in *Intermediary) wrapBackupConn(c MessageConn) (MessageConn, error) {
	in.bmu.Lock()
	level := in.wanLevel
	in.bmu.Unlock()
	if level == 0 {
		return c, nil
	}
	enc, err := wanzip.NewEncoder(level)
	if err != nil {
		return nil, err
	}
	return &compressingConn{MessageConn: c, enc: enc, raw: &in.wanRaw, wire: &in.wanWire}, nil
}
