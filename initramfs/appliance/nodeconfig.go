package appliance

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/understudy-vmm/understudy/ft/wire"
)

// A node's config disk: what a node of a cluster needs that the kernel
// command line must not carry (it is world-readable in /proc/cmdline), and
// that the image, the same for every node, does not have. It is a raw disk
// image given to the node's QEMU (or the dedicated host's firmware) as a
// read-only virtio-blk drive; `understudy node-config` writes it, and the
// uinit finds it among the virtio disks by its magic, checks it and unpacks
// it into RunDir before it runs the role.
//
// Layout, version 1 (integers big-endian):
//
//	header (56 bytes):
//	  magic    [8]  "USNODCFG"
//	  version  u16  1
//	  flags    u16  0 (any other value is refused)
//	  entries  u32  number of entries in the body
//	  length   u64  bytes in the body
//	  sum      [32] SHA-256 of the body
//	body: entries, one after another:
//	  kind     u8   entryRole, entryName, entryArgs, entryCA, entryCert, entryKey or entryFile
//	  namelen  u8   0, or for entryFile 1..maxFileName
//	  name     [namelen]
//	  size     u64
//	  data     [size]
//	  sum      [32] SHA-256 of data
//	padding: zeros to a whole number of MiB (ignored)
//
// Every entry but entryFile appears exactly once (entryArgs at most once);
// files have distinct names. The reader bounds everything before it
// allocates or copies: the body by the disk's size, small entries by their
// own limits, the entry count by maxEntries.
const (
	NodeConfigMagic   = "USNODCFG"
	NodeConfigVersion = 1
	nodeConfigHeader  = 56
	// nodeConfigAlign is the disk's granule: a whole number of MiB, so
	// that the kernel's partition scan (which reads the first blocks of
	// every disk) finds zeros, not the end of the disk.
	nodeConfigAlign = 1 << 20
)

// Entry kinds.
const (
	entryRole = 1 + iota // the role: run, intermediary or backup
	entryName            // the node's name (its certificate's common name)
	entryArgs            // the role's flags, quoted as understudy.args
	entryCA              // the cluster CA certificate (PEM)
	entryCert            // the node's certificate (PEM)
	entryKey             // the node's private key (PEM)
	entryFile            // a named file, unpacked into RunDir
)

// Limits of a config disk.
const (
	maxEntries   = 64
	maxFiles     = maxEntries - 6
	maxFileName  = 64
	maxArgsBytes = 4096
	maxPEM       = 64 << 10
)

// RunDir is where the uinit unpacks the config disk, relative to the image's
// root: the keys in RunDir/keys (ca.crt, NAME.crt, NAME.key), each file as
// RunDir/NAME. The role's flags may name the files there.
const (
	RunDir  = "run/understudy"
	KeysDir = RunDir + "/keys"
)

// NodeConfig is what a config disk gives a node.
type NodeConfig struct {
	Role   string // run, intermediary or backup
	Name   string // the node's name: its certificate's common name
	Args   string // the role's flags, words quoted as in understudy.args ('a b')
	CACert []byte // PEM
	Cert   []byte // PEM
	Key    []byte // PEM
	Files  []ConfigFile
}

// ConfigFile is a file on a config disk. Writing it, Open gives its content
// (Size bytes); reading a disk, Open is nil and the content went to the
// reader's file function.
type ConfigFile struct {
	Name string
	Size int64
	Open func() (io.ReadCloser, error)
	// SHA256 is the content's sum, as read and checked (reading only).
	SHA256 [sha256.Size]byte
}

// nodeRoles are the roles a config disk may name.
var nodeRoles = []string{"run", "intermediary", "backup"}

// CheckNodeFileName reports whether name may be a config disk file's name:
// 1..64 letters, digits, '.', '_' or '-', not starting with '.' or '-', and
// not "keys" (RunDir's subdirectory for the keys).
func CheckNodeFileName(name string) error {
	ok := name != "" && len(name) <= maxFileName && name[0] != '.' && name[0] != '-' && name != "keys"
	for i := 0; ok && i < len(name); i++ {
		c := name[i]
		ok = c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-'
	}
	if !ok {
		return fmt.Errorf("file name %q: want 1..%d letters, digits, '.', '_' or '-', not starting with '.' or '-', and not \"keys\"", name, maxFileName)
	}
	return nil
}

