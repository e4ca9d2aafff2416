package transport

import (
	"errors"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// TestLiveness: an idle link whose peer sends heartbeats stays up, and the
// heartbeats never reach the reader; a peer that goes silent (it sends no
// heartbeats, as when its host dies or the link is cut without a reset) is
// declared lost after the peer timeout.
func TestLiveness(t *testing.T) {
	p := newPKI(t)
	const timeout = 300 * time.Millisecond
	l := listen(t, &Config{Credentials: p.node("int", wire.RoleIntermediary), PeerTimeout: timeout})
	alive := dial(t, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary), Heartbeat: 30 * time.Millisecond})
	srv := accept(t, l)

	// The client is idle for 3 timeouts, then sends one message: the
	// server's first read returns that message, not a heartbeat or an error.
	go func() {
		time.Sleep(3 * timeout)
		alive.WriteMessage(&wire.Ack{Epoch: 9})
	}()
	start := time.Now()
	m, err := srv.ReadMessage()
	if err != nil {
		t.Fatalf("ReadMessage() from an idle peer that sends heartbeats = %v, want its Ack after ~%v", err, 3*timeout)
	}
	if a, ok := m.(*wire.Ack); !ok || a.Epoch != 9 {
		t.Fatalf("ReadMessage() = %+v, want Ack{9} (heartbeats are not returned)", m)
	}
	if d := time.Since(start); d < 3*timeout {
		t.Errorf("ReadMessage() returned after %v, before the peer wrote (%v)", d, 3*timeout)
	}

	// A silent peer: no heartbeats.
	silent := dial(t, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary)})
	srv2 := accept(t, l)
	start = time.Now()
	_, err = srv2.ReadMessage()
	if !errors.Is(err, ErrPeerSilent) {
		t.Fatalf("ReadMessage() from a silent peer = %v, want ErrPeerSilent", err)
	}
	// Lost for its silence (ErrPeerSilent), and not before the timeout.
	if d := time.Since(start); d < timeout {
		t.Errorf("silent peer declared lost after %v, before the %v timeout", d, timeout)
	}
	// The link is closed: the peer sees it end.
	silent.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := silent.ReadMessage(); err == nil {
		t.Errorf("the silent peer's ReadMessage() after the other end gave up = nil error, want the link closed")
	}
}
