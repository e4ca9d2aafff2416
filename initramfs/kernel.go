package initramfs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// DefaultMetaPackage is the Debian metapackage that names the current kernel.
const DefaultMetaPackage = "linux-image-amd64"

// Kernel is an unpacked Debian kernel package in the build cache.
type Kernel struct {
	Package string // e.g. linux-image-6.1.0-56-amd64
	Version string // the Debian version, e.g. 6.1.192-2
	Release string // uname -r, e.g. 6.1.0-56-amd64
	Root    string // where the package is unpacked (boot/, lib/modules/)
	Cached  bool   // true when nothing had to be downloaded or unpacked
}

// Vmlinuz returns the path of the kernel image.
func (k Kernel) Vmlinuz() string { return filepath.Join(k.Root, "boot", "vmlinuz-"+k.Release) }

// ModulesDir returns the package's /lib/modules/RELEASE.
func (k Kernel) ModulesDir() string { return filepath.Join(k.Root, "lib", "modules", k.Release) }

// FetchKernel makes the kernel that metapackage meta currently depends on
// available unpacked under cacheDir: it asks apt-cache which versioned
// package and version that is, downloads the .deb with `apt-get download`
// unless it is cached, and unpacks it with `dpkg-deb -x` unless that was
// done before. Nothing is installed on the host. Other kernels in cacheDir
// are removed once the new one is unpacked. When apt cannot answer or
// deliver (no package lists, no network), a kernel already in the cache is
// used, with a warning.
//
// With a suite ("bookworm-backports"), apt reads that suite of Debian's
// archive alone, through package lists kept in cacheDir/apt (refreshed with
// apt-get update there), instead of the host's sources.
func FetchKernel(ctx context.Context, cacheDir, meta, suite string, logf func(string, ...any)) (Kernel, error) {
	// apt-get and dpkg-deb run in the cache directory: the paths given
	// to them must not be relative to ours.
	cacheDir, err := filepath.Abs(cacheDir)
	if err != nil {
		return Kernel{}, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return Kernel{}, err
	}
	apt, err := aptFor(ctx, cacheDir, suite, logf)
	if err != nil {
		return Kernel{}, err
	}
	k, err := fetchKernel(ctx, cacheDir, meta, apt, logf)
	if err != nil {
		cached, cerr := cachedKernel(cacheDir)
		if cerr != nil {
			return Kernel{}, fmt.Errorf("%w (and no kernel in the cache: %v)", err, cerr)
		}
		logf("warning: %v; using the cached %s %s", err, cached.Package, cached.Version)
		return cached, nil
	}
	return k, nil
}

// DebianMirror is the archive a suite's package lists come from.
const DebianMirror = "http://deb.debian.org/debian"

// aptFor returns the options that make apt use suite alone (none for the
// host's sources), after refreshing that suite's package lists. A suite
// that cannot be refreshed is an error unless its lists are there from
// before (then they are used, with a warning).
func aptFor(ctx context.Context, cacheDir, suite string, logf func(string, ...any)) ([]string, error) {
	if suite == "" {
		return nil, nil
	}
	if !validPackageName(suite) {
		return nil, fmt.Errorf("suite %q: not a Debian suite name", suite)
	}
	dir := filepath.Join(cacheDir, "apt")
	for _, d := range []string{filepath.Join(dir, "lists", "partial"), filepath.Join(dir, "cache", "archives", "partial"), filepath.Join(dir, "sources.list.d")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	list := filepath.Join(dir, "sources.list")
	if err := os.WriteFile(list, fmt.Appendf(nil, "deb %s %s main\n", DebianMirror, suite), 0o644); err != nil {
		return nil, err
	}
	opts := []string{"-o", "Dir::Etc::SourceList=" + list, "-o", "Dir::Etc::SourceParts=" + filepath.Join(dir, "sources.list.d"),
		"-o", "Dir::State::Lists=" + filepath.Join(dir, "lists"), "-o", "Dir::Cache=" + filepath.Join(dir, "cache")}
	logf("refreshing the package lists of %s (%s)", suite, DebianMirror)
	if err := runIn(ctx, dir, "apt-get", append(opts, "-q", "update")...); err != nil {
		lists, _ := filepath.Glob(filepath.Join(dir, "lists", "*_Packages*"))
		if len(lists) == 0 {
			return nil, err
		}
		logf("warning: %v; using the lists from before", err)
	}
	return opts, nil
}

func fetchKernel(ctx context.Context, cacheDir, meta string, apt []string, logf func(string, ...any)) (Kernel, error) {
	pkg, version, err := resolveKernel(ctx, meta, apt)
	if err != nil {
		return Kernel{}, err
	}
	k := Kernel{Package: pkg, Version: version, Root: filepath.Join(cacheDir, pkg+"_"+version), Cached: true}
	if _, err := os.Stat(filepath.Join(k.Root, ".unpacked")); err != nil {
		k.Cached = false
		deb := filepath.Join(cacheDir, debName(pkg, version))
		if _, err := os.Stat(deb); err != nil {
			logf("downloading %s %s with apt-get download", pkg, version)
			if err := runIn(ctx, cacheDir, "apt-get", append(slices.Clone(apt), "download", pkg+"="+version)...); err != nil {
				return Kernel{}, fmt.Errorf("%w (are the package lists current? apt-get update)", err)
			}
			if _, err := os.Stat(deb); err != nil {
				return Kernel{}, fmt.Errorf("apt-get download %s=%s did not leave %s: %w", pkg, version, deb, err)
			}
		}
		logf("unpacking %s with dpkg-deb -x", filepath.Base(deb))
		tmp := k.Root + ".tmp"
		os.RemoveAll(tmp)
		if err := runIn(ctx, cacheDir, "dpkg-deb", "-x", deb, tmp); err != nil {
			return Kernel{}, err
		}
		if err := os.WriteFile(filepath.Join(tmp, ".unpacked"), []byte(pkg+" "+version+"\n"), 0o644); err != nil {
			return Kernel{}, err
		}
		os.RemoveAll(k.Root)
		if err := os.Rename(tmp, k.Root); err != nil {
			return Kernel{}, err
		}
		pruneKernels(cacheDir, k, logf)
	}
	if k.Release, err = kernelRelease(k.Root); err != nil {
		return Kernel{}, err
	}
	return k, nil
}

// resolveKernel asks apt which package and version meta points at.
func resolveKernel(ctx context.Context, meta string, apt []string) (pkg, version string, err error) {
	out, err := exec.CommandContext(ctx, "apt-cache", append(slices.Clone(apt), "depends", meta)...).Output()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache depends %s: %w (run apt-get update first?)", meta, cmdErr(err))
	}
	if pkg, err = parseDepends(string(out), "linux-image-"); err != nil {
		return "", "", fmt.Errorf("apt-cache depends %s: %w", meta, err)
	}
	out, err = exec.CommandContext(ctx, "apt-cache", append(slices.Clone(apt), "show", "--no-all-versions", pkg)...).Output()
	if err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %w", pkg, cmdErr(err))
	}
	if version, err = parseVersion(string(out)); err != nil {
		return "", "", fmt.Errorf("apt-cache show %s: %w", pkg, err)
	}
	return pkg, version, nil
}

