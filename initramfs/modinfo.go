package initramfs

import (
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/ulikunitz/xz"
	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// maxModuleSize bounds a module file read into memory (the largest Debian
// 6.1 module is under 20 MiB uncompressed).
const maxModuleSize = 256 << 20

// ErrModinfo is wrapped by the errors of ParseModinfo.
var ErrModinfo = errors.New("bad .modinfo section")

// Modinfo is what the build needs from a module's .modinfo section.
type Modinfo struct {
	Name     string   // the module's name= field ("" in old modules)
	Depends  []string // the modules it needs directly, normalized
	Vermagic string   // the kernel it was built for
}

// ParseModinfo parses a .modinfo section: NUL-separated key=value strings.
// Dependency names must be plain module names.
func ParseModinfo(sec []byte) (Modinfo, error) {
	var m Modinfo
	seen := map[string]bool{}
	for _, f := range bytes.Split(sec, []byte{0}) {
		if len(f) == 0 {
			continue
		}
		k, v, ok := strings.Cut(string(f), "=")
		if !ok {
			continue // not key=value: padding or a tool's note, as modinfo skips it
		}
		switch k {
		case "name", "depends", "vermagic":
			if seen[k] {
				return Modinfo{}, fmt.Errorf("%w: %s given twice", ErrModinfo, k)
			}
			seen[k] = true
		}
		switch k {
		case "name":
			if !validModuleName(v) {
				return Modinfo{}, fmt.Errorf("%w: name=%q", ErrModinfo, v)
			}
			m.Name = boot.NormalizeModuleName(v)
		case "vermagic":
			m.Vermagic = v
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d == "" {
					continue
				}
				if !validModuleName(d) {
					return Modinfo{}, fmt.Errorf("%w: depends names %q", ErrModinfo, d)
				}
				m.Depends = append(m.Depends, boot.NormalizeModuleName(d))
			}
		}
	}
	return m, nil
}

func validModuleName(s string) bool {
	if s == "" || len(s) > 56 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

// ReadModule returns the uncompressed contents of the module file at path
// (.ko, .ko.xz or .ko.gz) and its parsed .modinfo section.
func ReadModule(path string) ([]byte, Modinfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, Modinfo{}, err
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(path, ".ko.xz"):
		if r, err = xz.NewReader(f); err != nil {
			return nil, Modinfo{}, fmt.Errorf("%s: %w", path, err)
		}
	case strings.HasSuffix(path, ".ko.gz"):
		if r, err = gzip.NewReader(f); err != nil {
			return nil, Modinfo{}, fmt.Errorf("%s: %w", path, err)
		}
	case strings.HasSuffix(path, ".ko"):
	default:
		return nil, Modinfo{}, fmt.Errorf("%s: not a .ko, .ko.xz or .ko.gz module file", path)
	}
	b, err := io.ReadAll(io.LimitReader(r, maxModuleSize+1))
	if err != nil {
		return nil, Modinfo{}, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > maxModuleSize {
		return nil, Modinfo{}, fmt.Errorf("%s: larger than %d MiB uncompressed", path, maxModuleSize>>20)
	}
	ef, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return nil, Modinfo{}, fmt.Errorf("%s: not an ELF module: %w", path, err)
	}
	sec := ef.Section(".modinfo")
	if sec == nil {
		return nil, Modinfo{}, fmt.Errorf("%s: no .modinfo section: not a kernel module", path)
	}
	data, err := sec.Data()
	if err != nil {
		return nil, Modinfo{}, fmt.Errorf("%s: .modinfo: %w", path, err)
	}
	mi, err := ParseModinfo(data)
	if err != nil {
		return nil, Modinfo{}, fmt.Errorf("%s: %w", path, err)
	}
	return b, mi, nil
}
