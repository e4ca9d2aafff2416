package ft

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/understudy-vmm/understudy/ft/wire"
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
//
// and EPOCH is the checkpoint's epoch. Unarmed, they cost one comparison.
const failpointEnv = "UNDERSTUDY_FAILPOINT"

type failStage int

const (
	failNone failStage = iota
	failStun
	failTransfer
	failSent
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
	st := map[string]failStage{"stun": failStun, "transfer": failTransfer, "sent": failSent}[stage]
	if st == failNone {
		return armedFailpoint{}, fmt.Errorf("%q: stage must be stun, transfer or sent", s)
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
func failpointConn(c MessageConn, epoch uint64) MessageConn {
	if failAt.stage != failTransfer || failAt.epoch != epoch {
		return c
	}
	return &dyingConn{MessageConn: c, epoch: epoch}
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
