package chaos

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/understudy-vmm/understudy/vmm"
)

// The counter payload's shape in every scenario.
const (
	counterPages = 64
	counterHot   = 8
	payloadArg   = "counter,pages=64,hot=8,cold_every=4,iterations=0,report=0"
	guestMem     = "16M"
)

// readRecords reads a records file: one decimal value per complete line (a
// last line without its newline was not completely written, so no client
// saw it).
func readRecords(path string) ([]uint64, error) {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	var out []uint64
	for _, l := range bytes.Split(bytes.TrimSuffix(b, []byte("\n")), []byte("\n")) {
		if len(l) == 0 {
			continue
		}
		v, err := strconv.ParseUint(string(l), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: bad record %q", path, l)
		}
		out = append(out, v)
	}
	return out, nil
}

// activated is what the backup resumed from.
type activated struct {
	seq   uint64   // the vCPU's sequence register (rbp)
	pages []uint64 // each counter page's sequence number (0: never written)
}

// readActivated reads a --save-activated snapshot and checks that its
// counter pages are consistent with one instant of the guest: every page
// is whole (seq, its index, ^seq) but the one the vCPU may be writing (r9),
// the hot pages hold s or s-1 for the vCPU's s, those holding s come first,
// and no cold page is ahead of s.
func readActivated(path string) (activated, error) {
	f, err := os.Open(path)
	if err != nil {
		return activated{}, err
	}
	defer f.Close()
	st, memr, err := vmm.ReadSnapshot(f)
	if err != nil {
		return activated{}, fmt.Errorf("%s: %w", path, err)
	}
	mem, err := io.ReadAll(memr)
	if err != nil {
		return activated{}, fmt.Errorf("%s: memory image: %w", path, err)
	}
	regs := st.VCPUs[0].Regs
	a := activated{seq: regs.RBP}
	base := st.Config.DataBase
	for i := range uint64(counterPages) {
		off := base + i*4096
		if off+24 > uint64(len(mem)) {
			return a, fmt.Errorf("counter page %d at %#x is outside the %d-byte image", i, off, len(mem))
		}
		seq := binary.LittleEndian.Uint64(mem[off:])
		idx := binary.LittleEndian.Uint64(mem[off+8:])
		inv := binary.LittleEndian.Uint64(mem[off+16:])
		if seq == 0 && idx == 0 && inv == 0 {
			a.pages = append(a.pages, 0)
			continue
		}
		// The page write_page is writing (its index in r9) may be caught
		// between its three stores: that is one instant too.
		writing := regs.R9 == i
		if (idx != i || inv != ^seq) && !writing {
			return a, fmt.Errorf("counter page %d is torn: seq %d, index %d, ^seq %#x (the vCPU is writing page %d)", i, seq, idx, inv, regs.R9)
		}
		a.pages = append(a.pages, seq)
	}
	s := a.seq
	for i := range counterHot {
		v := a.pages[i]
		if v != s && v+1 != s {
			return a, fmt.Errorf("hot page %d holds %d but the vCPU is at iteration %d: not one instant", i, v, s)
		}
		if i > 0 && v > a.pages[i-1] {
			return a, fmt.Errorf("hot page %d holds %d after page %d holds %d: not one instant", i, v, i-1, a.pages[i-1])
		}
	}
	for i := counterHot; i < counterPages; i++ {
		if a.pages[i] > s {
			return a, fmt.Errorf("cold page %d holds %d, ahead of the vCPU's %d", i, a.pages[i], s)
		}
	}
	return a, nil
}

// verdict checks one failover: the client's records (released by the
// primary), the backup's records, and the activated image. With noLoss the
// RPO = 0 checks apply; without (primary and intermediary lost together) a
// loss must have been reported when the client saw more than the backup has.
func verdict(client, backup []uint64, a activated, noLoss bool, reportedLoss bool) error {
	for i, v := range client {
		if v != uint64(i)+1 {
			return fmt.Errorf("the client's sequence has a gap: record %d is %d", i+1, v)
		}
	}
	last := uint64(len(client))
	if noLoss && a.seq < last {
		return fmt.Errorf("RPO violated: the backup resumed at sequence %d but the client had seen %d", a.seq, last)
	}
	if !noLoss && a.seq < last && !reportedLoss {
		return fmt.Errorf("the backup resumed at sequence %d, the client had seen %d, and no data loss was reported", a.seq, last)
	}
	for i := 1; i < len(backup); i++ {
		if backup[i] != backup[i-1]+1 {
			return fmt.Errorf("the backup's sequence has a gap: %d after %d", backup[i], backup[i-1])
		}
	}
	if len(backup) == 0 {
		return fmt.Errorf("the backup released no records")
	}
	if noLoss {
		if backup[0] > last+1 {
			return fmt.Errorf("the client saw up to %d but the backup released from %d: a gap", last, backup[0])
		}
		if backup[len(backup)-1] <= last {
			return fmt.Errorf("the backup released up to %d only, the client had seen %d", backup[len(backup)-1], last)
		}
	}
	return nil
}
