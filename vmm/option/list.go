package option

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Pair is one key=value of a list.
type Pair struct{ Key, Value string }

// List describes one option list, "key=value[,key=value...]": the option's
// name for errors and the keys it knows.
type List struct {
	// Name is how errors name the option, e.g. "--large-pages".
	Name string
	// Keys are the keys the list knows, in the order errors list them;
	// nil accepts any key.
	Keys []string
	// Repeatable are keys that may be given more than once; any other key
	// given twice is refused.
	Repeatable []string
	// SkipEmpty ignores empty items (a trailing comma, ",,", an empty
	// list) instead of refusing them.
	SkipEmpty bool
}

// ErrSyntax is wrapped by the errors of List.Parse.
var ErrSyntax = errors.New("bad option list")

// Parse splits s into its pairs, in order. Spaces around keys and values
// are dropped; every item needs a key and a non-empty value.
func (l List) Parse(s string) ([]Pair, error) {
	var out []Pair
	seen := map[string]bool{}
	for _, item := range strings.Split(s, ",") {
		if l.SkipEmpty && strings.TrimSpace(item) == "" {
			continue
		}
		k, v, ok := strings.Cut(item, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" || v == "" {
			return nil, l.errorf("%q: want key=value", item)
		}
		if l.Keys != nil && !slices.Contains(l.Keys, k) {
			return nil, l.errorf("unknown key %q (keys: %s)", k, strings.Join(l.Keys, ", "))
		}
		if seen[k] && !slices.Contains(l.Repeatable, k) {
			return nil, l.errorf("%s given twice", k)
		}
		seen[k] = true
		out = append(out, Pair{k, v})
	}
	return out, nil
}

// Map is Parse for a list without repeatable keys, as a map.
func (l List) Map(s string) (map[string]string, error) {
	ps, err := l.Parse(s)
	if err != nil {
		return nil, err
	}
	m := make(map[string]string, len(ps))
	for _, p := range ps {
		m[p.Key] = p.Value
	}
	return m, nil
}

// Bad is the error for a pair whose value is wrong: "NAME KEY=VALUE: err".
func (l List) Bad(p Pair, err error) error {
	if l.Name == "" {
		return fmt.Errorf("%s=%s: %w", p.Key, p.Value, err)
	}
	return fmt.Errorf("%s %s=%s: %w", l.Name, p.Key, p.Value, err)
}

func (l List) errorf(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if l.Name != "" {
		msg = l.Name + ": " + msg
	}
	return &syntaxError{msg}
}

type syntaxError struct{ msg string }

func (e *syntaxError) Error() string        { return e.msg }
func (e *syntaxError) Is(target error) bool { return target == ErrSyntax }
