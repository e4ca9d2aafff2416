package ft

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/understudy-vmm/understudy/ft/wire"
	"github.com/understudy-vmm/understudy/vmm"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// Failpoints let the fault-injection tests kill a primary at an exact
// point of the epoch loop with a real SIGKILL, which no random timing hits
// reliably. They are armed only by the environment variable
// UNDERSTUDY_FAILPOINT=STAGE@EPOCH, where STAGE is one of
//
//	stun      with the vCPUs paused, before the checkpoint is taken
//	transfer  in the middle of sending the checkpoint (after its Begin and
//	          the next message, a page batch or the state)
//	sent      after the checkpoint was sent, before its acknowledgement
//	corrupt   not a kill: one byte of the checkpoint's first page is flipped
//	          on its way out, after the digest was computed over it (a bad
//	          checkpoint from a live primary)
//	corrupt-disk  not a kill: one byte of the checkpoint's first disk
//	          writes frame is flipped on its way out, after its ranges'
//	          CRCs were computed (corrupt disk blocks from a live primary)
//	corrupt-state  not a kill: the checkpoint goes out with a machine state
//	          whose first ready virtio queue has its used ring moved past
//	          the end of guest memory. The state is re-encoded before the
//	          checkpoint is sent, so it decodes and its digest is right: only
//	          the check of the state against its memory layout
//	          (vmm.ValidateState) refuses it. The machine's own transport is
//	          untouched; a state without a ready virtio queue (a payload
//	          guest's) goes out as it is.
//
// and EPOCH is the checkpoint's epoch. Unarmed, they cost one comparison.
const failpointEnv = "UNDERSTUDY_FAILPOINT"

type failStage int

const (
	failNone failStage = iota
	failStun
	failTransfer
	failSent
	failCorrupt
	failCorruptDisk
	failCorruptState
)

var failAt = mustParseFailpoint(os.Getenv(failpointEnv))

type armedFailpoint struct {
	stage failStage
	epoch uint64
}

func mustParseFailpoint(s string) armedFailpoint {
	f, err := parseFailpoint(s)
	if err != nil {
		fmt.Fprintf(os.Stderr, "understudy: ignoring %s: %v\n", failpointEnv, err)
	}
	return f
}

func parseFailpoint(s string) (armedFailpoint, error) {
	if s == "" {
		return armedFailpoint{}, nil
	}
	stage, epoch, ok := strings.Cut(s, "@")
	if !ok {
		return armedFailpoint{}, fmt.Errorf("%q: want STAGE@EPOCH", s)
	}
	e, err := strconv.ParseUint(epoch, 10, 64)
	if err != nil || e == 0 {
		return armedFailpoint{}, fmt.Errorf("%q: epoch must be a positive integer", s)
	}
	st := map[string]failStage{"stun": failStun, "transfer": failTransfer, "sent": failSent, "corrupt": failCorrupt,
		"corrupt-disk": failCorruptDisk, "corrupt-state": failCorruptState}[stage]
	if st == failNone {
		return armedFailpoint{}, fmt.Errorf("%q: stage must be stun, transfer, sent, corrupt, corrupt-disk or corrupt-state", s)
	}
	return armedFailpoint{st, e}, nil
}

