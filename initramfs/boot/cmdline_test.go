package boot

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Params
	}{
		{"", nil},
		{"  \n", nil},
		{"console=ttyS0 quiet\n", Params{{"console", "ttyS0", true}, {"quiet", "", false}}},
		{`understudy.exec="run --kernel /boot/vmlinuz"`, Params{{"understudy.exec", "run --kernel /boot/vmlinuz", true}}},
		{`"a=b c" d`, Params{{"a", "b c", true}, {"d", "", false}}},
		{`a="" b=`, Params{{"a", "", true}, {"b", "", true}}},
		{"a=b=c", Params{{"a", "b=c", true}}},
		{"x\ty", Params{{"x", "", false}, {"y", "", false}}},
		{`a="x 'y z'"`, Params{{"a", "x 'y z'", true}}},
		{"-- init args", Params{{"--", "", false}, {"init", "", false}, {"args", "", false}}},
	} {
		got, err := ParseCmdline(tt.in)
		if err != nil || !reflect.DeepEqual(got, tt.want) {
			t.Errorf("ParseCmdline(%q) = %v, %v, want %v", tt.in, got, err, tt.want)
		}
	}
}

func TestParseCmdlineErrors(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{`a="b`, "quote at byte 2 is not closed"},
		{"a=\"b\nc\"", "newline inside the quote"},
		{"a=\x00", "control character"},
		{"a=\x1b[2J", "control character"},
		{"=x", "empty key"},
		{`" "`, "contains white space"},
		{`"a b=c"`, "contains white space"},
		{"\xff", "UTF-8"},
		{strings.Repeat("a", MaxCmdline+1), "longer than"},
	} {
		_, err := ParseCmdline(tt.in)
		if !errors.Is(err, ErrCmdline) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ParseCmdline(%.20q) = %v, want an ErrCmdline containing %q", tt.in, err, tt.want)
		}
	}
}

func TestModuleParams(t *testing.T) {
	ps, err := ParseCmdline(`kvm_amd.nested=1 kvm-amd.npt=1 kvm.x=1 virtio_mmio.device="4K@0xd0000000:5" virtio_mmio.device=4K@0xd0001000:6 kvm_amd.flag kvm_amd. .x=1`)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ mod, want string }{
		{"kvm_amd", "nested=1 npt=1 flag"},
		{"kvm-amd", "nested=1 npt=1 flag"},
		{"kvm", "x=1"},
		{"virtio_mmio", "device=4K@0xd0000000:5 device=4K@0xd0001000:6"},
		{"tun", ""},
	} {
		if got := ps.ModuleParams(tt.mod); got != tt.want {
			t.Errorf("ModuleParams(%q) = %q, want %q", tt.mod, got, tt.want)
		}
	}
	ps = Params{{Key: "m.p", Value: "a b", HasValue: true}}
	if got := ps.ModuleParams("m"); got != `p="a b"` {
		t.Errorf("ModuleParams with a space = %q, want %q", got, `p="a b"`)
	}
}

func TestLookupWithPrefix(t *testing.T) {
	ps, _ := ParseCmdline("understudy.tap=a understudy.role=run understudy.tap=b other=1")
	if got := ps.Lookup("understudy.tap"); !reflect.DeepEqual(got, []string{"a", "b"}) {
		t.Errorf("Lookup = %v", got)
	}
	got := ps.WithPrefix("understudy.")
	if len(got) != 3 || got[1].Key != "role" || got[1].Value != "run" {
		t.Errorf("WithPrefix = %v", got)
	}
}

func FuzzParseCmdline(f *testing.F) {
	for _, s := range []string{"", "console=ttyS0 quiet", `a="b c" "d=e f"`, `a="`, "=x", "a=\x00", "m.p=1 m-x.q"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ps, err := ParseCmdline(s)
		if err != nil {
			if !errors.Is(err, ErrCmdline) {
				t.Fatalf("error %v does not wrap ErrCmdline", err)
			}
			return
		}
		for _, p := range ps {
			if p.Key == "" || strings.ContainsAny(p.Key+p.Value, "\"\n\x00") {
				t.Fatalf("ParseCmdline(%q) gave parameter %q", s, p)
			}
			if !p.HasValue && p.Value != "" {
				t.Fatalf("bare key %q with value %q", p.Key, p.Value)
			}
			// A parameter printed back with quotes parses to itself.
			q := p.Key
			if p.HasValue {
				q += `="` + p.Value + `"`
			}
			back, err := ParseCmdline(q)
			if err != nil || len(back) != 1 || back[0] != p {
				t.Fatalf("round trip of %q: %v, %v", p, back, err)
			}
			_ = ps.ModuleParams(p.Key)
		}
	})
}
