package wire

import (
	"encoding/binary"
	"math"
)

// Backup-driven retrieval: with a manifest policy installed, the
// intermediary tells the backup, for every epoch, which pages changed and
// how often each changes (Manifest) instead of sending them; the backup asks
// for the pages it wants ahead of the next sync (PageRequest), and the
// intermediary stages them as bare PageBatches followed by Served. A request
// naming a page outside guest memory is refused with an Error
// (CodeBadRequest) that names it and the request, and changes nothing.

// MaxManifestPages bounds the pages of one Manifest; an epoch that changed
// more is described by several.
const MaxManifestPages = 1 << 16

// MaxRequestPages bounds the pages of one PageRequest (32 MiB of data).
const MaxRequestPages = 8192

// FreqOne is the fixed-point scale of a manifest frequency: a page's change
// frequency f travels as round(f × FreqOne), saturating at 65535.
const FreqOne = 256

// ManifestPage is one page of a Manifest: it changed in the manifest's epoch
// (which is its version), and Freq is its change frequency in units of
// 1/FreqOne (see FreqFixed).
type ManifestPage struct {
	PFN  uint64
	Freq uint16
}

// Frequency returns the page's change frequency.
func (p ManifestPage) Frequency() float64 { return float64(p.Freq) / FreqOne }

// FreqFixed converts a change frequency to its manifest encoding (negative
// and NaN become 0; large values saturate).
func FreqFixed(f float64) uint16 {
	switch {
	case !(f > 0):
		return 0
	case f*FreqOne >= math.MaxUint16:
		return math.MaxUint16
	}
	return uint16(math.Round(f * FreqOne))
}

// Manifest lists pages that changed in epoch Epoch (their version), with
// their change frequencies, in strictly ascending PFN order.
type Manifest struct {
	Epoch uint64
	Pages []ManifestPage
}

// Type returns TypeManifest.
func (Manifest) Type() Type { return TypeManifest }

// checkPageList checks a count and strictly ascending PFNs at most MaxPFN.
func checkPageList(t Type, n, limit int, pfn func(i int) uint64) error {
	if n == 0 || n > limit {
		return malformed(t, "%d pages (want 1..%d)", n, limit)
	}
	for i := range n {
		p := pfn(i)
		if p > MaxPFN {
			return malformed(t, "page %d: PFN %#x beyond %#x", i, p, uint64(MaxPFN))
		}
		if i > 0 && p <= pfn(i-1) {
			return malformed(t, "page %d: PFN %#x not above the previous %#x", i, p, pfn(i-1))
		}
	}
	return nil
}

func (m Manifest) check() error {
	if err := checkEpoch(TypeManifest, m.Epoch); err != nil {
		return err
	}
	return checkPageList(TypeManifest, len(m.Pages), MaxManifestPages, func(i int) uint64 { return m.Pages[i].PFN })
}

// AppendBinary appends the message body to b.
func (m Manifest) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.Pages)))
	b = growAppend(b, len(m.Pages)*10)
	for _, p := range m.Pages {
		b = binary.LittleEndian.AppendUint64(b, p.PFN)
	}
	for _, p := range m.Pages {
		b = binary.LittleEndian.AppendUint16(b, p.Freq)
	}
	return b, nil
}

// MarshalBinary returns the message body.
func (m Manifest) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Manifest) UnmarshalBinary(data []byte) error {
	const t = TypeManifest
	d := decoder{t: t, b: data}
	epoch := d.u64()
	n := int(d.u32())
	if d.err != nil {
		return d.err
	}
	if n == 0 || n > MaxManifestPages {
		return malformed(t, "%d pages (want 1..%d)", n, MaxManifestPages)
	}
	if want := 12 + n*10; len(data) != want {
		return malformed(t, "%d pages need %d bytes, payload has %d", n, want, len(data))
	}
	pfns, freqs := d.take(n*8), d.take(n*2)
	v := Manifest{Epoch: epoch, Pages: make([]ManifestPage, n)}
	for i := range v.Pages {
		v.Pages[i] = ManifestPage{PFN: binary.LittleEndian.Uint64(pfns[8*i:]), Freq: binary.LittleEndian.Uint16(freqs[2*i:])}
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// PageRequest asks the intermediary to stage the listed pages (strictly
// ascending) at the backup now, at their latest version. ID is the
// backup's, echoed by Served or quoted by a refusal.
type PageRequest struct {
	ID   uint64
	PFNs []uint64
}

// Type returns TypePageRequest.
func (PageRequest) Type() Type { return TypePageRequest }

func (m PageRequest) check() error {
	return checkPageList(TypePageRequest, len(m.PFNs), MaxRequestPages, func(i int) uint64 { return m.PFNs[i] })
}

// AppendBinary appends the message body to b.
func (m PageRequest) AppendBinary(b []byte) ([]byte, error) {
	if err := m.check(); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.ID)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(m.PFNs)))
	b = growAppend(b, len(m.PFNs)*8)
	for _, p := range m.PFNs {
		b = binary.LittleEndian.AppendUint64(b, p)
	}
	return b, nil
}

// MarshalBinary returns the message body.
func (m PageRequest) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *PageRequest) UnmarshalBinary(data []byte) error {
	const t = TypePageRequest
	d := decoder{t: t, b: data}
	id := d.u64()
	n := int(d.u32())
	if d.err != nil {
		return d.err
	}
	if n == 0 || n > MaxRequestPages {
		return malformed(t, "%d pages (want 1..%d)", n, MaxRequestPages)
	}
	if want := 12 + n*8; len(data) != want {
		return malformed(t, "%d pages need %d bytes, payload has %d", n, want, len(data))
	}
	raw := d.take(n * 8)
	v := PageRequest{ID: id, PFNs: make([]uint64, n)}
	for i := range v.PFNs {
		v.PFNs[i] = binary.LittleEndian.Uint64(raw[8*i:])
	}
	if err := v.check(); err != nil {
		return err
	}
	*m = v
	return nil
}

// Served answers PageRequest ID: Pages of its pages were staged (in the
// PageBatches just before it) at version Epoch, the intermediary's epoch
// then; the others had not changed since the backup's last sync, or were
// staged already, and the next sync brings any later change.
type Served struct {
	ID    uint64
	Epoch uint64
	Pages uint32
}

// Type returns TypeServed.
func (Served) Type() Type { return TypeServed }

// AppendBinary appends the message body to b.
func (m Served) AppendBinary(b []byte) ([]byte, error) {
	if err := checkEpoch(TypeServed, m.Epoch); err != nil {
		return b, err
	}
	b = binary.LittleEndian.AppendUint64(b, m.ID)
	b = binary.LittleEndian.AppendUint64(b, m.Epoch)
	return binary.LittleEndian.AppendUint32(b, m.Pages), nil
}

// MarshalBinary returns the message body.
func (m Served) MarshalBinary() ([]byte, error) { return m.AppendBinary(nil) }

// UnmarshalBinary decodes a message body.
func (m *Served) UnmarshalBinary(data []byte) error {
	d := decoder{t: TypeServed, b: data}
	v := Served{ID: d.u64(), Epoch: d.u64(), Pages: d.u32()}
	if err := d.finish(); err != nil {
		return err
	}
	if err := checkEpoch(TypeServed, v.Epoch); err != nil {
		return err
	}
	*m = v
	return nil
}
