package boot

import (
	"bytes"
	"errors"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// kvmDep is modules.dep as the image builder writes it for the KVM modules.
const kvmDep = `kernel/virt/lib/irqbypass.ko:
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko kernel/drivers/crypto/ccp/ccp.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
`

func TestParseDepFileLoadOrder(t *testing.T) {
	d, err := ParseDepFile(strings.NewReader(kvmDep))
	if err != nil {
		t.Fatal(err)
	}
	if got := d.Names(); !reflect.DeepEqual(got, []string{"irqbypass", "kvm", "kvm_amd", "ccp", "kvm_intel"}) {
		t.Errorf("Names() = %v", got)
	}
	got, err := d.LoadOrder("kvm-amd", "kvm_intel")
	want := []string{
		"kernel/drivers/crypto/ccp/ccp.ko", "kernel/virt/lib/irqbypass.ko", "kernel/arch/x86/kvm/kvm.ko",
		"kernel/arch/x86/kvm/kvm-amd.ko", "kernel/arch/x86/kvm/kvm-intel.ko",
	}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("LoadOrder(kvm-amd, kvm_intel) = %v, %v, want %v", got, err, want)
	}
	if _, err := d.LoadOrder("vhost"); !errors.Is(err, ErrUnknownModule) {
		t.Errorf("LoadOrder(vhost) = %v, want ErrUnknownModule", err)
	}
	var buf bytes.Buffer
	var entries []DepEntry
	for _, n := range d.Names() {
		e, _ := d.Entry(n)
		entries = append(entries, e)
	}
	if err := WriteDepFile(&buf, entries); err != nil || buf.String() != kvmDep {
		t.Errorf("WriteDepFile = %q, %v, want the input back", buf.String(), err)
	}
}

func TestParseDepFileErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"kernel/a.ko kernel/b.ko\n", "no ':'"},
		{"/lib/a.ko:\n", "not a clean path"},
		{"kernel/../../a.ko:\n", "not a clean path"},
		{"../a.ko:\n", "not a clean path"},
		{"kernel//a.ko:\n", "not a clean path"},
		{"kernel/a.ko.xz:\n", "does not end in .ko"},
		{"kernel/a.ko:\nother/a.ko:\n", "listed twice"},
		{"kernel/a.ko: kernel/b.ko\n", "has no line of its own"},
		{"kernel/a.ko: kernel/a.ko\n", "depends on itself"},
		{"kernel/a.ko: x/b.ko\nkernel/b.ko:\n", "has no line of its own"},
		{"kernel/.ko:\n", "module name of 0 bytes"},
		{"k/" + strings.Repeat("m", 60) + ".ko:\n", "module name of 60 bytes"},
		{strings.Repeat("x", maxDepLine+1), "token too long"},
	} {
		_, err := ParseDepFile(strings.NewReader(tt.in))
		if !errors.Is(err, ErrDepFile) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseDepFile(%.40q) = %v, want an ErrDepFile containing %q", tt.in, err, tt.want)
		}
	}
}

func TestModuleNameOf(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/arch/x86/kvm/kvm-amd.ko": "kvm_amd", "kvm.ko.xz": "kvm", "a/b/sch_tbf.ko.zst": "sch_tbf", "x-y.ko.gz": "x_y",
	} {
		if got := ModuleNameOf(in); got != want {
			t.Errorf("ModuleNameOf(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestLoadModulesFailure loads files that are not modules: the kernel refuses
// the first (whatever the reason: not a module, no module support, no
// permission) and the one that needs it is not tried.
func TestLoadModulesFailure(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"kernel/a.ko", "kernel/b.ko"} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte("not an ELF module"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d, err := ParseDepFile(strings.NewReader("kernel/a.ko:\nkernel/b.ko: kernel/a.ko\n"))
	if err != nil {
		t.Fatal(err)
	}
	ps := Params{{Key: "b.x", Value: "1", HasValue: true}}
	res := LoadModules(dir, d, []string{"b", "nosuch"}, ps)
	if len(res) != 3 {
		t.Fatalf("LoadModules gave %d results, want 3: %+v", len(res), res)
	}
	if res[0].Name != "a" || res[0].Err == nil || !strings.Contains(res[0].Err.Error(), "load module") {
		t.Errorf("result 0 = %+v, want a refused by the kernel", res[0])
	}
	if res[1].Name != "b" || res[1].Params != "x=1" || res[1].Err == nil || !strings.Contains(res[1].Err.Error(), "needs a, which did not load") {
		t.Errorf("result 1 = %+v, want b not tried because of a", res[1])
	}
	if !errors.Is(res[2].Err, ErrUnknownModule) {
		t.Errorf("result 2 = %+v, want ErrUnknownModule", res[2])
	}
	if err := LoadModule(filepath.Join(dir, "missing.ko"), ""); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LoadModule(missing) = %v, want ErrNotExist", err)
	}
}

func FuzzParseDepFile(f *testing.F) {
	f.Add(kvmDep)
	f.Add("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n# comment\n\n")
	f.Add("a.ko:b.ko\nb.ko:a.ko\n")
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDepFile(strings.NewReader(s))
		if err != nil {
			if !errors.Is(err, ErrDepFile) {
				t.Fatalf("error %v does not wrap ErrDepFile", err)
			}
			return
		}
		for _, n := range d.Names() {
			order, err := d.LoadOrder(n)
			if err != nil {
				t.Fatalf("LoadOrder(%s) of a parsed file: %v", n, err)
			}
			e, _ := d.Entry(n)
			if len(order) == 0 || order[len(order)-1] != e.Path {
				t.Fatalf("LoadOrder(%s) = %v, want it to end with %s", n, order, e.Path)
			}
			seen := map[string]bool{}
			for _, p := range order {
				if seen[p] || path.Clean(p) != p || path.IsAbs(p) || strings.HasPrefix(p, "../") {
					t.Fatalf("LoadOrder(%s) = %v: repeated or escaping path %q", n, order, p)
				}
				seen[p] = true
			}
		}
	})
}