// CheckNodeArgs checks a role's flags for a config disk: valid words, and
// none of the flags the uinit sets itself (--keys and --name come from the
// disk's keys).
func CheckNodeArgs(args string) ([]string, error) {
	if len(args) > maxArgsBytes || !utf8.ValidString(args) || strings.ContainsAny(args, "\x00\n\r") {
		return nil, fmt.Errorf("args: want at most %d bytes of UTF-8 text on one line", maxArgsBytes)
	}
	words, err := splitArgs(args)
	if err != nil {
		return nil, fmt.Errorf("args: %w", err)
	}
	for _, w := range words {
		f := strings.TrimLeft(w, "-")
		f, _, _ = strings.Cut(f, "=")
		if strings.HasPrefix(w, "-") && (f == "keys" || f == "name") {
			return nil, fmt.Errorf("args: %s: the keys and the node's name come from the config disk; leave --keys and --name out", w)
		}
	}
	return words, nil
}

// check validates c's small fields (the reader and the writer both use it).
func (c *NodeConfig) check() error {
	if !contains(nodeRoles, c.Role) {
		return fmt.Errorf("role %q: want run, intermediary or backup", c.Role)
	}
	if err := wire.CheckName(c.Name); err != nil {
		return err
	}
	if _, err := CheckNodeArgs(c.Args); err != nil {
		return err
	}
	for _, p := range []struct {
		what string
		b    []byte
	}{{"CA certificate", c.CACert}, {"node certificate", c.Cert}, {"node key", c.Key}} {
		if len(p.b) == 0 || len(p.b) > maxPEM {
			return fmt.Errorf("%s: want 1..%d bytes, have %d", p.what, maxPEM, len(p.b))
		}
	}
	if len(c.Files) > maxFiles {
		return fmt.Errorf("%d files: at most %d", len(c.Files), maxFiles)
	}
	seen := map[string]bool{}
	for _, f := range c.Files {
		if err := CheckNodeFileName(f.Name); err != nil {
			return err
		}
		if seen[f.Name] {
			return fmt.Errorf("file %s given twice", f.Name)
		}
		seen[f.Name] = true
		if f.Size < 0 {
			return fmt.Errorf("file %s: negative size", f.Name)
		}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

// WriteNodeConfig writes c as a config disk to w, from its start, padded to
// whole MiB, and returns its size. It checks c first, and that
// each file gives exactly its Size bytes.
func WriteNodeConfig(w io.WriteSeeker, c *NodeConfig) (int64, error) {
	if err := c.check(); err != nil {
		return 0, err
	}
	if _, err := w.Seek(nodeConfigHeader, io.SeekStart); err != nil {
		return 0, err
	}
	body := sha256.New()
	out := io.MultiWriter(w, body)
	var length int64
	entries := 0
	put := func(kind byte, name string, size int64, data io.Reader) error {
		hdr := make([]byte, 0, 2+len(name)+8)
		hdr = append(hdr, kind, byte(len(name)))
		hdr = append(hdr, name...)
		hdr = binary.BigEndian.AppendUint64(hdr, uint64(size))
		if _, err := out.Write(hdr); err != nil {
			return err
		}
		sum := sha256.New()
		n, err := io.Copy(io.MultiWriter(out, sum), io.LimitReader(data, size))
		if err != nil {
			return err
		}
		if n != size {
			return fmt.Errorf("%s: %d bytes, want %d (did it change?)", entryLabel(kind, name), n, size)
		}
		if _, err := out.Write(sum.Sum(nil)); err != nil {
			return err
		}
		length += int64(len(hdr)) + size + sha256.Size
		entries++
		return nil
	}
	for _, e := range []struct {
		kind byte
		b    []byte
	}{{entryRole, []byte(c.Role)}, {entryName, []byte(c.Name)}, {entryArgs, []byte(c.Args)},
		{entryCA, c.CACert}, {entryCert, c.Cert}, {entryKey, c.Key}} {
		if err := put(e.kind, "", int64(len(e.b)), bytes.NewReader(e.b)); err != nil {
			return 0, err
		}
	}
	for _, f := range c.Files {
		r, err := f.Open()
		if err != nil {
			return 0, err
		}
		err = put(entryFile, f.Name, f.Size, r)
		if err == nil {
			if n, _ := r.Read(make([]byte, 1)); n > 0 {
				err = fmt.Errorf("file %s: more than %d bytes (did it change?)", f.Name, f.Size)
			}
		}
		r.Close()
		if err != nil {
			return 0, err
		}
	}
	total := nodeConfigHeader + length
	if pad := (nodeConfigAlign - total%nodeConfigAlign) % nodeConfigAlign; pad > 0 {
		var err error
		if t, ok := w.(interface{ Truncate(int64) error }); ok {
			err = t.Truncate(total + pad) // sparse
		} else {
			_, err = w.Write(make([]byte, pad))
		}
		if err != nil {
			return 0, err
		}
		total += pad
	}
	hdr := make([]byte, 0, nodeConfigHeader)
	hdr = append(hdr, NodeConfigMagic...)
	hdr = binary.BigEndian.AppendUint16(hdr, NodeConfigVersion)
	hdr = binary.BigEndian.AppendUint16(hdr, 0)
	hdr = binary.BigEndian.AppendUint32(hdr, uint32(entries))
	hdr = binary.BigEndian.AppendUint64(hdr, uint64(length))
	hdr = append(hdr, body.Sum(nil)...)
	if _, err := w.Seek(0, io.SeekStart); err != nil {
		return 0, err
	}
	if _, err := w.Write(hdr); err != nil {
		return 0, err
	}
	return total, nil
}

func entryLabel(kind byte, name string) string {
	switch kind {
	case entryRole:
		return "role"
	case entryName:
		return "name"
	case entryArgs:
		return "args"
	case entryCA:
		return "CA certificate"
	case entryCert:
		return "node certificate"
	case entryKey:
		return "node key"
	case entryFile:
		return "file " + name
	}
	return fmt.Sprintf("entry kind %d", kind)
}

// ErrNotNodeConfig is returned by ReadNodeConfig for data that does not
// begin with the magic: not a config disk at all.
var ErrNotNodeConfig = errors.New("not a config disk (no " + NodeConfigMagic + " magic)")

// ReadNodeConfig reads a config disk of size bytes from r. Small entries
// are returned in the NodeConfig; each file's content is copied to the
// writer file returns for it (its name has been checked). Nothing read is
// trusted: the header, every entry and the whole body are checked, and any
// error means the disk must not be used (the files written so far
// included). A disk without the magic gives ErrNotNodeConfig.
func ReadNodeConfig(r io.Reader, size int64, file func(name string, size int64) (io.Writer, error)) (*NodeConfig, error) {
	hdr := make([]byte, nodeConfigHeader)
	if size < nodeConfigHeader {
		return nil, ErrNotNodeConfig
	}
	if _, err := io.ReadFull(r, hdr); err != nil {
		return nil, fmt.Errorf("config disk header: %w", err)
	}
	if string(hdr[:8]) != NodeConfigMagic {
		return nil, ErrNotNodeConfig
	}
	version, flags := binary.BigEndian.Uint16(hdr[8:]), binary.BigEndian.Uint16(hdr[10:])
	entries, length := binary.BigEndian.Uint32(hdr[12:]), binary.BigEndian.Uint64(hdr[16:])
	if version != NodeConfigVersion {
		return nil, fmt.Errorf("config disk version %d: this understudy reads version %d", version, NodeConfigVersion)
	}
	if flags != 0 {
		return nil, fmt.Errorf("config disk flags %#x: this understudy knows none", flags)
	}
	if entries > maxEntries {
		return nil, fmt.Errorf("config disk: %d entries, at most %d", entries, maxEntries)
	}
	if length > uint64(size-nodeConfigHeader) {
		return nil, fmt.Errorf("config disk: body of %d bytes on a disk of %d", length, size)
	}
	body := sha256.New()
	in := io.TeeReader(io.LimitReader(r, int64(length)), body)
	left := int64(length)
	c := &NodeConfig{}
	seen := map[byte]bool{}
	files := map[string]bool{}
	for i := uint32(0); i < entries; i++ {
		var eh [2]byte
		if left < 2+8+sha256.Size {
			return nil, fmt.Errorf("config disk: entry %d of %d runs past the body", i+1, entries)
		}
		if _, err := io.ReadFull(in, eh[:]); err != nil {
			return nil, fmt.Errorf("config disk: entry %d: %w", i+1, err)
		}
		kind, nameLen := eh[0], int64(eh[1])
		left -= 2
		if kind < entryRole || kind > entryFile {
			return nil, fmt.Errorf("config disk: entry %d: unknown kind %d", i+1, kind)
		}
		if (kind == entryFile) != (nameLen > 0) || nameLen > maxFileName || left < nameLen+8+sha256.Size {
			return nil, fmt.Errorf("config disk: entry %d (%s): bad name length %d", i+1, entryLabel(kind, ""), nameLen)
		}
		nb := make([]byte, nameLen+8)
		if _, err := io.ReadFull(in, nb); err != nil {
			return nil, fmt.Errorf("config disk: entry %d: %w", i+1, err)
		}
		name := string(nb[:nameLen])
		n := binary.BigEndian.Uint64(nb[nameLen:])
		left -= nameLen + 8
		label := entryLabel(kind, name)
		if kind == entryFile {
			if err := CheckNodeFileName(name); err != nil {
				return nil, fmt.Errorf("config disk: %w", err)
			}
			if files[name] {
				return nil, fmt.Errorf("config disk: file %s twice", name)
			}
			if len(files) == maxFiles {
				return nil, fmt.Errorf("config disk: more than %d files", maxFiles)
			}
			files[name] = true
		} else {
			if seen[kind] {
				return nil, fmt.Errorf("config disk: %s twice", label)
			}
			seen[kind] = true
		}
		if n > uint64(left-sha256.Size) {
			return nil, fmt.Errorf("config disk: %s: %d bytes run past the body", label, n)
		}
		limit := uint64(maxPEM)
		switch kind {
		case entryRole, entryName:
			limit = 64
		case entryArgs:
			limit = maxArgsBytes
		case entryFile:
			limit = n
		}
		if n > limit {
			return nil, fmt.Errorf("config disk: %s: %d bytes, at most %d", label, n, limit)
		}
		sum := sha256.New()
		var small bytes.Buffer
		var dst io.Writer = &small
		if kind == entryFile {
			w, err := file(name, int64(n))
			if err != nil {
				return nil, err
			}
			dst = w
			c.Files = append(c.Files, ConfigFile{Name: name, Size: int64(n)})
		}
		if _, err := io.CopyN(io.MultiWriter(dst, sum), in, int64(n)); err != nil {
			return nil, fmt.Errorf("config disk: %s: %w", label, err)
		}
		var want [sha256.Size]byte
		if _, err := io.ReadFull(in, want[:]); err != nil {
			return nil, fmt.Errorf("config disk: %s: %w", label, err)
		}
		left -= int64(n) + sha256.Size
		if !bytes.Equal(sum.Sum(nil), want[:]) {
			return nil, fmt.Errorf("config disk: %s: SHA-256 mismatch (the disk is damaged)", label)
		}
		if kind == entryFile {
			c.Files[len(c.Files)-1].SHA256 = want
		}
		switch kind {
		case entryRole:
			c.Role = small.String()
		case entryName:
			c.Name = small.String()
		case entryArgs:
			c.Args = small.String()
		case entryCA:
			c.CACert = small.Bytes()
		case entryCert:
			c.Cert = small.Bytes()
		case entryKey:
			c.Key = small.Bytes()
		}
	}
	if left != 0 {
		return nil, fmt.Errorf("config disk: %d bytes of the body after its %d entries", left, entries)
	}
	if !bytes.Equal(body.Sum(nil), hdr[24:56]) {
		return nil, errors.New("config disk: body SHA-256 mismatch (the disk is damaged)")
	}
	for _, k := range []byte{entryRole, entryName, entryCA, entryCert, entryKey} {
		if !seen[k] {
			return nil, fmt.Errorf("config disk: no %s", entryLabel(k, ""))
		}
	}
	if err := c.check(); err != nil {
		return nil, fmt.Errorf("config disk: %w", err)
	}
	return c, nil
}
