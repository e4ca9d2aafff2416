package appliance

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// testNodeConfig is a config with made-up PEM data (the format does not
// parse it; node-config checks real keys before it writes them).
func testNodeConfig(files ...ConfigFile) *NodeConfig {
	return &NodeConfig{Role: "backup", Name: "node-3", Args: "--listen tcp://192.0.2.13:7402 --records /run/understudy/out 'a b'",
		CACert: []byte("-----BEGIN CERTIFICATE-----\nca\n"), Cert: []byte("-----BEGIN CERTIFICATE-----\nnode\n"),
		Key: []byte("-----BEGIN EC PRIVATE KEY-----\nsecret\n"), Files: files}
}

func bytesFile(name string, b []byte) ConfigFile {
	return ConfigFile{Name: name, Size: int64(len(b)), Open: func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }}
}

// writeDisk writes c to a file and returns its bytes.
func writeDisk(t testing.TB, c *NodeConfig) []byte {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "node.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := WriteNodeConfig(f, c)
	if err != nil {
		t.Fatalf("WriteNodeConfig = %v", err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(b)) != n || n%nodeConfigAlign != 0 {
		t.Fatalf("WriteNodeConfig wrote %d bytes and said %d; want a whole number of %d", len(b), n, nodeConfigAlign)
	}
	return b
}

// readDisk reads a disk image, collecting its files.
func readDisk(b []byte) (*NodeConfig, map[string][]byte, error) {
	files := map[string][]byte{}
	bufs := map[string]*bytes.Buffer{}
	c, err := ReadNodeConfig(bytes.NewReader(b), int64(len(b)), func(name string, size int64) (io.Writer, error) {
		bufs[name] = new(bytes.Buffer)
		return bufs[name], nil
	})
	for n, b := range bufs {
		files[n] = b.Bytes()
	}
	return c, files, err
}

func TestNodeConfigRoundTrip(t *testing.T) {
	disk := bytes.Repeat([]byte("disk block "), 100000)
	in := testNodeConfig(bytesFile("guest.img", disk), bytesFile("empty", nil))
	b := writeDisk(t, in)
	c, files, err := readDisk(b)
	if err != nil {
		t.Fatalf("ReadNodeConfig = %v", err)
	}
	want := *in
	want.Files = []ConfigFile{{Name: "guest.img", Size: int64(len(disk)), SHA256: sha256.Sum256(disk)}, {Name: "empty", SHA256: sha256.Sum256(nil)}}
	if !reflect.DeepEqual(c, &want) {
		t.Errorf("ReadNodeConfig = %+v, want %+v", c, &want)
	}
	if !bytes.Equal(files["guest.img"], disk) || len(files["empty"]) != 0 || len(files) != 2 {
		t.Errorf("files read: %d of guest.img (want %d), %d of empty, %d files", len(files["guest.img"]), len(disk), len(files["empty"]), len(files))
	}
	// A disk that is not a config disk (a guest's, say) is told apart.
	if _, _, err := readDisk(make([]byte, 1<<20)); !errors.Is(err, ErrNotNodeConfig) {
		t.Errorf("ReadNodeConfig(zeros) = %v, want ErrNotNodeConfig", err)
	}
}

func TestWriteNodeConfigRefuses(t *testing.T) {
	for _, tt := range []struct {
		mod  func(*NodeConfig)
		want string
	}{
		{func(c *NodeConfig) { c.Role = "test" }, `role "test": want run, intermediary or backup`},
		{func(c *NodeConfig) { c.Name = "../x" }, "node name"},
		{func(c *NodeConfig) { c.Args = "--listen x --keys /k" }, "leave --keys and --name out"},
		{func(c *NodeConfig) { c.Args = "--name=x" }, "leave --keys and --name out"},
		{func(c *NodeConfig) { c.Args = "'unclosed" }, "single quote is not closed"},
		{func(c *NodeConfig) { c.Key = nil }, "node key: want 1.."},
		{func(c *NodeConfig) { c.Files = []ConfigFile{bytesFile("keys", nil)} }, `file name "keys"`},
		{func(c *NodeConfig) { c.Files = []ConfigFile{bytesFile("../etc", nil)} }, `file name "../etc"`},
		{func(c *NodeConfig) { c.Files = []ConfigFile{bytesFile("a", nil), bytesFile("a", nil)} }, "file a given twice"},
		{func(c *NodeConfig) { f := bytesFile("a", []byte("abc")); f.Size = 4; c.Files = []ConfigFile{f} }, "file a: 3 bytes, want 4"},
		{func(c *NodeConfig) { f := bytesFile("a", []byte("abc")); f.Size = 2; c.Files = []ConfigFile{f} }, "file a: more than 2 bytes"},
	} {
		c := testNodeConfig()
		tt.mod(c)
		f, err := os.Create(filepath.Join(t.TempDir(), "x.cfg"))
		if err != nil {
			t.Fatal(err)
		}
		_, err = WriteNodeConfig(f, c)
		f.Close()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("WriteNodeConfig(%+v) = %v, want an error with %q", c, err, tt.want)
		}
	}
}

