package transport

import (
	"context"
	"net"

	"github.com/mdlayher/vsock"
)

func listenVsock(a Addr) (net.Listener, Addr, error) {
	ln, err := vsock.ListenContextID(a.CID, a.Port, nil)
	if err != nil {
		return nil, Addr{}, err
	}
	if va, ok := ln.Addr().(*vsock.Addr); ok {
		a.Port = va.Port
	}
	return ln, a, nil
}

func dialVsock(ctx context.Context, a Addr) (net.Conn, error) {
	return vsock.DialContext(ctx, a.CID, a.Port, nil)
}