// failpoint kills this process if it is armed at stage for epoch.
func failpoint(stage failStage, epoch uint64) {
	if failAt.stage == stage && failAt.epoch == epoch {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}

// failpointConn returns c, or, if the transfer failpoint is armed for
// epoch, c wrapped so that the process dies after the checkpoint's second
// message (the one after Begin) was written.
// If the corrupt failpoint is armed for epoch, c is wrapped so that the
// checkpoint's first page goes out with one byte flipped.
func failpointConn(c MessageConn, epoch uint64) MessageConn {
	if failAt.epoch != epoch {
		return c
	}
	switch failAt.stage {
	case failTransfer:
		return &dyingConn{MessageConn: c, epoch: epoch}
	case failCorrupt:
		return &corruptingConn{MessageConn: c}
	case failCorruptDisk:
		return &diskCorruptingConn{MessageConn: c}
	}
	return c
}

// diskCorruptingConn flips one byte of the first DiskWrites frame's data:
// the last (a range's data) if it has ranges, else the first (its magic),
// so that the receiver's decoding refuses it.
type diskCorruptingConn struct {
	MessageConn
	done bool
}

func (c *diskCorruptingConn) WriteMessage(m wire.Message) error {
	if d, ok := m.(*wire.DiskWrites); ok && !c.done {
		c.done = true
		bad := *d
		bad.Data = append([]byte(nil), d.Data...) // the checkpoint's own stays intact
		at := 0
		if len(bad.Data) > 64 {
			at = len(bad.Data) - 1
		}
		bad.Data[at] ^= 0x40
		m = &bad
	}
	return c.MessageConn.WriteMessage(m)
}

type corruptingConn struct {
	MessageConn
	done bool
}

func (c *corruptingConn) WriteMessage(m wire.Message) error {
	if b, ok := m.(*wire.PageBatch); ok && !c.done {
		c.done = true
		// A copy: the checkpoint's own data stays intact.
		pages := append([]wire.Page(nil), b.Pages...)
		pages[0].Data = append([]byte(nil), pages[0].Data...)
		pages[0].Data[0] ^= 0xff
		m = &wire.PageBatch{Epoch: b.Epoch, Pages: pages}
	}
	return c.MessageConn.WriteMessage(m)
}

type dyingConn struct {
	MessageConn
	epoch  uint64
	writes int
}

func (d *dyingConn) WriteMessage(m wire.Message) error {
	err := d.MessageConn.WriteMessage(m)
	if d.writes++; d.writes == 2 {
		failpoint(failTransfer, d.epoch)
	}
	return err
}

// stateCorrupted records that the corrupt-state failpoint has fired.
var stateCorrupted atomic.Bool

// failpointState returns the machine state the checkpoint of epoch carries:
// machine itself, or, once, if the corrupt-state failpoint is armed for
// this epoch or an earlier one, a re-encoded copy whose first ready virtio
// queue has its used ring moved past the end of guest memory (machine is
// not changed). A state with no ready queue yet (a guest still booting)
// goes out unchanged, and the next epoch tries again.
func failpointState(machine []byte, epoch uint64) []byte {
	if failAt.stage != failCorruptState || epoch < failAt.epoch || stateCorrupted.Load() {
		return machine
	}
	bad, err := misplaceUsedRing(machine)
	if err != nil {
		if epoch == failAt.epoch {
			fmt.Fprintf(os.Stderr, "understudy: failpoint corrupt-state@%d: %v; trying the next epochs\n", failAt.epoch, err)
		}
		return machine
	}
	stateCorrupted.Store(true)
	fmt.Fprintf(os.Stderr, "understudy: failpoint corrupt-state@%d: checkpoint %d carries a used ring outside guest memory\n", failAt.epoch, epoch)
	return bad
}

// misplaceUsedRing returns a copy of an encoded machine state whose first
// ready virtio queue's used ring starts at the end of guest memory: a state
// that decodes (the encoding does not know the memory layout) but that no
// machine can restore.
func misplaceUsedRing(machine []byte) ([]byte, error) {
	var st vmm.MachineState
	if err := st.UnmarshalBinary(machine); err != nil {
		return nil, err
	}
	regions := st.Config.Regions
	end := regions[len(regions)-1].GPA + regions[len(regions)-1].Size
	for i, v := range st.Devices.Virtio {
		ts, id, body, err := virtio.DecodeTransportState(v)
		if err != nil {
			return nil, err
		}
		for q := range ts.Queues {
			if !ts.Queues[q].Ready {
				continue
			}
			ts.Queues[q].Device = end
			if st.Devices.Virtio[i], err = virtio.AppendTransportState(nil, id, &ts, body); err != nil {
				return nil, err
			}
			return st.MarshalBinary()
		}
	}
	return nil, errors.New("the state has no ready virtio queue")
}
