package main

import (
	"bytes"
	"errors"
	"log/slog"
	"testing"
)

// TestRoleLogLines: a role's reports are one human-readable line each,
// "understudy: ROLE: message key=value", with values quoted where needed;
// the links' logger shows only warnings unless --verbose.
func TestRoleLogLines(t *testing.T) {
	var b bytes.Buffer
	log, linkLog := roleLoggers(&b, "intermediary", slog.LevelWarn)
	log.Info(`primary "p1" connected (guest memory 64 MiB)`)
	log.With("epoch", 7).WithGroup("link").Warn("refused", "err", errors.New("bad digest"), "peer", "p2")
	linkLog.Info("transport: peer connected", "peer", "p1")
	linkLog.Warn("transport: refused peer", "remote", "127.0.0.1:9", "why", "")
	want := `understudy: intermediary: primary "p1" connected (guest memory 64 MiB)
understudy: intermediary: refused epoch=7 link.err="bad digest" link.peer=p2
understudy: intermediary: transport: refused peer remote=127.0.0.1:9 why=""
`
	if b.String() != want {
		t.Errorf("role log =\n%s\nwant\n%s", b.String(), want)
	}
}
