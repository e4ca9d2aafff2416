package boot

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
)

// Limits of ParseDepFile: far above a full distribution kernel's modules.dep
// (about 6,000 modules, lines under 1 KiB), far below trouble.
const (
	maxDepModules = 1 << 16
	maxDepLine    = 64 << 10
	maxModuleName = 56 // MODULE_NAME_LEN - 1 in the kernel
)

// Errors of the modules.dep functions.
var (
	ErrDepFile       = errors.New("bad modules.dep")
	ErrUnknownModule = errors.New("module not in modules.dep")
)

// NormalizeModuleName returns a module name as the kernel spells it: '-'
// becomes '_' ("kvm-amd" and "kvm_amd" name the same module).
func NormalizeModuleName(name string) string {
	return strings.ReplaceAll(name, "-", "_")
}

// ModuleNameOf returns the name of the module in file p: its base name less
// ".ko" and any compression suffix, normalized. "kernel/arch/x86/kvm/kvm-amd.ko"
// is "kvm_amd".
func ModuleNameOf(p string) string {
	b := path.Base(p)
	for _, suf := range []string{".xz", ".gz", ".zst"} {
		b = strings.TrimSuffix(b, suf)
	}
	return NormalizeModuleName(strings.TrimSuffix(b, ".ko"))
}

// DepEntry is one line of modules.dep: a module file and the files of every
// module it needs, directly or not, in depmod's order (load them from the
// last to the first, then the module itself). Paths are relative to the
// modules directory (/lib/modules/RELEASE).
type DepEntry struct {
	Path string
	Deps []string
}

// DepFile is a parsed modules.dep.
type DepFile struct {
	byName map[string]DepEntry
	names  []string // in file order
}

// ParseDepFile reads modules.dep (depmod's format: "path: dep dep ...").
// Every path must be clean, relative, inside the modules directory and end
// in ".ko" (compressed modules are not supported: the image builder
// decompresses them); a module may be listed once, and every dependency must
// have its own line.
func ParseDepFile(r io.Reader) (*DepFile, error) {
	d := &DepFile{byName: map[string]DepEntry{}}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 4096), maxDepLine)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		mod, deps, ok := strings.Cut(text, ":")
		if !ok {
			return nil, fmt.Errorf("%w: line %d: no ':' after the module path", ErrDepFile, line)
		}
		e := DepEntry{Path: strings.TrimSpace(mod), Deps: strings.Fields(deps)}
		for _, p := range append([]string{e.Path}, e.Deps...) {
			if err := checkModulePath(p); err != nil {
				return nil, fmt.Errorf("%w: line %d: %w", ErrDepFile, line, err)
			}
		}
		name := ModuleNameOf(e.Path)
		if _, dup := d.byName[name]; dup {
			return nil, fmt.Errorf("%w: line %d: module %s listed twice", ErrDepFile, line, name)
		}
		if len(d.names) == maxDepModules {
			return nil, fmt.Errorf("%w: more than %d modules", ErrDepFile, maxDepModules)
		}
		d.byName[name] = e
		d.names = append(d.names, name)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: line %d: %w", ErrDepFile, line+1, err)
	}
	for _, name := range d.names {
		e := d.byName[name]
		for _, dep := range e.Deps {
			de, ok := d.byName[ModuleNameOf(dep)]
			if !ok || de.Path != dep {
				return nil, fmt.Errorf("%w: %s needs %s, which has no line of its own", ErrDepFile, e.Path, dep)
			}
			if dep == e.Path {
				return nil, fmt.Errorf("%w: %s depends on itself", ErrDepFile, e.Path)
			}
		}
	}
	return d, nil
}

func checkModulePath(p string) error {
	switch {
	case p == "" || len(p) > 4096:
		return fmt.Errorf("module path of %d bytes", len(p))
	case path.IsAbs(p) || path.Clean(p) != p || p == ".." || strings.HasPrefix(p, "../"):
		return fmt.Errorf("module path %q is not a clean path inside the modules directory", p)
	case !strings.HasSuffix(p, ".ko"):
		return fmt.Errorf("module path %q does not end in .ko", p)
	}
	name := ModuleNameOf(p)
	if name == "" || len(name) > maxModuleName {
		return fmt.Errorf("module path %q: module name of %d bytes, want 1..%d", p, len(name), maxModuleName)
	}
	return nil
}

// Names returns the modules' names in file order.
func (d *DepFile) Names() []string { return append([]string(nil), d.names...) }

// Entry returns the line of module name.
func (d *DepFile) Entry(name string) (DepEntry, bool) {
	e, ok := d.byName[NormalizeModuleName(name)]
	return e, ok
}

// LoadOrder returns the files to load, in order, so that each named module
// loads after everything it needs; each file appears once.
func (d *DepFile) LoadOrder(names ...string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	add := func(p string) {
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for _, n := range names {
		e, ok := d.Entry(n)
		if !ok {
			return nil, fmt.Errorf("%w: %s", ErrUnknownModule, n)
		}
		for i := len(e.Deps) - 1; i >= 0; i-- {
			add(e.Deps[i])
		}
		add(e.Path)
	}
	return out, nil
}

// WriteDepFile writes entries in modules.dep format.
func WriteDepFile(w io.Writer, entries []DepEntry) error {
	bw := bufio.NewWriter(w)
	for _, e := range entries {
		bw.WriteString(e.Path + ":")
		for _, d := range e.Deps {
			bw.WriteString(" " + d)
		}
		bw.WriteString("\n")
	}
	return bw.Flush()
}
