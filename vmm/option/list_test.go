package option

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestListParse(t *testing.T) {
	l := List{Name: "--thing", Keys: []string{"a", "b", "range"}, Repeatable: []string{"range"}}
	good := []struct {
		in   string
		want []Pair
	}{
		{"a=1", []Pair{{"a", "1"}}},
		{"a=1,b=x y", []Pair{{"a", "1"}, {"b", "x y"}}},
		{" a = 1 , b=2", []Pair{{"a", "1"}, {"b", "2"}}},
		{"range=0-4M,range=8M-12M", []Pair{{"range", "0-4M"}, {"range", "8M-12M"}}},
		{"a=x=y", []Pair{{"a", "x=y"}}},
	}
	for _, g := range good {
		got, err := l.Parse(g.in)
		if err != nil || !reflect.DeepEqual(got, g.want) {
			t.Errorf("Parse(%q) = %v, %v; want %v", g.in, got, err, g.want)
		}
	}
	bad := map[string]string{
		"":        `--thing: "": want key=value`,
		"a":       `--thing: "a": want key=value`,
		"=1":      "want key=value",
		"a=":      "want key=value",
		"a=1,,":   "want key=value",
		"a=1,a=2": "--thing: a given twice",
		"c=1":     `--thing: unknown key "c" (keys: a, b, range)`,
	}
	for in, want := range bad {
		_, err := l.Parse(in)
		if err == nil || !strings.Contains(err.Error(), want) || !errors.Is(err, ErrSyntax) {
			t.Errorf("Parse(%q) = %v, want an ErrSyntax containing %q", in, err, want)
		}
	}
}

func TestListSkipEmptyAndMap(t *testing.T) {
	l := List{SkipEmpty: true}
	for _, in := range []string{"", " ", ",", ",,"} {
		if got, err := l.Parse(in); err != nil || len(got) != 0 {
			t.Errorf("Parse(%q) = %v, %v; want nothing", in, got, err)
		}
	}
	m, err := l.Map("pages=3,,hot=1,")
	if err != nil || !reflect.DeepEqual(m, map[string]string{"pages": "3", "hot": "1"}) {
		t.Errorf("Map = %v, %v", m, err)
	}
	if _, err := l.Map("pages=3,pages=4"); err == nil || err.Error() != "pages given twice" {
		t.Errorf("Map(twice) = %v, want \"pages given twice\"", err)
	}
	if err := (List{Name: "--x"}).Bad(Pair{"a", "b"}, errors.New("no")); err.Error() != "--x a=b: no" {
		t.Errorf("Bad = %q", err)
	}
}

func TestNumbers(t *testing.T) {
	if n, err := Int(" 7 ", 0, 10); n != 7 || err != nil {
		t.Errorf("Int(7) = %d, %v", n, err)
	}
	for in, want := range map[string]string{"x": "not an integer", "11": "out of range 0..10", "-1": "out of range"} {
		if _, err := Int(in, 0, 10); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Int(%q) = %v, want %q", in, err, want)
		}
	}
	if f, err := Float("0.5", 0, 1); f != 0.5 || err != nil {
		t.Errorf("Float(0.5) = %v, %v", f, err)
	}
	for in, want := range map[string]string{"NaN": "not a number", "2": "out of range", "y": "not a number"} {
		if _, err := Float(in, 0, 1); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Float(%q) = %v, want %q", in, err, want)
		}
	}
	if d, err := Duration("10ms", time.Millisecond, time.Second); d != 10*time.Millisecond || err != nil {
		t.Errorf("Duration(10ms) = %v, %v", d, err)
	}
	for in, want := range map[string]string{"soon": "not a duration", "1ns": "out of range", "1h": "out of range"} {
		if _, err := Duration(in, time.Millisecond, time.Second); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Duration(%q) = %v, want %q", in, err, want)
		}
	}
}

func TestParseRate(t *testing.T) {
	good := map[string]uint64{"100Mbit": 12500000, "1.5Gbit": 187500000, "800kbit": 100000, "8bit": 1, "12M": 12 << 20, "12MiB/s": 12 << 20, "1": 1}
	for in, want := range good {
		if got, err := ParseRate(in); got != want || err != nil {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "0bit", "-1Mbit", "fastbit", "1e30Gbit", "NaNbit", "12X/s"} {
		if got, err := ParseRate(in); err == nil || got != 0 || !strings.Contains(err.Error(), "not a bandwidth") {
			t.Errorf("ParseRate(%q) = %d, %v; want a bandwidth error", in, got, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"a=1", "a=1,b=2", ",", "a", "=1", "a=", "a=1,a=2", "counter,pages=3", " a = b ,c=d=e"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		for _, l := range []List{{}, {SkipEmpty: true}, {Name: "--x", Keys: []string{"a", "b"}, Repeatable: []string{"b"}}} {
			ps, err := l.Parse(s)
			if err != nil {
				if !errors.Is(err, ErrSyntax) || ps != nil {
					t.Errorf("Parse(%q) = %v, %v", s, ps, err)
				}
				continue
			}
			seen := map[string]bool{}
			for _, p := range ps {
				if p.Key == "" || p.Value == "" || strings.ContainsAny(p.Key, ",=") || strings.Contains(p.Value, ",") ||
					p.Key != strings.TrimSpace(p.Key) || p.Value != strings.TrimSpace(p.Value) {
					t.Errorf("Parse(%q) produced %q=%q", s, p.Key, p.Value)
				}
				if seen[p.Key] && p.Key != "b" {
					t.Errorf("Parse(%q) gave %s twice", s, p.Key)
				}
				seen[p.Key] = true
			}
		}
	})
}

func FuzzParseRate(f *testing.F) {
	for _, s := range []string{"100Mbit", "1.5Gbit", "12MiB/s", "0", "", "1e300kbit", "-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseRate(s)
		if (err == nil) != (n > 0) {
			t.Errorf("ParseRate(%q) = %d, %v", s, n, err)
		}
	})
}
