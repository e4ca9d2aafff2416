package initramfs

import (
	"bufio"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// ModuleTree indexes the modules of an unpacked kernel's
// /lib/modules/RELEASE directory.
type ModuleTree struct {
	Dir     string
	files   map[string]string // module name -> file, relative to Dir
	builtin map[string]bool
}

// IndexModules walks dir/kernel for module files and reads
// dir/modules.builtin. A Debian package has no modules.dep (depmod makes it
// at install time), so dependencies come from each module's .modinfo.
func IndexModules(dir string) (*ModuleTree, error) {
	t := &ModuleTree{Dir: dir, files: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !isModuleFile(p) {
			return nil
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil {
			return err
		}
		name := boot.ModuleNameOf(rel)
		if other, dup := t.files[name]; dup {
			return fmt.Errorf("module %s is both %s and %s", name, other, rel)
		}
		t.files[name] = filepath.ToSlash(rel)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("index modules: %w", err)
	}
	if f, err := os.Open(filepath.Join(dir, "modules.builtin")); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if l := strings.TrimSpace(sc.Text()); l != "" {
				t.builtin[boot.ModuleNameOf(l)] = true
			}
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("modules.builtin: %w", err)
		}
	}
	return t, nil
}

func isModuleFile(p string) bool {
	for _, s := range []string{".ko", ".ko.xz", ".ko.gz"} {
		if strings.HasSuffix(p, s) {
			return true
		}
	}
	return false
}

// Module is a module chosen for an image.
type Module struct {
	Name    string
	Src     string   // file in the tree, relative to its Dir (maybe compressed)
	Path    string   // file in the image, relative to /lib/modules/RELEASE (.ko)
	Depends []string // the modules it needs directly
	Data    []byte   // uncompressed contents
}

// Resolve returns the named modules and everything they need, in load order
// (each after its dependencies), and the named modules that are built into
// the kernel and so need no file. A name that is neither a module nor built
// in is an error, as is a dependency cycle.
func (t *ModuleTree) Resolve(names []string) (mods []Module, builtin []string, err error) {
	const (
		visiting = 1
		done     = 2
	)
	state := map[string]int{}
	var visit func(name, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case visiting:
			return fmt.Errorf("module dependency cycle through %s", name)
		case done:
			return nil
		}
		rel, ok := t.files[name]
		if !ok {
			if t.builtin[name] {
				state[name] = done
				builtin = append(builtin, name)
				return nil
			}
			if from != "" {
				return fmt.Errorf("module %s (needed by %s) is neither in %s nor built in", name, from, t.Dir)
			}
			return fmt.Errorf("module %s is neither in %s nor built in", name, t.Dir)
		}
		state[name] = visiting
		data, mi, err := ReadModule(filepath.Join(t.Dir, filepath.FromSlash(rel)))
		if err != nil {
			return err
		}
		if mi.Name != "" && mi.Name != name {
			return fmt.Errorf("%s: .modinfo names the module %s, its file name %s", rel, mi.Name, name)
		}
		for _, d := range mi.Depends {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = done
		out := rel
		for _, s := range []string{".xz", ".gz"} {
			out = strings.TrimSuffix(out, s)
		}
		mods = append(mods, Module{Name: name, Src: rel, Path: out, Depends: mi.Depends, Data: data})
		return nil
	}
	for _, n := range names {
		if err := visit(boot.NormalizeModuleName(n), ""); err != nil {
			return nil, nil, err
		}
	}
	return mods, builtin, nil
}

// DepEntries returns modules.dep lines for mods (as Resolve returns them):
// each module with every module it needs, directly or not, in depmod's
// order (the one to load first is last).
func DepEntries(mods []Module) []boot.DepEntry {
	byName := map[string]Module{}
	for _, m := range mods {
		byName[m.Name] = m
	}
	var out []boot.DepEntry
	for _, m := range mods {
		var order []string // load order of m's dependencies
		seen := map[string]bool{}
		var walk func(name string)
		walk = func(name string) {
			for _, d := range byName[name].Depends {
				dm, ok := byName[d]
				if !ok || seen[d] { // built in, or already listed
					continue
				}
				seen[d] = true
				walk(d)
				order = append(order, dm.Path)
			}
		}
		walk(m.Name)
		e := boot.DepEntry{Path: m.Path}
		for i := len(order) - 1; i >= 0; i-- {
			e.Deps = append(e.Deps, order[i])
		}
		out = append(out, e)
	}
	return out
}

// StageModules writes mods (uncompressed) and their modules.dep under
// dest/lib/modules/RELEASE and returns the files written, relative to dest.
func StageModules(dest, release string, mods []Module) ([]string, error) {
	base := path.Join("lib", "modules", release)
	if err := os.MkdirAll(filepath.Join(dest, filepath.FromSlash(base)), 0o755); err != nil {
		return nil, err
	}
	var files []string
	for _, m := range mods {
		rel := path.Join(base, m.Path)
		p := filepath.Join(dest, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		if err := os.WriteFile(p, m.Data, 0o644); err != nil {
			return nil, err
		}
		files = append(files, rel)
	}
	rel := path.Join(base, "modules.dep")
	f, err := os.Create(filepath.Join(dest, filepath.FromSlash(rel)))
	if err != nil {
		return nil, err
	}
	if err := boot.WriteDepFile(f, DepEntries(mods)); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	return append(files, rel), nil
}
