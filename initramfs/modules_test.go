package initramfs

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/ulikunitz/xz"
	"github.com/understudy-vmm/understudy/initramfs/boot"
)

// elfModule returns a minimal ELF64 relocatable file whose only contents
// is a .modinfo section with the given key=value fields: enough for
// debug/elf and ReadModule, as a real .ko is.
func elfModule(fields ...string) []byte {
	modinfo := []byte(strings.Join(fields, "\x00") + "\x00")
	shstr := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	modOff := ehsize
	strOff := modOff + len(modinfo)
	shOff := (strOff + len(shstr) + 7) &^ 7
	b := make([]byte, shOff+3*shentsize)
	copy(b, []byte{0x7f, 'E', 'L', 'F', 2, 1, 1})
	le := binary.LittleEndian
	le.PutUint16(b[16:], 1)  // ET_REL
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)  // EV_CURRENT
	le.PutUint64(b[40:], uint64(shOff))
	le.PutUint16(b[52:], ehsize)
	le.PutUint16(b[58:], shentsize)
	le.PutUint16(b[60:], 3) // section headers
	le.PutUint16(b[62:], 2) // .shstrtab is section 2
	copy(b[modOff:], modinfo)
	copy(b[strOff:], shstr)
	sh := func(i int, name, typ uint32, off, size int) {
		h := b[shOff+i*shentsize:]
		le.PutUint32(h[0:], name)
		le.PutUint32(h[4:], typ)
		le.PutUint64(h[24:], uint64(off))
		le.PutUint64(h[32:], uint64(size))
		le.PutUint64(h[48:], 1)
	}
	sh(1, 1, 1, modOff, len(modinfo)) // .modinfo, SHT_PROGBITS
	sh(2, 10, 3, strOff, len(shstr))  // .shstrtab, SHT_STRTAB
	return b
}

