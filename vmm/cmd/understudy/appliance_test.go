package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/initramfs/appliance"
)

// TestApplianceCLI runs `understudy appliance` through its flags (the uinit
// itself is tested in initramfs/appliance): it reads the command line from
// --cmdline, takes --root for the image root and --kvm for the device, and
// powers off only inside the image.
func TestApplianceCLI(t *testing.T) {
	dir := t.TempDir()
	cl := filepath.Join(dir, "cmdline")
	if err := os.WriteFile(cl, []byte(`understudy.role=test understudy.exec="sh -c 'exit 3'"`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	nokvm := filepath.Join(dir, "nokvm")
	for _, tt := range []struct {
		args []string
		want []string
	}{
		{[]string{"--poweroff=false"}, nil},
		{nil, []string{"not powering off: " + dir + " is not the appliance image"}},
	} {
		args := append([]string{"appliance", "--cmdline", cl, "--root", dir, "--kvm", nokvm}, tt.args...)
		code, out, errs := runCLI(args...)
		if code != 3 || errs != "" {
			t.Errorf("understudy %q = %d, stderr %q; want the command's 3 and no stderr", args, code, errs)
		}
		want := append([]string{
			appliance.Tag + "starting: understudy " + versionString() + "\n",
			appliance.Tag + "kvm: unavailable (module none loaded): ",
			appliance.Tag + "exec: exit status 3 after ",
			appliance.Tag + "done status=3\n",
		}, tt.want...)
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("understudy %q: console lacks %q:\n%s", args, w, out)
			}
		}
		if len(tt.want) == 0 && strings.Contains(out, "powering off") {
			t.Errorf("understudy %q: console mentions powering off:\n%s", args, out)
		}
	}
	code, out, errs := runCLI("appliance", "--help")
	if code != 0 || !strings.Contains(out+errs, "understudy.role=ROLE") {
		t.Errorf("understudy appliance --help = %d, %q; want the command line options", code, out+errs)
	}
}
