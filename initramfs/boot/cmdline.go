package boot

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxCmdline is the longest command line ParseCmdline accepts. x86's
// COMMAND_LINE_SIZE is 2048; other architectures allow more, none this much.
const MaxCmdline = 64 << 10

// ErrCmdline is wrapped by every error ParseCmdline returns.
var ErrCmdline = errors.New("bad kernel command line")

// Param is one parameter of a kernel command line: key=value, or a bare key.
type Param struct {
	Key      string // the text before the first '=' (quotes removed)
	Value    string // the text after it (quotes removed); "" for a bare key
	HasValue bool   // whether there was an '='
}

func (p Param) String() string {
	if !p.HasValue {
		return p.Key
	}
	return p.Key + "=" + p.Value
}

// Params is a parsed kernel command line, in order.
type Params []Param

// ParseCmdline splits a kernel command line (the text of /proc/cmdline) into
// parameters the way the kernel does: parameters are separated by white
// space, and double quotes group text that contains spaces, as in
// key="a b" or "key=a b". The quotes themselves are removed. Stricter than
// the kernel, it rejects an unterminated quote, control characters, invalid
// UTF-8, an empty key ("=x"), a key with white space in it and a line
// longer than MaxCmdline.
func ParseCmdline(s string) (Params, error) {
	if len(s) > MaxCmdline {
		return nil, fmt.Errorf("%w: %d bytes, longer than %d", ErrCmdline, len(s), MaxCmdline)
	}
	if !utf8.ValidString(s) {
		return nil, fmt.Errorf("%w: not valid UTF-8", ErrCmdline)
	}
	s = strings.TrimSuffix(s, "\n") // /proc/cmdline ends with one
	var (
		out     Params
		tok     strings.Builder
		inTok   bool
		inQuote bool
		quoteAt int
	)
	flush := func() error {
		if !inTok {
			return nil
		}
		t := tok.String()
		tok.Reset()
		inTok = false
		k, v, eq := strings.Cut(t, "=")
		if k == "" {
			return fmt.Errorf("%w: parameter %q has an empty key", ErrCmdline, t)
		}
		if strings.ContainsAny(k, " \t") {
			return fmt.Errorf("%w: parameter name %q contains white space", ErrCmdline, k)
		}
		out = append(out, Param{Key: k, Value: v, HasValue: eq})
		return nil
	}
	for i, r := range s {
		switch {
		case r == '"':
			inTok = true
			if !inQuote {
				quoteAt = i
			}
			inQuote = !inQuote
		case r == ' ' || r == '\t' || r == '\n':
			if inQuote {
				if r == '\n' {
					return nil, fmt.Errorf("%w: newline inside the quote at byte %d", ErrCmdline, quoteAt)
				}
				tok.WriteRune(r)
				continue
			}
			if err := flush(); err != nil {
				return nil, err
			}
		case r < 0x20 || r == 0x7f:
			return nil, fmt.Errorf("%w: control character %#x at byte %d", ErrCmdline, r, i)
		default:
			inTok = true
			tok.WriteRune(r)
		}
	}
	if inQuote {
		return nil, fmt.Errorf("%w: the quote at byte %d is not closed", ErrCmdline, quoteAt)
	}
	if err := flush(); err != nil {
		return nil, err
	}
	return out, nil
}

// Lookup returns the values of every parameter named key, in order.
func (ps Params) Lookup(key string) []string {
	var vs []string
	for _, p := range ps {
		if p.Key == key {
			vs = append(vs, p.Value)
		}
	}
	return vs
}

// WithPrefix returns the parameters whose key starts with prefix, the
// prefix removed from their keys.
func (ps Params) WithPrefix(prefix string) Params {
	var out Params
	for _, p := range ps {
		if rest, ok := strings.CutPrefix(p.Key, prefix); ok {
			p.Key = rest
			out = append(out, p)
		}
	}
	return out
}

// ModuleParams returns the parameter string for loading module name, as
// modprobe builds it: every module.param[=value] on the command line (with
// '-' and '_' equivalent in the module name), space-separated, values that
// contain spaces in double quotes. The kernel applies such parameters
// itself only to built-in modules.
func (ps Params) ModuleParams(name string) string {
	name = NormalizeModuleName(name)
	var parts []string
	for _, p := range ps {
		mod, param, ok := strings.Cut(p.Key, ".")
		if !ok || param == "" || NormalizeModuleName(mod) != name {
			continue
		}
		switch {
		case !p.HasValue:
			parts = append(parts, param)
		case strings.ContainsAny(p.Value, " \t"):
			parts = append(parts, param+`="`+p.Value+`"`)
		default:
			parts = append(parts, param+"="+p.Value)
		}
	}
	return strings.Join(parts, " ")
}