// rawEntry is an entry for rawDisk.
type rawEntry struct {
	kind byte
	name string
	data string
}

// rawDisk builds a disk from entries as given, with correct sums, so that
// the reader's own refusals (not the writer's) are tested.
func rawDisk(entries ...rawEntry) []byte {
	var body []byte
	for _, e := range entries {
		body = append(body, e.kind, byte(len(e.name)))
		body = append(body, e.name...)
		body = binary.BigEndian.AppendUint64(body, uint64(len(e.data)))
		body = append(body, e.data...)
		s := sha256.Sum256([]byte(e.data))
		body = append(body, s[:]...)
	}
	return rawHeader(NodeConfigVersion, 0, uint32(len(entries)), body)
}

func rawHeader(version, flags uint16, entries uint32, body []byte) []byte {
	b := []byte(NodeConfigMagic)
	b = binary.BigEndian.AppendUint16(b, version)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint32(b, entries)
	b = binary.BigEndian.AppendUint64(b, uint64(len(body)))
	s := sha256.Sum256(body)
	b = append(b, s[:]...)
	return append(b, body...)
}

var goodEntries = []rawEntry{{entryRole, "", "backup"}, {entryName, "", "node-3"}, {entryArgs, "", "--listen tcp://192.0.2.13:7402"},
	{entryCA, "", "ca"}, {entryCert, "", "cert"}, {entryKey, "", "key"}}

func with(extra ...rawEntry) []rawEntry {
	return append(append([]rawEntry{}, goodEntries...), extra...)
}

func without(kind byte) []rawEntry {
	var out []rawEntry
	for _, e := range goodEntries {
		if e.kind != kind {
			out = append(out, e)
		}
	}
	return out
}

func TestReadNodeConfigRefuses(t *testing.T) {
	good := writeDisk(t, testNodeConfig(bytesFile("f", []byte("file data"))))
	flip := func(off int) []byte {
		b := bytes.Clone(good)
		b[off] ^= 1
		return b
	}
	body := func(b []byte) []byte { return b[nodeConfigHeader:] }
	if _, _, err := readDisk(rawDisk(goodEntries...)); err != nil {
		t.Fatalf("rawDisk(goodEntries): %v", err)
	}
	for _, tt := range []struct {
		name string
		disk []byte
		want string
	}{
		{"short", good[:10], "not a config disk"},
		{"magic", flip(0), "not a config disk"},
		{"version", rawHeader(2, 0, 6, body(rawDisk(goodEntries...))), "config disk version 2: this understudy reads version 1"},
		{"flags", rawHeader(1, 4, 6, body(rawDisk(goodEntries...))), "flags 0x4"},
		{"entries", rawHeader(1, 0, 65, body(rawDisk(goodEntries...))), "65 entries, at most 64"},
		{"fewer entries", rawHeader(1, 0, 5, body(rawDisk(goodEntries...))), "bytes of the body after its 5 entries"},
		{"more entries", rawHeader(1, 0, 7, body(rawDisk(goodEntries...))), "entry 7 of 7 runs past the body"},
		{"body past disk", rawDisk(goodEntries...)[:200], "body of "},
		{"entry sum", flip(nodeConfigHeader + 2 + 8), "role: SHA-256 mismatch"},
		{"entry data", flip(len(good) - 1<<20 + 100), "SHA-256 mismatch"},
		{"body sum", flip(30), "body SHA-256 mismatch"},
		{"unknown kind", rawDisk(with(rawEntry{9, "", "x"})...), "unknown kind 9"},
		{"role twice", rawDisk(with(rawEntry{entryRole, "", "backup"})...), "role twice"},
		{"file twice", rawDisk(with(rawEntry{entryFile, "f", ""}, rawEntry{entryFile, "f", ""})...), "file f twice"},
		{"file without name", rawDisk(with(rawEntry{entryFile, "", "x"})...), "bad name length 0"},
		{"name on a key", rawDisk(rawEntry{entryKey, "k", "x"}), "bad name length 1"},
		{"file name", rawDisk(with(rawEntry{entryFile, "..", "x"})...), `file name ".."`},
		{"file name slash", rawDisk(with(rawEntry{entryFile, "a/b", "x"})...), `file name "a/b"`},
		{"no key", rawDisk(without(entryKey)...), "no node key"},
		{"no role", rawDisk(without(entryRole)...), "no role"},
		{"role test", rawDisk(append([]rawEntry{{entryRole, "", "test"}}, goodEntries[1:]...)...), `role "test"`},
		{"args with --keys", rawDisk(append(without(entryArgs), rawEntry{entryArgs, "", "--keys /x"})...), "leave --keys and --name out"},
		{"long role", rawDisk(append([]rawEntry{{entryRole, "", strings.Repeat("r", 65)}}, goodEntries[1:]...)...), "role: 65 bytes, at most 64"},
		{"long pem", rawDisk(append(without(entryCA), rawEntry{entryCA, "", strings.Repeat("c", maxPEM+1)})...), "CA certificate: 65537 bytes, at most 65536"},
	} {
		_, _, err := readDisk(tt.disk)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: ReadNodeConfig = %v, want an error with %q", tt.name, err, tt.want)
		}
	}
	// A length past the body is refused before anything is read or
	// allocated.
	b := rawDisk(goodEntries...)
	binary.BigEndian.PutUint64(b[nodeConfigHeader+2:], 1<<62)
	if _, _, err := readDisk(b); err == nil || !strings.Contains(err.Error(), "run past the body") {
		t.Errorf("huge entry: ReadNodeConfig = %v, want it refused", err)
	}
}

