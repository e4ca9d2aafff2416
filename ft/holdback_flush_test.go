package ft

import (
	"testing"
	"time"
)

// TestHoldBackEarlyFlush: epochs arrive while the backup's first re-seed is
// still on its way, and a flush (what Failover does) follows at once: the
// backup must end exactly at the intermediary's image.
func TestHoldBackEarlyFlush(t *testing.T) {
	for round := range 8 {
		const memSize = 32 << 20
		in, bk, pc := forwardRig(t, memSize, HoldBack{Threshold: 2, MaxHeld: 1 << 30, MaxLagEpochs: 10, MaxLag: time.Hour}, BackupConfig{})
		last := uint64(2 + round%4)
		for e := uint64(1); e <= last; e++ {
			cp := holdBackEpoch(e)
			if e == 1 { // a full image of all memory, as a primary sends
				cp = &Checkpoint{Epoch: 1, Kind: KindFull, State: []byte("state-1")}
				for p := uint64(0); p < memSize/4096; p++ {
					cp.PFNs = append(cp.PFNs, p)
				}
				cp.Data = make([]byte, memSize)
			}
			sendAcked(t, pc, cp, e-1)
		}
		if err := attachedBackup(in).sync(t.Context(), in, last); err != nil {
			t.Fatalf("round %d: sync(%d) = %v", round, last, err)
		}
		if !sameImage(in.Image(), bk.Image()) {
			t.Fatalf("round %d: after flushing to epoch %d the backup (at %d) differs from the intermediary", round, last, bk.Committed())
		}
	}
}
