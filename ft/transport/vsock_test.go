package transport

import (
	"errors"
	"fmt"
	"reflect"
	"syscall"
	"testing"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// TestVsockLoopback runs the handshake and a message exchange over vsock
// on the local CID (vsock_loopback). It skips only when the kernel says it
// has no vsock transport for that (no AF_VSOCK, or no loopback transport).
func TestVsockLoopback(t *testing.T) {
	p := newPKI(t)
	var lb logBuf
	l, err := Listen(fmt.Sprintf("vsock://%d:0", vsockLocalCID), &Config{Credentials: p.node("int", wire.RoleIntermediary), Logger: lb.logger()})
	if err != nil {
		for _, errno := range []syscall.Errno{syscall.EAFNOSUPPORT, syscall.EADDRNOTAVAIL, syscall.ENODEV, syscall.EPROTONOSUPPORT, syscall.ESOCKTNOSUPPORT} {
			if errors.Is(err, errno) {
				t.Skipf("no vsock transport on this kernel; covered in the appliance tests (%v)", err)
			}
		}
		t.Fatalf("Listen(vsock) = %v", err)
	}
	defer l.Close()
	if a := l.Addr(); a.Network != NetworkVsock || a.CID != vsockLocalCID || a.Port == 0 {
		t.Errorf("Listener.Addr() = %+v, want vsock on CID %d with a port", a, vsockLocalCID)
	}
	cli := dial(t, l.Addr().String(), &Config{Credentials: p.node("pri", wire.RolePrimary), PeerName: "int"})
	srv := accept(t, l)
	if srv.Peer().Name != "pri" || cli.Peer().Name != "int" {
		t.Errorf("peers = %q / %q, want pri / int", srv.Peer().Name, cli.Peer().Name)
	}
	batch := &wire.PageBatch{Epoch: 1, Pages: []wire.Page{{PFN: 3, Data: make([]byte, wire.PageSize)}}}
	if err := cli.WriteMessage(batch); err != nil {
		t.Fatalf("WriteMessage(PageBatch) = %v", err)
	}
	if m, err := srv.ReadMessage(); err != nil || !reflect.DeepEqual(m, batch) {
		t.Errorf("ReadMessage() = %v, %v; want the batch", m, err)
	}
	// A peer from another cluster is refused over vsock too.
	if _, err := Dial(t.Context(), l.Addr().String(), &Config{Credentials: newPKI(t).node("pri", wire.RolePrimary)}); err == nil {
		t.Errorf("Dial(vsock, foreign CA) = nil error")
	}
	lb.waitFor(t, "refused peer")
}

// vsockLocalCID is VMADDR_CID_LOCAL, the loopback context ID.
const vsockLocalCID = 1
