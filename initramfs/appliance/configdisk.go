package appliance

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// diskWait bounds the wait for a virtio disk the bus lists to show up as a
// block device (its driver probes it once the modules are loaded).
const diskWait = 10 * time.Second

// virtioBlockID is a virtio block device's id in sysfs (the virtio spec's
// device type 2).
const virtioBlockID = "0x0002"

// virtioDisks returns the names of the machine's virtio disks (vda, ...):
// those of sys/block, and those the virtio bus lists, waited for.
func (a *appliance) virtioDisks() []string {
	var names []string
	bus := a.path("sys/bus/virtio/devices")
	devs, _ := os.ReadDir(bus)
	for _, d := range devs {
		id, err := os.ReadFile(filepath.Join(bus, d.Name(), "device"))
		if err != nil || strings.TrimSpace(string(id)) != virtioBlockID {
			continue
		}
		deadline := time.Now().Add(diskWait)
		for {
			bs, _ := os.ReadDir(filepath.Join(bus, d.Name(), "block"))
			if len(bs) > 0 {
				names = append(names, bs[0].Name())
				break
			}
			if time.Now().After(deadline) {
				a.printf("config disk: virtio device %s is a block device, but no disk appeared within %v", d.Name(), diskWait)
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	blocks, _ := os.ReadDir(a.path("sys/block"))
	for _, b := range blocks {
		if strings.HasPrefix(b.Name(), "vd") {
			names = append(names, b.Name())
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// findConfigDisk returns the device of the config disk among the virtio
// disks ("" if none has the magic) and the disks it looked at. Two config
// disks are an error.
func (a *appliance) findConfigDisk() (string, []string, error) {
	disks := a.virtioDisks()
	var found []string
	for _, d := range disks {
		dev := a.path("dev/" + d)
		f, err := os.Open(dev)
		if err != nil {
			a.printf("config disk: %s: %v", dev, err)
			continue
		}
		magic := make([]byte, len(NodeConfigMagic))
		_, err = io.ReadFull(f, magic)
		f.Close()
		if err == nil && string(magic) == NodeConfigMagic {
			found = append(found, dev)
		}
	}
	switch len(found) {
	case 0:
		return "", disks, nil
	case 1:
		return found[0], disks, nil
	}
	return "", disks, fmt.Errorf("config disk: %s all have the %s magic: give the node one", strings.Join(found, ", "), NodeConfigMagic)
}

// errUsage marks a config disk error that is the operator's (a
// contradiction with the command line), reported as statusUsage.
var errUsage = errors.New("usage")

// applyConfigDisk looks for a config disk (for any role but test). If
// there is one it checks it against the command line, unpacks it into
// RunDir and makes its role and flags cfg's: `understudy ROLE --keys
// RunDir/keys --name NAME ARGS`. Without one, cfg is left as the command
// line made it.
func (a *appliance) applyConfigDisk(cfg *config) error {
	dev, looked, err := a.findConfigDisk()
	if err != nil {
		return err
	}
	if dev == "" {
		if len(looked) == 0 {
			cfg.noDisk = " and no config disk (no virtio disk)"
		} else {
			cfg.noDisk = fmt.Sprintf(" and no config disk (none of %s has the %s magic)", strings.Join(looked, ", "), NodeConfigMagic)
		}
		if cfg.role != "" {
			a.printf("config disk: none (the role's flags are understudy.args)")
		}
		return nil
	}
	f, err := os.Open(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("config disk %s: %w", dev, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("config disk %s: %w", dev, err)
	}
	nc, err := a.unpackConfig(f, size)
	if err != nil {
		return fmt.Errorf("config disk %s: %s", dev, strings.TrimPrefix(err.Error(), "config disk: "))
	}
	switch {
	case cfg.role != "" && cfg.role != nc.Role:
		return fmt.Errorf("%w: understudy.role=%s on the kernel command line, but the config disk %s is for role %s", errUsage, cfg.role, dev, nc.Role)
	case cfg.once["args"]:
		return fmt.Errorf("%w: understudy.args= on the kernel command line and the config disk %s: the role's flags come from the disk alone", errUsage, dev)
	}
	args, err := CheckNodeArgs(nc.Args) // checked by ReadNodeConfig too
	if err != nil {
		return err
	}
	cfg.role, cfg.disk = nc.Role, dev
	cfg.args = append([]string{"--keys", a.path(KeysDir), "--name", nc.Name}, args...)
	if nc.Role == "run" && !protects(args) {
		// An unprotected guest's node: run takes no keys then.
		cfg.args = args
	}
	names := make([]string, 0, len(nc.Files))
	for _, fl := range nc.Files {
		names = append(names, fmt.Sprintf("%s (%d bytes, sha256 %x)", fl.Name, fl.Size, fl.SHA256))
	}
	files := "no files"
	if len(names) > 0 {
		files = "files " + strings.Join(names, ", ")
	}
	a.printf("config disk %s: version %d, role %s, node %s, %s; unpacked into %s", dev, NodeConfigVersion, nc.Role, nc.Name, files, a.path(RunDir))
	return nil
}

// unpackConfig reads the config disk r of size bytes into a new directory
// beside RunDir and, once all of it checked out, renames it to RunDir
// (mode 0700; the keys in keys/, the key 0600). On any error nothing is
// left behind.
func (a *appliance) unpackConfig(r io.Reader, size int64) (_ *NodeConfig, err error) {
	run := a.path(RunDir)
	if _, err := os.Lstat(run); err == nil {
		return nil, fmt.Errorf("%s exists already", run)
	}
	if err := os.MkdirAll(filepath.Dir(run), 0o755); err != nil {
		return nil, err
	}
	stage, err := os.MkdirTemp(filepath.Dir(run), ".understudy-")
	if err != nil {
		return nil, err
	}
	var open []*os.File
	defer func() {
		for _, f := range open {
			if cerr := f.Close(); err == nil && cerr != nil {
				err = cerr
			}
		}
		if err != nil {
			os.RemoveAll(stage)
		}
	}()
	nc, err := ReadNodeConfig(r, size, func(name string, size int64) (io.Writer, error) {
		f, err := os.OpenFile(filepath.Join(stage, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, err
		}
		open = append(open, f)
		return f, nil
	})
	if err != nil {
		return nil, err
	}
	keys := filepath.Join(stage, "keys")
	if err := os.Mkdir(keys, 0o700); err != nil {
		return nil, err
	}
	for _, kf := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{"ca.crt", nc.CACert, 0o644}, {nc.Name + ".crt", nc.Cert, 0o644}, {nc.Name + ".key", nc.Key, 0o600}} {
		if err := os.WriteFile(filepath.Join(keys, kf.name), kf.data, kf.mode); err != nil {
			return nil, err
		}
	}
	for _, f := range open {
		if err := f.Sync(); err != nil {
			return nil, err
		}
	}
	if err := os.Rename(stage, run); err != nil {
		return nil, err
	}
	return nc, nil
}

// protects reports whether run's flags args protect the guest (--protect).
func protects(args []string) bool {
	for _, a := range args {
		if a == "--protect" || a == "-protect" || strings.HasPrefix(a, "--protect=") || strings.HasPrefix(a, "-protect=") {
			return true
		}
	}
	return false
}
