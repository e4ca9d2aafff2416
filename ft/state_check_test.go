package ft

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/arch/kvmtest"
	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
)

// TestCorruptMachineStateRefused: a live primary whose checkpoint carries a
// machine state with an inconsistent virtio queue (the corrupt-state
// failpoint moves a ready queue's used ring past the end of guest memory;
// the state decodes and its digest is right) is refused by the
// intermediary before it acknowledges it: the link ends with CodeIncomplete
// naming the machine state, ServePrimary returns ErrRefused (which the
// intermediary's role loop answers by serving the next link, not by a
// failover), the intermediary stays at the epoch before and does not fence
// the primary. The primary reconnects, sends a full image, and is served
// again: the intermediary acknowledges epochs past the refused one, and the
// state it holds then passes the same check.
func TestCorruptMachineStateRefused(t *testing.T) {
	kvmtest.Require(t)
	const memSize = 64 << 20
	g := newDiskGuest(t, memSize, 1<<20) // a virtio-blk device with a ready queue
	ilog, itl := newTestLog()
	in, err := NewIntermediary(memSize, ilog)
	if err != nil {
		t.Fatal(err)
	}
	in.SetDiskDir(t.TempDir())
	const bad = 6
	failAt = armedFailpoint{failCorruptState, bad}
	stateCorrupted.Store(false)
	defer func() { failAt = armedFailpoint{}; stateCorrupted.Store(false) }()

	type ended struct {
		err    error
		epoch  uint64 // the intermediary's, as the link ended
		fenced bool
	}
	first := make(chan ended, 1)
	var dials atomic.Int32
	dial := func(ctx context.Context) (MessageConn, error) {
		n := dials.Add(1)
		pc, ic := link(t, memSize)
		go func() {
			err := in.ServePrimary(ic)
			if n == 1 {
				first <- ended{err, in.Image().Epoch(), in.Fenced()}
			}
		}()
		return pc, nil
	}
	p, err := NewPrimary(g.m, nil, PrimaryConfig{Interval: 5 * time.Millisecond, Redial: 10 * time.Millisecond, DiskSeedDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	plog, ptl := newTestLog()
	ctx, kill := context.WithCancel(context.Background())
	defer kill()
	machineDone := make(chan error, 1)
	go func() { _, err := g.m.Run(ctx); machineDone <- err }()
	protected := make(chan error, 1)
	go func() { protected <- p.Protect(ctx, dial, plog) }()

	var e ended
	select {
	case e = <-first:
	case <-time.After(60 * time.Second):
		t.Fatal("the intermediary did not end the first link")
	}
	if !errors.Is(e.err, ErrRefused) || !errors.Is(e.err, ErrBadCheckpoint) || !errors.Is(e.err, vmm.ErrBadState) ||
		!strings.Contains(e.err.Error(), "machine state") || !strings.Contains(e.err.Error(), "used ring") {
		t.Errorf("ServePrimary with a corrupt machine state at epoch %d = %v, want ErrRefused naming the machine state's used ring", bad, e.err)
	}
	if e.epoch != bad-1 {
		t.Errorf("intermediary at epoch %d after refusing epoch %d, want %d", e.epoch, bad, bad-1)
	}
	if e.fenced {
		t.Errorf("the intermediary fenced the primary after a refusal")
	}
	itl.waitFor(t, fmt.Sprintf(`refused a checkpoint .*epoch=%d .*machine state`, bad))
	// The primary heard the refusal (CodeIncomplete) and reconnects with a
	// full image.
	ptl.waitFor(t, fmt.Sprintf(`intermediary lost \(.*peer error \(%s\): checkpoint %d: .*machine state`, regexp.QuoteMeta(wire.CodeIncomplete.String()), bad))
	ptl.waitFor(t, `intermediary reached again .*sending a full image`)
	waitFor(t, "an epoch past the refused one acknowledged", func() bool { return p.Acked() > bad+2 && in.Image().Epoch() > bad+2 })
	if in.Fenced() {
		t.Errorf("the intermediary fenced the primary")
	}
	var state []byte
	in.Image().Read(func(_, s []byte, _ uint64) { state = append([]byte(nil), s...) })
	env, err := openEnvelope(state)
	if err != nil {
		t.Fatal(err)
	}
	if err := vmm.ValidateState(env.Machine); err != nil {
		t.Errorf("the intermediary's state after the reconnection: %v", err)
	}
	kill()
	<-protected
	<-machineDone
	if n := dials.Load(); n != 2 {
		t.Logf("%d links (a link lost to load is redialed too)", n)
	}
}
