package virtio

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckIfName(t *testing.T) {
	for _, ok := range []string{"tap0", "eth0", "a", "x-y_z.1", "...", strings.Repeat("n", 15)} {
		if err := CheckIfName(ok); err != nil {
			t.Errorf("CheckIfName(%q) = %v, want nil", ok, err)
		}
	}
	for _, tt := range []struct{ name, want string }{
		{"", "want 1 to 15 characters"},
		{strings.Repeat("n", 16), "want 1 to 15 characters"},
		{".", `other than "." and ".."`},
		{"..", `other than "." and ".."`},
		{"a/b", `'/' is not allowed`},
		{"../eth0", `'/' is not allowed`},
		{"a:1", `':' is not allowed`},
		{"a b", `' ' is not allowed`},
		{"tab\t", `'\t' is not allowed`},
		{"nul\x00", `'\x00' is not allowed`},
		{"del\x7f", `'\x7f' is not allowed`},
		{"é", `'é' is not allowed`},
		{"\xff", `'�' is not allowed`},
	} {
		err := CheckIfName(tt.name)
		if !errors.Is(err, ErrIfName) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("CheckIfName(%q) = %v, want ErrIfName saying %q", tt.name, err, tt.want)
		}
	}
}
