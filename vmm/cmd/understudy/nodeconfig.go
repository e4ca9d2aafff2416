package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// fileList collects repeated --file NAME=PATH flags.
type fileList []appliance.ConfigFile

func (l *fileList) String() string {
	names := make([]string, len(*l))
	for i, f := range *l {
		names[i] = f.Name
	}
	return strings.Join(names, ",")
}

func (l *fileList) Set(v string) error {
	name, path, ok := strings.Cut(v, "=")
	if !ok || path == "" {
		return fmt.Errorf("%q: want NAME=PATH", v)
	}
	if err := appliance.CheckNodeFileName(name); err != nil {
		return err
	}
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", path)
	}
	*l = append(*l, appliance.ConfigFile{Name: name, Size: st.Size(), Open: func() (io.ReadCloser, error) { return os.Open(path) }})
	return nil
}

// cmdNodeConfig is `understudy node-config`: it writes a node's config disk
// (appliance.WriteNodeConfig), which the appliance finds among its virtio
// disks and runs the role from.
func cmdNodeConfig(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("node-config", "node-config --out FILE --role run|intermediary|backup --ca CA.crt --cert NODE.crt --key NODE.key [--args \"FLAGS\"] [--file NAME=PATH...] [--force]", stderr)
	out := fs.String("out", "", "the config disk to write (a raw disk image; it holds the node's key: keep it as you keep the key)")
	roleArg := fs.String("role", "", "the node's role: run (the primary; \"primary\" is the same), intermediary or backup")
	caPath := fs.String("ca", "", "the cluster CA certificate (ca.crt of understudy keys init)")
	certPath := fs.String("cert", "", "the node's certificate (NAME.crt of understudy keys issue); the node's name is its common name")
	keyPath := fs.String("key", "", "the node's key (NAME.key)")
	roleArgs := fs.String("args", "", "the role's flags, as for \"understudy ROLE FLAGS\" (words grouped with single quotes); the appliance adds --keys and --name. "+
		"A file given with --file is at "+"/"+appliance.RunDir+"/NAME on the node")
	var files fileList
	fs.Var(&files, "file", "a file for the node, NAME=PATH (repeatable): a guest's kernel, initrd or disk, unpacked at /"+appliance.RunDir+"/NAME")
	force := fs.Bool("force", false, "replace an existing --out file")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: understudy node-config --out FILE --role ROLE --ca CA.crt --cert NODE.crt --key NODE.key [--args \"FLAGS\"] [--file NAME=PATH...]\n\n"+
			"Writes a node's config disk: its role and flags, the cluster CA, its certificate and key, and files.\n"+
			"Give it to the appliance node as a read-only virtio disk (QEMU: -drive file=FILE,format=raw,if=virtio,readonly=on);\n"+
			"the appliance unpacks it into /%s and runs understudy ROLE --keys /%s --name NAME FLAGS.\n\nFlags:\n", appliance.RunDir, appliance.KeysDir)
		fs.PrintDefaults()
	}
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *out == "" || *roleArg == "" || *caPath == "" || *certPath == "" || *keyPath == "" {
		return usageError(fs, "--out, --role, --ca, --cert and --key are required")
	}
	role, wantRole := *roleArg, *roleArg
	switch role {
	case "primary", "run":
		role, wantRole = "run", "primary"
	case "intermediary", "backup":
	default:
		return usageError(fs, fmt.Sprintf("--role %q: want run (or primary), intermediary or backup", role))
	}
	if _, err := appliance.CheckNodeArgs(*roleArgs); err != nil {
		return usageError(fs, "--"+err.Error())
	}
	var pem [3][]byte
	for i, p := range []string{*caPath, *certPath, *keyPath} {
		b, err := os.ReadFile(p)
		if err != nil {
			return fail(stderr, err)
		}
		pem[i] = b
	}
	creds, err := transport.NewCredentials(pem[0], pem[1], pem[2])
	if err != nil {
		return fail(stderr, err)
	}
	want, err := ft.ParseRole(wantRole)
	if err != nil {
		return fail(stderr, err)
	}
	if r := creds.Role(); r != 0 && r != want.Wire() {
		return fail(stderr, fmt.Errorf("%s is node %q's certificate for role %s, not %s", *certPath, creds.Name(), ft.Role(r), want))
	}
	nc := &appliance.NodeConfig{Role: role, Name: creds.Name(), Args: *roleArgs, CACert: pem[0], Cert: pem[1], Key: pem[2], Files: files}
	flags := os.O_RDWR | os.O_CREATE | os.O_EXCL
	if *force {
		flags = os.O_RDWR | os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(*out, flags, 0o600)
	if err != nil {
		if os.IsExist(err) {
			return fail(stderr, fmt.Errorf("%w (use --force to replace it)", err))
		}
		return fail(stderr, err)
	}
	size, err := appliance.WriteNodeConfig(f, nc)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(*out)
		return fail(stderr, fmt.Errorf("%s: %w", *out, err))
	}
	fmt.Fprintf(stdout, "understudy: wrote %s (%d bytes): node %q, role %s, %d files; give it to the node as a read-only virtio disk: -drive file=%s,format=raw,if=virtio,readonly=on\n",
		*out, size, nc.Name, nc.Role, len(nc.Files), *out)
	return 0
}
