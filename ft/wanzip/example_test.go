package wanzip_test

import (
	"bytes"
	"fmt"

	"github.com/understudy-vmm/understudy/ft/wanzip"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// Example compresses a batch of three pages on the sending side and decodes
// it on the receiving side: a zero page costs one bitmap bit, and two pages
// of text share one zstd frame.
func Example() {
	text := bytes.Repeat([]byte("guest page "), wire.PageSize/11+1)[:wire.PageSize]
	pages := []wire.Page{
		{PFN: 0x100, Data: make([]byte, wire.PageSize)},
		{PFN: 0x101, Data: text},
		{PFN: 0x2000, Data: bytes.ToUpper(text)},
	}

	enc, err := wanzip.NewEncoder(wanzip.DefaultLevel)
	if err != nil {
		panic(err)
	}
	b, err := enc.AppendBatch(nil, pages)
	if err != nil {
		panic(err)
	}
	st := enc.Stats()
	fmt.Printf("%d pages (%d zero), %d bytes raw, %d encoded\n", st.Pages, st.ZeroPages, st.RawBytes, st.EncodedBytes)

	dec, err := wanzip.NewDecoder()
	if err != nil {
		panic(err)
	}
	buf := make([]byte, wanzip.BufSize(wire.MaxBatchPages))
	got, err := dec.DecodeBatch(b, wire.MaxBatchPages, nil, buf)
	if err != nil {
		panic(err)
	}
	for _, p := range got {
		fmt.Printf("PFN %#x: %q\n", p.PFN, p.Data[:16])
	}
	// Output:
	// 3 pages (1 zero), 12288 bytes raw, 56 encoded
	// PFN 0x100: "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
	// PFN 0x101: "guest page guest"
	// PFN 0x2000: "GUEST PAGE GUEST"
}
