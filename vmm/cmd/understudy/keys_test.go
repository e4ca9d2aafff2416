package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
)

func TestKeysHelp(t *testing.T) {
	for _, args := range [][]string{{"keys", "--help"}, {"keys", "help"}, {"keys", "init", "--help"}, {"keys", "issue", "-h"}} {
		code, out, errs := runCLI(args...)
		if code != 0 || !strings.Contains(out+errs, "Usage") {
			t.Errorf("understudy %v = exit %d, %q %q; want 0 and a usage text", args, code, out, errs)
		}
	}
	if _, out, _ := runCLI("help"); !strings.Contains(out, "keys") {
		t.Errorf("understudy help does not list keys: %q", out)
	}
}

// TestKeysInitAndIssue makes a CA and node credentials with the command,
// then uses them for a real link.
func TestKeysInitAndIssue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	code, out, errs := runCLI("keys", "init", "--dir", dir, "--name", "test CA", "--days", "30")
	if code != 0 || !strings.Contains(out, `cluster CA "test CA", valid until`) || errs != "" {
		t.Fatalf("keys init = %d, %q, %q; want 0 and a summary", code, out, errs)
	}
	ca, err := transport.LoadCA(dir)
	if err != nil {
		t.Fatalf("LoadCA(%s) after keys init = %v", dir, err)
	}
	if d := time.Until(ca.Cert.NotAfter); d < 29*24*time.Hour || d > 31*24*time.Hour {
		t.Errorf("--days 30 gave a CA valid for %v more", d)
	}
	for _, args := range [][]string{
		{"keys", "issue", "--dir", dir, "--name", "int1", "--role", "intermediary"},
		{"keys", "issue", "--dir", dir, "--name", "pri1", "--role", "primary", "--host", "10.1.2.3,pri1.example", "--host", "::5"},
		{"keys", "issue", "--dir", dir, "--name", "bak1", "--role", "backup"},
	} {
		code, out, errs := runCLI(args...)
		if code != 0 || !strings.Contains(out, "wrote ") || errs != "" {
			t.Fatalf("understudy %v = %d, %q, %q; want 0 and a summary", args, code, out, errs)
		}
	}
	for f, mode := range map[string]os.FileMode{"ca.key": 0o600, "ca.crt": 0o644, "int1.key": 0o600, "int1.crt": 0o644, "pri1.key": 0o600} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Mode().Perm() != mode {
			t.Errorf("mode of %s = %v, %v; want %v", f, st.Mode().Perm(), err, mode)
		}
	}
	pri, err := transport.LoadCredentials(dir, "pri1")
	if err != nil {
		t.Fatalf("LoadCredentials(pri1) = %v", err)
	}
	if pri.Role() != ft.RolePrimary.Wire() || !strings.Contains(strings.Join(pri.Certificate().DNSNames, " "), "pri1.example") || len(pri.Certificate().IPAddresses) != 4 {
		t.Errorf("pri1 certificate: role %v, DNS %q, IPs %v", pri.Role(), pri.Certificate().DNSNames, pri.Certificate().IPAddresses)
	}
	bak, err := transport.LoadCredentials(dir, "bak1")
	if err != nil || bak.Role() != ft.RoleBackup.Wire() {
		t.Fatalf("LoadCredentials(bak1) = role %v, %v; want the backup role", bak.Role(), err)
	}
	inter, err := transport.LoadCredentials(dir, "int1")
	if err != nil {
		t.Fatalf("LoadCredentials(int1) = %v", err)
	}

	// The credentials work for a real link.
	l, err := transport.Listen("tcp://127.0.0.1:0", &transport.Config{Credentials: inter})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := transport.Dial(ctx, l.Addr().String(), &transport.Config{Credentials: pri, PeerName: "int1"})
	if err != nil {
		t.Fatalf("Dial(with keys issue credentials) = %v", err)
	}
	defer c.Close()
	if c.Peer().Name != "int1" || c.Peer().Role != ft.RoleIntermediary.Wire() {
		t.Errorf("Peer() = %+v, want int1 intermediary", c.Peer())
	}

	// Nothing is replaced without --force.
	before, _ := os.ReadFile(filepath.Join(dir, "ca.crt"))
	code, _, errs = runCLI("keys", "init", "--dir", dir)
	if code != exitError || !strings.Contains(errs, "ca.crt: file already exists (use --force to replace it)") || strings.Count(errs, "\n") != 1 {
		t.Errorf("keys init (again) = %d, %q; want exit 1 and one line asking for --force", code, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.crt")); string(after) != string(before) {
		t.Errorf("keys init without --force changed ca.crt")
	}
	code, _, errs = runCLI("keys", "issue", "--dir", dir, "--name", "int1", "--role", "intermediary")
	if code != exitError || !strings.Contains(errs, "int1.crt: file already exists (use --force") {
		t.Errorf("keys issue (again) = %d, %q; want exit 1 asking for --force", code, errs)
	}
	if code, _, errs = runCLI("keys", "issue", "--dir", dir, "--name", "int1", "--role", "backup", "--force"); code != 0 {
		t.Errorf("keys issue --force = %d, %q; want 0", code, errs)
	}
	if c, err := transport.LoadCredentials(dir, "int1"); err != nil || c.Role() != ft.RoleBackup.Wire() {
		t.Errorf("LoadCredentials(int1) after --force = %v, %v; want the new backup certificate", c, err)
	}
	if code, _, errs = runCLI("keys", "init", "--dir", dir, "--force"); code != 0 {
		t.Errorf("keys init --force = %d, %q; want 0", code, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.crt")); string(after) == string(before) {
		t.Errorf("keys init --force left the old ca.crt")
	}
}

// TestKeysBadInput checks each bad keys command line gives one clear error
// line and the right exit code.
func TestKeysBadInput(t *testing.T) {
	dir := t.TempDir()
	if code, _, errs := runCLI("keys", "init", "--dir", dir); code != 0 {
		t.Fatalf("keys init = %d, %q", code, errs)
	}
	empty := t.TempDir()
	tests := []struct {
		args   []string
		code   int
		errSub string
	}{
		{[]string{"keys"}, exitUsage, "Usage: understudy keys"},
		{[]string{"keys", "rotate"}, exitUsage, "understudy keys: unknown subcommand \"rotate\"\nrun 'understudy keys help' for the subcommands\n"},
		{[]string{"keys", "init"}, exitUsage, "--dir is required"},
		{[]string{"keys", "init", "--dir", dir, "extra"}, exitUsage, `unexpected argument "extra"`},
		{[]string{"keys", "init", "--dir"}, exitUsage, "flag needs an argument"},
		{[]string{"keys", "init", "--dir", empty, "--days", "0"}, exitError, "--days 0: want 1..36500"},
		{[]string{"keys", "init", "--dir", empty, "--days", "many"}, exitUsage, "invalid value"},
		{[]string{"keys", "init", "--dir", empty, "--name", ""}, exitError, "CA name"},
		{[]string{"keys", "issue", "--dir", dir}, exitUsage, "--dir and --name are required"},
		{[]string{"keys", "issue", "--name", "n"}, exitUsage, "--dir and --name are required"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "n", "--role", "witness"}, exitError, `--role: role "witness"`},
		{[]string{"keys", "issue", "--dir", dir, "--name", "n"}, exitUsage, "--role primary|intermediary|backup is required"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "../evil", "--role", "primary"}, exitError, "node name"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "ca", "--role", "primary"}, exitError, "reserved"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "n", "--role", "primary", "--host", "not a host"}, exitError, "want a DNS name or an IP"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "n", "--role", "primary", "--days", "-1"}, exitError, "--days -1"},
		{[]string{"keys", "issue", "--dir", empty, "--name", "n", "--role", "primary"}, exitError, "no such file"},
		{[]string{"keys", "issue", "--dir", dir, "--name", "n", "--colour", "red"}, exitUsage, "flag provided but not defined"},
	}
	for _, tc := range tests {
		code, _, errs := runCLI(tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.errSub) {
			t.Errorf("understudy %q = exit %d, stderr %q; want exit %d containing %q", tc.args, code, errs, tc.code, tc.errSub)
		}
		if code == exitUsage && len(tc.args) > 2 {
			checkUsageError(t, "keys "+tc.args[1], tc.args, errs)
		}
		if code == exitError && strings.Count(errs, "\n") != 1 {
			t.Errorf("understudy %q printed %d lines on stderr, want one: %q", tc.args, strings.Count(errs, "\n"), errs)
		}
	}
	// Nothing was written for the refused node names.
	for _, f := range []string{"n.crt", "n.key", "ca.crt.tmp"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			t.Errorf("a refused keys issue wrote %s", f)
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "evil.crt")); err == nil {
		t.Errorf("keys issue --name ../evil wrote outside --dir")
	}
}
