// Package transport carries wire messages between Understudy nodes over
// authenticated links: TCP or vsock, selected by address (tcp://HOST:PORT,
// vsock://CID:PORT), both with mutual TLS 1.3 against the cluster CA. It
// also makes and loads the cluster's keys and certificates (what
// `understudy keys` writes).
//
// It owns addresses, credentials, the TLS and Hello handshake and the
// Conn/Listener life cycle. It must not interpret messages beyond the Hello
// (checkpoints, acknowledgements and failover belong to the ft roles), nor
// import vmm, mmu or arch.
//
// # Credentials
//
// A cluster has one CA (ca.crt, ca.key). Each node NAME has NAME.key and
// NAME.crt, signed by the CA for both TLS server and client use, with NAME
// as common name and, optionally, its role as the single organizational
// unit. Nodes load ca.crt, NAME.crt and NAME.key (LoadCredentials); only
// the machine that issues certificates needs ca.key.
//
//	ca, _ := transport.NewCA("my cluster", 0)
//	_ = transport.WriteCA(dir, ca, false)
//	crt, key, _ := ca.IssueNode(transport.NodeSpec{Name: "int1", Role: wire.RoleIntermediary})
//	_ = transport.WriteNode(dir, "int1", crt, key, false)
//	creds, _ := transport.LoadCredentials(dir, "int1")
//
// # Handshake
//
// A link is accepted when all of this holds, in order; otherwise it is
// refused, logged (log/slog) and closed, and a Listener never returns it:
//
//  1. TLS 1.3, both sides present a certificate that chains to the
//     cluster CA, is valid now and is meant for that side's use
//     (client or server authentication);
//  2. the certificate's name is a valid node name, it names at most one
//     role, and it is Config.PeerName if that is set;
//  3. the client sends a Hello; the server checks it and answers with its
//     own Hello; the client checks that and answers Ready. Either side that
//     refuses sends a wire.Error saying why instead. A Hello passes when
//     its protocol version is wire.Version, its name the certificate's,
//     its role the certificate's (if it names one) and one of
//     Config.PeerRoles (if set).
//
// So Dial returns only links the server accepted, and Accept only links
// the client accepted.
//
// The whole handshake is bounded by Config.HandshakeTimeout. After it, a
// corrupt, truncated or malformed frame closes the link with a logged error.
//
// A Listener bounds the peers it holds in the handshake (not yet
// authenticated): at most 8 from one source address and 128 in all. A
// source's newest connection makes room by dropping its own oldest; a full
// listener makes room by dropping the oldest connection of the busiest
// source that never authenticated. Sources from which a peer authenticated
// before (a primary that reconnects) are never dropped for a stranger and
// always get in. So a stranger that cannot authenticate, with idle or
// garbage connections from any number of addresses, cannot lock out the
// peers the node expects (admission.go).
//
//	l, _ := transport.Listen("tcp://:7000", &transport.Config{Credentials: creds})
//	c, _ := l.Accept(ctx)
//	m, _ := c.ReadMessage() // a *wire.CheckpointBegin, ...
//
//	c, _ := transport.Dial(ctx, "tcp://int1.example:7000", &transport.Config{Credentials: creds, PeerName: "int1"})
//	_ = c.WriteMessage(&wire.Ack{Epoch: 7})
package transport