// parseDepends returns the first package of apt-cache depends output that
// the package depends on and whose name starts with prefix.
func parseDepends(out, prefix string) (string, error) {
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimPrefix(strings.TrimSpace(line), "|")
		dep, ok := strings.CutPrefix(line, "Depends:")
		if !ok {
			continue
		}
		dep = strings.TrimSpace(dep)
		if strings.HasPrefix(dep, prefix) && validPackageName(dep) {
			return dep, nil
		}
	}
	return "", fmt.Errorf("no dependency named %s* in %q", prefix, out)
}

// parseVersion returns the Version field of apt-cache show output.
func parseVersion(out string) (string, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version:"); ok {
			v = strings.TrimSpace(v)
			if !validVersion(v) {
				return "", fmt.Errorf("bad version %q", v)
			}
			return v, nil
		}
	}
	return "", fmt.Errorf("no Version field in %q", out)
}

// validPackageName follows Debian policy 5.6.1: lower-case letters, digits,
// '+', '-', '.', at least two characters, starting with a letter or digit.
func validPackageName(s string) bool {
	if len(s) < 2 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		case i > 0 && (c == '+' || c == '-' || c == '.'):
		default:
			return false
		}
	}
	return true
}

// validVersion follows Debian policy 5.6.12 loosely: [epoch:]upstream[-revision]
// from letters, digits and . + ~ - :, starting with a digit.
func validVersion(s string) bool {
	if s == "" || len(s) > 128 || s[0] < '0' || s[0] > '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) && !strings.ContainsRune(".+~-:", rune(s[i])) {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// debName is the file name apt-get download gives a package: an epoch's
// ':' is written "%3a".
func debName(pkg, version string) string {
	return pkg + "_" + strings.ReplaceAll(version, ":", "%3a") + "_amd64.deb"
}

// kernelRelease finds the one lib/modules/RELEASE directory of an unpacked
// kernel package, with its boot/vmlinuz-RELEASE.
func kernelRelease(root string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if err != nil {
		return "", fmt.Errorf("unpacked kernel: %w", err)
	}
	if len(ents) != 1 || !ents[0].IsDir() {
		return "", fmt.Errorf("unpacked kernel %s: want one directory in lib/modules, found %d entries", root, len(ents))
	}
	rel := ents[0].Name()
	if _, err := os.Stat(filepath.Join(root, "boot", "vmlinuz-"+rel)); err != nil {
		return "", fmt.Errorf("unpacked kernel: %w", err)
	}
	return rel, nil
}

// cachedKernel returns the one unpacked kernel in cacheDir.
func cachedKernel(cacheDir string) (Kernel, error) {
	var found []Kernel
	ents, _ := os.ReadDir(cacheDir)
	for _, e := range ents {
		root := filepath.Join(cacheDir, e.Name())
		b, err := os.ReadFile(filepath.Join(root, ".unpacked"))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) != 2 {
			continue
		}
		rel, err := kernelRelease(root)
		if err != nil {
			continue
		}
		found = append(found, Kernel{Package: f[0], Version: f[1], Release: rel, Root: root, Cached: true})
	}
	if len(found) != 1 {
		return Kernel{}, fmt.Errorf("%d unpacked kernels in %s, want 1", len(found), cacheDir)
	}
	return found[0], nil
}

// pruneKernels removes the debs and trees of kernels other than keep.
func pruneKernels(cacheDir string, keep Kernel, logf func(string, ...any)) {
	ents, _ := os.ReadDir(cacheDir)
	for _, e := range ents {
		n := e.Name()
		if n == filepath.Base(keep.Root) || n == debName(keep.Package, keep.Version) {
			continue
		}
		if strings.HasPrefix(n, "linux-image-") {
			logf("removing the old %s from the cache", n)
			os.RemoveAll(filepath.Join(cacheDir, n))
		}
	}
}

// runIn runs a command in dir; its error carries the command's output.
func runIn(ctx context.Context, dir, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// cmdErr adds a failed command's standard error to its error.
func cmdErr(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(ee.Stderr)))
	}
	return err
}
