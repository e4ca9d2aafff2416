package boot

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// ErrAlreadyLoaded is wrapped by LoadModule's error for a module the kernel
// already has.
var ErrAlreadyLoaded = errors.New("already loaded")

// LoadModule loads the uncompressed module file at path with the parameter
// string params (as for insmod: "a=1 b=x"), through finit_module(2).
func LoadModule(path, params string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("load module: %w", err)
	}
	defer f.Close()
	err = unix.FinitModule(int(f.Fd()), params, 0)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("load module %s: %w", path, ErrAlreadyLoaded)
	case errors.Is(err, unix.ENODEV):
		return fmt.Errorf("load module %s: %w (the hardware or CPU feature it needs is absent)", path, err)
	case errors.Is(err, unix.ENOEXEC):
		return fmt.Errorf("load module %s: %w (not a module for this kernel)", path, err)
	default:
		return fmt.Errorf("load module %s: %w", path, err)
	}
}

// LoadResult is the outcome of loading one module file.
type LoadResult struct {
	Name    string        // module name
	Path    string        // file, relative to the modules directory
	Params  string        // parameters passed (from the command line)
	Already bool          // the kernel had it before
	Err     error         // nil when it is loaded now
	Took    time.Duration // time spent in finit_module
}

// LoadModules loads the modules named in names and everything they need, in
// dependency order, from the modules directory dir (/lib/modules/RELEASE)
// described by d. Parameters come from the command line params as modprobe
// takes them (module.param=value). It goes on after a failure: a module
// whose dependency failed is reported with an error naming it and not
// loaded. Every file tried gets one result, in load order; a name that d
// does not know gets a result wrapping ErrUnknownModule.
func LoadModules(dir string, d *DepFile, names []string, params Params) []LoadResult {
	var out []LoadResult
	failed := map[string]string{} // path -> name of the module that failed
	done := map[string]bool{}
	for _, n := range names {
		order, err := d.LoadOrder(n)
		if err != nil {
			out = append(out, LoadResult{Name: NormalizeModuleName(n), Err: err})
			continue
		}
		var broken string
		for _, p := range order {
			if done[p] {
				if f, ok := failed[p]; ok && broken == "" {
					broken = f
				}
				continue
			}
			done[p] = true
			r := LoadResult{Name: ModuleNameOf(p), Path: p, Params: params.ModuleParams(ModuleNameOf(p))}
			if broken != "" {
				r.Err = fmt.Errorf("load module %s: not tried: it needs %s, which did not load", r.Name, broken)
				failed[p] = broken
				out = append(out, r)
				continue
			}
			start := time.Now()
			err := LoadModule(filepath.Join(dir, filepath.FromSlash(p)), r.Params)
			r.Took = time.Since(start)
			switch {
			case errors.Is(err, ErrAlreadyLoaded):
				r.Already = true
			case err != nil:
				r.Err = err
				failed[p] = r.Name
				broken = r.Name
			}
			out = append(out, r)
		}
	}
	return out
}
