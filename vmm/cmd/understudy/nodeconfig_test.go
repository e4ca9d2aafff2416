package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// TestNodeConfig makes keys with `keys`, a config disk with `node-config`,
// and reads the disk back as the appliance does: the credentials it holds
// load as the node's.
func TestNodeConfig(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	for _, args := range [][]string{{"keys", "init", "--dir", keys}, {"keys", "issue", "--dir", keys, "--name", "node-2", "--role", "intermediary"}} {
		if code, _, errs := runCLI(args...); code != 0 {
			t.Fatalf("understudy %v = %d: %s", args, code, errs)
		}
	}
	guest := filepath.Join(dir, "guest.img")
	if err := os.WriteFile(guest, []byte("the guest's disk"), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "node2.cfg")
	crt, key := transport.NodeFiles(keys, "node-2")
	args := []string{"node-config", "--out", out, "--role", "intermediary", "--ca", filepath.Join(keys, transport.CACertFile), "--cert", crt, "--key", key,
		"--args", "--listen tcp://192.0.2.12:7401 --backup tcp://192.0.2.13:7402", "--file", "guest.img=" + guest}
	code, stdout, errs := runCLI(args...)
	if code != 0 || !strings.Contains(stdout, `node "node-2", role intermediary, 1 files; give it to the node as a read-only virtio disk: -drive file=`+out+",format=raw,if=virtio,readonly=on") {
		t.Fatalf("node-config = %d, %q, %q", code, stdout, errs)
	}
	if st, err := os.Stat(out); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("config disk: %v, %v; want mode 0600 (it holds the key)", st.Mode(), err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var file bytes.Buffer
	c, err := appliance.ReadNodeConfig(bytes.NewReader(b), int64(len(b)), func(name string, size int64) (io.Writer, error) { return &file, nil })
	if err != nil {
		t.Fatalf("ReadNodeConfig(node-config's disk) = %v", err)
	}
	if c.Role != "intermediary" || c.Name != "node-2" || c.Args != "--listen tcp://192.0.2.12:7401 --backup tcp://192.0.2.13:7402" || file.String() != "the guest's disk" {
		t.Errorf("read back role %q name %q args %q file %q", c.Role, c.Name, c.Args, file.String())
	}
	creds, err := transport.NewCredentials(c.CACert, c.Cert, c.Key)
	if err != nil || creds.Name() != "node-2" {
		t.Errorf("the disk's credentials: %v", err)
	}
	if code, _, errs := runCLI(args...); code != exitError || !strings.Contains(errs, "use --force to replace it") {
		t.Errorf("node-config over an existing disk = %d, %q; want a refusal", code, errs)
	}
	if code, _, errs := runCLI(append(args, "--force")...); code != 0 {
		t.Errorf("node-config --force = %d, %q", code, errs)
	}

	// The primary's role is run; "primary", as its certificate says, is
	// the same.
	if code, _, errs := runCLI("keys", "issue", "--dir", keys, "--name", "node-1", "--role", "primary"); code != 0 {
		t.Fatalf("keys issue: %s", errs)
	}
	crt1, key1 := transport.NodeFiles(keys, "node-1")
	for _, role := range []string{"primary", "run"} {
		p := filepath.Join(t.TempDir(), "p.cfg")
		code, stdout, errs := runCLI("node-config", "--out", p, "--role", role, "--ca", filepath.Join(keys, transport.CACertFile), "--cert", crt1, "--key", key1)
		if code != 0 || !strings.Contains(stdout, `node "node-1", role run, 0 files`) {
			t.Errorf("node-config --role %s = %d, %q, %q", role, code, stdout, errs)
		}
	}
	for _, tt := range []struct {
		mod  func([]string) []string
		code int
		want string
	}{
		{func(a []string) []string { return a[:3] }, exitUsage, "--out, --role, --ca, --cert and --key are required"},
		{func(a []string) []string { a[4] = "backup"; return a }, exitError, `is node "node-2"'s certificate for role intermediary, not backup`},
		{func(a []string) []string { a[4] = "test"; return a }, exitUsage, `--role "test": want run (or primary), intermediary or backup`},
		{func(a []string) []string { a[12] = "--keys /k"; return a }, exitUsage, "leave --keys and --name out"},
		{func(a []string) []string { a[14] = "../x=" + guest; return a }, exitUsage, `file name "../x"`},
		{func(a []string) []string { a[10] = filepath.Join(keys, transport.CACertFile); return a }, exitError, "node key pair"},
	} {
		a := tt.mod(append([]string{}, args...))
		a[2] = filepath.Join(t.TempDir(), "x.cfg")
		code, _, errs := runCLI(a...)
		if code != tt.code || !strings.Contains(errs, tt.want) {
			t.Errorf("understudy %v = %d, %q; want %d and %q", a, code, errs, tt.code, tt.want)
		}
		if _, err := os.Stat(a[2]); err == nil {
			t.Errorf("understudy %v left %s", a, a[2])
		}
	}
}