// writeTree writes a fake lib/modules/RELEASE directory: name -> file
// (relative, maybe compressed) with the given dependencies.
func writeTree(t *testing.T, mods map[string][]string, builtin ...string) string {
	t.Helper()
	dir := t.TempDir()
	for file, deps := range mods {
		name := boot.ModuleNameOf(file)
		data := elfModule("license=GPL", "depends="+strings.Join(deps, ","), "name="+name, "vermagic=6.1.0 SMP")
		var buf bytes.Buffer
		switch {
		case strings.HasSuffix(file, ".xz"):
			w, err := xz.NewWriter(&buf)
			if err != nil {
				t.Fatal(err)
			}
			w.Write(data)
			w.Close()
			data = buf.Bytes()
		case strings.HasSuffix(file, ".gz"):
			w := gzip.NewWriter(&buf)
			w.Write(data)
			w.Close()
			data = buf.Bytes()
		}
		p := filepath.Join(dir, "kernel", file)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var bl []string
	for _, b := range builtin {
		bl = append(bl, "kernel/"+b+".ko")
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte(strings.Join(bl, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestResolveStage(t *testing.T) {
	dir := writeTree(t, map[string][]string{
		"virt/lib/irqbypass.ko":      nil,
		"arch/x86/kvm/kvm.ko.xz":     {"irqbypass"},
		"arch/x86/kvm/kvm-amd.ko.gz": {"kvm", "ccp", "crc32c"},
		"drivers/crypto/ccp/ccp.ko":  {"irqbypass"},
		"net/tun.ko":                 nil,
	}, "crc32c")
	tree, err := IndexModules(dir)
	if err != nil {
		t.Fatal(err)
	}
	mods, builtin, err := tree.Resolve([]string{"kvm-amd", "tun", "kvm"})
	if err != nil {
		t.Fatal(err)
	}
	if got := names(mods); got != "irqbypass kvm ccp kvm_amd tun" {
		t.Errorf("Resolve load order = %q", got)
	}
	if !reflect.DeepEqual(builtin, []string{"crc32c"}) {
		t.Errorf("built in = %v, want [crc32c]", builtin)
	}
	if mods[1].Src != "kernel/arch/x86/kvm/kvm.ko.xz" || mods[1].Path != "kernel/arch/x86/kvm/kvm.ko" {
		t.Errorf("kvm: Src %q Path %q", mods[1].Src, mods[1].Path)
	}
	dest := t.TempDir()
	files, err := StageModules(dest, "6.1.0-test", mods)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 6 || files[5] != "lib/modules/6.1.0-test/modules.dep" {
		t.Errorf("StageModules files = %v", files)
	}
	// The staged modules are uncompressed ELF files again.
	if _, mi, err := ReadModule(filepath.Join(dest, "lib/modules/6.1.0-test/kernel/arch/x86/kvm/kvm-amd.ko")); err != nil || mi.Name != "kvm_amd" {
		t.Errorf("staged kvm-amd.ko: %+v, %v", mi, err)
	}
	f, err := os.Open(filepath.Join(dest, "lib/modules/6.1.0-test/modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dep, err := boot.ParseDepFile(f)
	if err != nil {
		t.Fatal(err)
	}
	order, err := dep.LoadOrder("kvm_amd")
	want := []string{"kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko", "kernel/drivers/crypto/ccp/ccp.ko", "kernel/arch/x86/kvm/kvm-amd.ko"}
	if err != nil || !reflect.DeepEqual(order, want) {
		t.Errorf("staged modules.dep: LoadOrder(kvm_amd) = %v, %v, want %v", order, err, want)
	}
}

func TestResolveErrors(t *testing.T) {
	dir := writeTree(t, map[string][]string{"a.ko": {"b"}, "b.ko": {"a"}, "c.ko": {"nosuch"}})
	tree, err := IndexModules(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ name, want string }{
		{"a", "dependency cycle"},
		{"c", "module nosuch (needed by c) is neither in"},
		{"zzz", "module zzz is neither in"},
	} {
		if _, _, err := tree.Resolve([]string{tt.name}); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Resolve(%s) = %v, want %q", tt.name, err, tt.want)
		}
	}
	// Two files for one module.
	dir = writeTree(t, map[string][]string{"x/m.ko": nil, "y/m.ko.xz": nil})
	if _, err := IndexModules(dir); err == nil || !strings.Contains(err.Error(), "module m is both") {
		t.Errorf("IndexModules with a duplicate = %v", err)
	}
}

func TestReadModuleErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tt := range []struct {
		file string
		data []byte
		want string
	}{
		{"notelf.ko", []byte("hello"), "not an ELF module"},
		{"notelf2.ko", []byte(strings.Repeat("hello", 20)), "bad magic"},
		{"bad.ko.xz", []byte("not xz"), ".ko.xz"},
		{"bad.ko.gz", []byte("not gz"), ".ko.gz"},
		{"mod.o", elfModule("name=mod"), "not a .ko"},
		{"badname.ko", elfModule("name=a b"), "name="},
		{"baddep.ko", elfModule("depends=ok,../x"), "depends names"},
	} {
		p := filepath.Join(dir, tt.file)
		if err := os.WriteFile(p, tt.data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, _, err := ReadModule(p); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ReadModule(%s) = %v, want an error containing %q", tt.file, err, tt.want)
		}
	}
}

func TestParseModinfo(t *testing.T) {
	mi, err := ParseModinfo([]byte("license=GPL\x00depends=kvm,ccp,irq-bypass\x00\x00\x00retpoline=Y\x00name=kvm_amd\x00vermagic=6.1.0-56-amd64 SMP\x00junk\x00"))
	want := Modinfo{Name: "kvm_amd", Depends: []string{"kvm", "ccp", "irq_bypass"}, Vermagic: "6.1.0-56-amd64 SMP"}
	if err != nil || !reflect.DeepEqual(mi, want) {
		t.Errorf("ParseModinfo = %+v, %v, want %+v", mi, err, want)
	}
	if mi, err := ParseModinfo([]byte("depends=\x00")); err != nil || mi.Depends != nil {
		t.Errorf("ParseModinfo(empty depends) = %+v, %v", mi, err)
	}
	for _, bad := range []string{"name=a\x00name=b", "depends=a,b c", "name=", "depends=x/y"} {
		if _, err := ParseModinfo([]byte(bad)); !errors.Is(err, ErrModinfo) {
			t.Errorf("ParseModinfo(%q) = %v, want ErrModinfo", bad, err)
		}
	}
}

func FuzzParseModinfo(f *testing.F) {
	f.Add([]byte("license=GPL\x00depends=kvm,ccp\x00name=kvm_amd\x00"))
	f.Add([]byte("depends=\x00name=x\x00name=y"))
	f.Add([]byte("\x00\x00="))
	f.Fuzz(func(t *testing.T, b []byte) {
		mi, err := ParseModinfo(b)
		if err != nil {
			if !errors.Is(err, ErrModinfo) {
				t.Fatalf("error %v does not wrap ErrModinfo", err)
			}
			return
		}
		for _, d := range append([]string{mi.Name}, mi.Depends...) {
			if strings.ContainsAny(d, "/-. \x00") {
				t.Fatalf("ParseModinfo accepted the module name %q", d)
			}
		}
	})
}

// TestDebianKVMModules checks the real thing when `make image` has unpacked
// the Debian kernel: kvm_amd and everything it needs resolve, in an order
// that loads kvm before kvm_amd.
func TestDebianKVMModules(t *testing.T) {
	cache := filepath.Join("..", "build", "cache", "kernel")
	k, err := cachedKernel(cache)
	if err != nil {
		t.Skipf("no unpacked Debian kernel in %s (make image unpacks one): %v", cache, err)
	}
	tree, err := IndexModules(k.ModulesDir())
	if err != nil {
		t.Fatal(err)
	}
	mods, _, err := tree.Resolve(ApplianceModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		pos[m.Name] = i
	}
	for _, n := range append(ApplianceModules, "irqbypass") {
		if _, ok := pos[n]; !ok {
			t.Errorf("%s not among the resolved modules %s", n, names(mods))
		}
	}
	if pos["kvm"] > pos["kvm_amd"] || pos["irqbypass"] > pos["kvm"] || pos["virtio"] > pos["virtio_net"] {
		t.Errorf("load order %s puts a module before what it needs", names(mods))
	}
}
