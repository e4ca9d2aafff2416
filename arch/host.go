package arch

import (
	"os"
	"strings"
)

// ShadowPaging reports whether the host's KVM uses shadow paging for its
// guests (PVM, or EPT/NPT switched off). There KVM maps a guest region with a
// 2 MiB entry only if the guest itself maps it with a 2 MiB page; with EPT or
// NPT the guest's mapping size does not matter.
func ShadowPaging() bool {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return true
	}
	for _, p := range []string{"/sys/module/kvm_intel/parameters/ept", "/sys/module/kvm_amd/parameters/npt"} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		v := strings.TrimSpace(string(b))
		return v == "N" || v == "0"
	}
	return false
}
