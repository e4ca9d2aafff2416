package ft

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/ft/wire"
)

// The first link of a role that dials its peer. Nodes booted together
// (the appliance's) do not come up in order: the primary's node may be
// ready seconds before its intermediary listens. So the first dial is
// retried for a while, but only on errors that may go away by themselves
// (nothing listens yet, no route yet, a reset or a timeout); a peer that
// answers and refuses (a certificate of another CA, a protocol refusal,
// a wrong role) is an error of configuration that no wait cures, and
// fails at once.

// progressEvery bounds how often the wait for a first link is reported.
const progressEvery = 5 * time.Second

// dialFirst dials peer (its role, as the log says it: "the intermediary")
// at addr until a link is up. With wait 0 it makes one attempt, as a
// role always did; otherwise it retries every retry, for at most wait,
// while the errors are transient (transientDialError), reporting the
// wait on log at once and then at most every progressEvery. It ends as
// soon as ctx does, with ctx's error.
func dialFirst(ctx context.Context, dial Dialer, peer, addr string, wait, retry time.Duration, log *slog.Logger) (MessageConn, error) {
	if wait <= 0 {
		return dial(ctx)
	}
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	var (
		last     error     // the last attempt's error that says something
		reported time.Time // when the wait was last reported
	)
	for {
		c, err := dial(wctx)
		if err == nil {
			if !reported.IsZero() {
				log.Info(fmt.Sprintf("reached %s at %s after %v", peer, addr, time.Since(start).Round(time.Millisecond)))
			}
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("waiting for %s at %s: %w", peer, addr, ctx.Err())
		}
		if wctx.Err() == nil || last == nil {
			last = err // not an attempt the end of the wait cut short
		}
		if !transientDialError(err) {
			return nil, err
		}
		if wctx.Err() != nil {
			return nil, fmt.Errorf("no link to %s at %s after waiting %v: %w", peer, addr, wait, last)
		}
		if now := time.Now(); reported.IsZero() || now.Sub(reported) >= progressEvery {
			reported = now
			log.Warn(fmt.Sprintf("waiting for %s at %s (%ds): %v", peer, addr, int(now.Sub(start).Seconds()), err))
		}
		select {
		case <-wctx.Done():
			if ctx.Err() != nil {
				return nil, fmt.Errorf("waiting for %s at %s: %w", peer, addr, ctx.Err())
			}
			return nil, fmt.Errorf("no link to %s at %s after waiting %v: %w", peer, addr, wait, last)
		case <-time.After(retry):
		}
	}
}

// mutedUntilUp returns a copy of cfg whose logger drops every record until
// the returned function is called. A wait's attempts fail in the ways its
// own reports say, at most once per progressEvery, rather than a link
// log line per attempt (a peer that closes before the handshake, say);
// the link that comes up logs as any other once unmuted.
func mutedUntilUp(cfg *transport.Config) (*transport.Config, func()) {
	c := *cfg
	h := &mutedHandler{h: orDiscard(cfg.Logger).Handler(), mute: new(atomic.Bool)}
	h.mute.Store(true)
	c.Logger = slog.New(h)
	return &c, func() { h.mute.Store(false) }
}

// mutedHandler passes records on to h unless mute is set.
type mutedHandler struct {
	h    slog.Handler
	mute *atomic.Bool
}

func (m *mutedHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return !m.mute.Load() && m.h.Enabled(ctx, l)
}

func (m *mutedHandler) Handle(ctx context.Context, r slog.Record) error {
	if m.mute.Load() {
		return nil
	}
	return m.h.Handle(ctx, r)
}

func (m *mutedHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &mutedHandler{h: m.h.WithAttrs(as), mute: m.mute}
}

func (m *mutedHandler) WithGroup(name string) slog.Handler {
	return &mutedHandler{h: m.h.WithGroup(name), mute: m.mute}
}

// transientDialError reports whether a failed dial may succeed later by
// itself: nothing listens at the address yet (refused; a reset, as vsock
// answers), no route to it yet (unreachable, network down), no answer in
// time, or a connection that ended before the handshake completed. A
// refusal the peer sent (*wire.Error), a TLS alert or a certificate that
// fails verification, and anything else, are not: they fail at once.
func transientDialError(err error) bool {
	var (
		we  *wire.Error
		ae  tls.AlertError
		cve *tls.CertificateVerificationError
	)
	if errors.As(err, &we) || errors.As(err, &ae) || errors.As(err, &cve) {
		return false
	}
	for _, t := range []error{syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE,
		syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ENETDOWN, syscall.EHOSTDOWN, syscall.ETIMEDOUT,
		io.EOF, io.ErrUnexpectedEOF, context.DeadlineExceeded} {
		if errors.Is(err, t) {
			return true
		}
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var de *net.DNSError
	return errors.As(err, &de) && (de.IsTemporary || de.IsTimeout)
}