// FuzzReadNodeConfig: the reader never panics nor copies more than the
// disk's body, and what it accepts writes back to a disk that reads the
// same.
func FuzzReadNodeConfig(f *testing.F) {
	f.Add(writeDisk(f, testNodeConfig(bytesFile("f", []byte("file data")))))
	f.Add(rawDisk(goodEntries...))
	f.Add(rawDisk(with(rawEntry{entryFile, "f", "x"}, rawEntry{entryFile, "g", ""})...))
	f.Add(rawDisk(without(entryKey)...))
	f.Fuzz(func(t *testing.T, b []byte) {
		var copied int64
		files := map[string][]byte{}
		c, err := ReadNodeConfig(bytes.NewReader(b), int64(len(b)), func(name string, size int64) (io.Writer, error) {
			if size > int64(len(b)) {
				t.Fatalf("file %s of %d bytes from a disk of %d", name, size, len(b))
			}
			copied += size
			buf := new(bytes.Buffer)
			files[name] = nil
			return writerFunc(func(p []byte) (int, error) {
				n, err := buf.Write(p)
				files[name] = buf.Bytes()
				return n, err
			}), nil
		})
		if copied > int64(len(b)) {
			t.Fatalf("copied %d bytes of files from a disk of %d", copied, len(b))
		}
		if err != nil {
			return
		}
		for i, fl := range c.Files {
			c.Files[i] = bytesFile(fl.Name, files[fl.Name])
		}
		again, againFiles, err := readDisk(writeDisk(t, c))
		if err != nil {
			t.Fatalf("a config read back fails: %v", err)
		}
		for i, fl := range c.Files {
			c.Files[i].Open = nil
			c.Files[i].SHA256 = sha256.Sum256(files[fl.Name])
		}
		if !reflect.DeepEqual(again, c) || len(againFiles) != len(files) {
			t.Fatalf("read back %+v, want %+v", again, c)
		}
		for n, d := range files {
			if !bytes.Equal(againFiles[n], d) {
				t.Fatalf("file %s read back differs", n)
			}
		}
	})
}

type writerFunc func([]byte) (int, error)

func (w writerFunc) Write(p []byte) (int, error) { return w(p) }

// configRoot makes an image root (outside the image: no Marker) with the
// given virtio disks as dev/NAME files and sys/block/NAME directories, and a
// stand-in for this binary that prints its arguments and exits 7.
func configRoot(t *testing.T, disks map[string][]byte) (Options, string) {
	t.Helper()
	dir := t.TempDir()
	for name, b := range disks {
		for _, d := range []string{"dev", "sys/block/" + name} {
			if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, "dev", name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	self := filepath.Join(dir, "understudy")
	if err := os.WriteFile(self, []byte("#!/bin/sh\necho \"args:$*\"\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return Options{Root: dir, CPUInfo: filepath.Join(dir, "cpuinfo"), KVM: filepath.Join(dir, "nokvm"), Self: self}, dir
}

// TestApplianceConfigDisk: with a config disk among the virtio disks and no
// role on the command line, the uinit unpacks it (keys 0600 in a 0700
// directory, files beside them) and runs the disk's role with --keys,
// --name and the disk's flags.
func TestApplianceConfigDisk(t *testing.T) {
	disk := writeDisk(t, testNodeConfig(bytesFile("guest.img", []byte("guest disk"))))
	for _, cmdline := range []string{"console=ttyS0", "understudy.role=backup"} {
		o, root := configRoot(t, map[string][]byte{"vda": []byte("a guest's disk, not a config disk"), "vdb": disk})
		code, out := runAppliance(t, o, cmdline)
		run := filepath.Join(root, RunDir)
		if code != 7 {
			t.Fatalf("%s: status %d, want the command's 7:\n%s", cmdline, code, out)
		}
		wantLines(t, out, Tag+"config disk "+filepath.Join(root, "dev/vdb")+": version 1, role backup, node node-3, files guest.img (10 bytes, sha256 "+fmt.Sprintf("%x", sha256.Sum256([]byte("guest disk")))+"); unpacked into "+run+"\n",
			Tag+"role backup\n", Tag+"ready role=backup",
			"args:backup --keys "+run+"/keys --name node-3 --listen tcp://192.0.2.13:7402 --records /run/understudy/out a b\n")
		for _, f := range []struct {
			name, data string
			mode       os.FileMode
		}{
			{"", "", os.ModeDir | 0o700}, {"keys", "", os.ModeDir | 0o700}, {"guest.img", "guest disk", 0o600},
			{"keys/ca.crt", "-----BEGIN CERTIFICATE-----\nca\n", 0o644}, {"keys/node-3.crt", "-----BEGIN CERTIFICATE-----\nnode\n", 0o644},
			{"keys/node-3.key", "-----BEGIN EC PRIVATE KEY-----\nsecret\n", 0o600},
		} {
			p := filepath.Join(run, f.name)
			st, err := os.Stat(p)
			if err != nil {
				t.Errorf("%v", err)
				continue
			}
			if st.Mode() != f.mode {
				t.Errorf("%s: mode %v, want %v", p, st.Mode(), f.mode)
			}
			if f.data != "" {
				if b, _ := os.ReadFile(p); string(b) != f.data {
					t.Errorf("%s = %q, want %q", p, b, f.data)
				}
			}
		}
		if strings.Contains(out, "secret") {
			t.Errorf("the console shows the key:\n%s", out)
		}
	}
}

// TestApplianceConfigDiskUnprotectedRun: a config disk for role run whose
// flags do not protect the guest runs it without --keys and --name (run
// refuses keys it would not use); with --protect it gets them.
func TestApplianceConfigDiskUnprotectedRun(t *testing.T) {
	for _, tt := range []struct{ args, want string }{
		{"--kernel /boot/vmlinuz --mem 256M", "args:run --kernel /boot/vmlinuz --mem 256M\n"},
		{"--kernel /boot/vmlinuz --protect tcp://192.0.2.12:7401", "args:run --keys %s/keys --name node-1 --kernel /boot/vmlinuz --protect tcp://192.0.2.12:7401\n"},
		{"--kernel /boot/vmlinuz --protect=tcp://192.0.2.12:7401", "args:run --keys %s/keys --name node-1 --kernel /boot/vmlinuz --protect=tcp://192.0.2.12:7401\n"},
	} {
		nc := testNodeConfig()
		nc.Role, nc.Name, nc.Args = "run", "node-1", tt.args
		o, root := configRoot(t, map[string][]byte{"vda": writeDisk(t, nc)})
		code, out := runAppliance(t, o, "console=ttyS0")
		if code != 7 {
			t.Fatalf("%s: status %d, want the command's 7:\n%s", tt.args, code, out)
		}
		want := tt.want
		if strings.Contains(want, "%s") {
			want = fmt.Sprintf(want, filepath.Join(root, RunDir))
		}
		wantLines(t, out, Tag+"role run\n", want)
	}
}

// TestApplianceConfigDiskRefused: contradictions with the command line and
// damaged or doubled disks are refused in one line, run nothing and leave
// no RunDir behind; without a disk the command line alone still works.
func TestApplianceConfigDiskRefused(t *testing.T) {
	disk := writeDisk(t, testNodeConfig())
	damaged := bytes.Clone(disk)
	damaged[nodeConfigHeader+20] ^= 1
	for _, tt := range []struct {
		name    string
		disks   map[string][]byte
		cmdline string
		code    int
		want    string
	}{
		{"other role", map[string][]byte{"vda": disk}, "understudy.role=intermediary", statusUsage,
			"error: understudy.role=intermediary on the kernel command line, but the config disk "},
		{"args", map[string][]byte{"vda": disk}, "understudy.args=--verbose", statusUsage,
			"error: understudy.args= on the kernel command line and the config disk "},
		{"damaged", map[string][]byte{"vda": damaged}, "", statusError, "/dev/vda: role: SHA-256 mismatch (the disk is damaged)"},
		{"two", map[string][]byte{"vda": disk, "vdc": disk}, "", statusError, "all have the USNODCFG magic: give the node one"},
		{"none", map[string][]byte{"vda": []byte("data")}, "", statusUsage,
			"error: no understudy.role= on the kernel command line and no config disk (none of vda has the USNODCFG magic)"},
		{"no disk", nil, "", statusUsage, "error: no understudy.role= on the kernel command line and no config disk (no virtio disk)"},
	} {
		o, root := configRoot(t, tt.disks)
		code, out := runAppliance(t, o, tt.cmdline)
		if code != tt.code || !strings.Contains(out, tt.want) || strings.Contains(out, "args:") {
			t.Errorf("%s: status %d, want %d and %q, nothing run:\n%s", tt.name, code, tt.code, tt.want, out)
		}
		if _, err := os.Stat(filepath.Join(root, RunDir)); err == nil && tt.name == "damaged" {
			t.Errorf("%s: %s left behind", tt.name, RunDir)
		}
		if ents, _ := os.ReadDir(filepath.Join(root, "run")); tt.name == "damaged" && len(ents) != 0 {
			t.Errorf("%s: staging left behind in run/: %v", tt.name, ents)
		}
	}
	// No config disk: the command line's role and flags, as before.
	o, _ := configRoot(t, map[string][]byte{"vda": []byte("data")})
	code, out := runAppliance(t, o, `understudy.role=run understudy.args="--keys /k"`)
	if code != 7 || !strings.Contains(out, "args:run --keys /k\n") || !strings.Contains(out, Tag+"config disk: none (the role's flags are understudy.args)") {
		t.Errorf("no config disk: status %d:\n%s", code, out)
	}
	// The command line's role is reported first, as always, and once.
	if r, opt := strings.Index(out, Tag+"role run\n"), strings.Index(out, Tag+"option role="); r < 0 || r > opt || strings.Count(out, Tag+"role run\n") != 1 {
		t.Errorf("no config disk: the role line is not first and once:\n%s", out)
	}
	// A disk the virtio bus lists (device type 2) is found through it.
	o, root := configRoot(t, nil)
	bus := filepath.Join(root, "sys/bus/virtio/devices/virtio3")
	for _, d := range []string{filepath.Join(bus, "block", "vdd"), filepath.Join(root, "dev")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(bus, "device"), []byte("0x0002\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "dev", "vdd"), disk, 0o644); err != nil {
		t.Fatal(err)
	}
	code, out = runAppliance(t, o, "")
	if code != 7 || !strings.Contains(out, Tag+"config disk "+filepath.Join(root, "dev/vdd")+": version 1, role backup") {
		t.Errorf("a disk on the virtio bus: status %d:\n%s", code, out)
	}
	// The test role does not look for one.
	o, _ = configRoot(t, map[string][]byte{"vda": disk})
	code, out = runAppliance(t, o, `understudy.role=test understudy.exec="sh -c 'exit 4'"`)
	if code != 4 || strings.Contains(out, "config disk") {
		t.Errorf("role test with a config disk: status %d:\n%s", code, out)
	}
}

// FuzzReadNodeConfigBody fuzzes the entries behind a correct header (its
// count and body sum made to fit), so that the fuzzer gets past the body's
// SHA-256 to the entry parser's bounds.
func FuzzReadNodeConfigBody(f *testing.F) {
	for _, es := range [][]rawEntry{goodEntries, with(rawEntry{entryFile, "f", "x"}), without(entryCA)} {
		f.Add(uint32(len(es)), rawDisk(es...)[nodeConfigHeader:])
	}
	f.Fuzz(func(t *testing.T, entries uint32, body []byte) {
		b := rawHeader(NodeConfigVersion, 0, entries, body)
		var copied int64
		c, err := ReadNodeConfig(bytes.NewReader(b), int64(len(b)), func(name string, size int64) (io.Writer, error) {
			copied += size
			return io.Discard, nil
		})
		if copied > int64(len(body)) {
			t.Fatalf("copied %d bytes of files from a body of %d", copied, len(body))
		}
		if err == nil && (c.Role == "" || c.Name == "" || len(c.Key) == 0) {
			t.Fatalf("accepted a config without role, name or key: %+v", c)
		}
	})
}
