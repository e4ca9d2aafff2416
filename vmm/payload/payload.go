package payload

import (
	"embed"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

//go:embed bin/*.bin
var bins embed.FS

// RegionSize is the 2 MiB unit of data regions.
const RegionSize = 2 << 20

// Option is one payload parameter, passed in args[Arg].
type Option struct {
	Name    string
	Arg     int
	Default uint64
	Min     uint64
	Max     uint64
	Help    string
}

// Spec describes a payload.
type Spec struct {
	Name    string
	Summary string
	Options []Option
	// check validates resolved arguments against the data area and fills
	// derived defaults. dataSize is the bytes available from the data base.
	check func(args *[NumArgs]uint64, dataSize uint64) error
}

// Image returns the payload's flat binary.
func (s *Spec) Image() []byte {
	b, err := bins.ReadFile("bin/" + s.Name + ".bin")
	if err != nil {
		panic("payload " + s.Name + ": binary not embedded: " + err.Error())
	}
	return b
}

// Option returns the named option.
func (s *Spec) Option(name string) (Option, bool) {
	for _, o := range s.Options {
		if o.Name == name {
			return o, true
		}
	}
	return Option{}, false
}

// Args resolves option values (name → decimal or 0x-hex string, sizes with
// K/M/G suffixes allowed) into the args array, validating every value.
func (s *Spec) Args(opts map[string]string, dataSize uint64) ([NumArgs]uint64, error) {
	var args [NumArgs]uint64
	for _, o := range s.Options {
		args[o.Arg] = o.Default
	}
	names := make([]string, 0, len(opts))
	for k := range opts {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		o, ok := s.Option(k)
		if !ok {
			return args, fmt.Errorf("payload %s has no option %q (it has: %s)", s.Name, k, s.optionNames())
		}
		v, err := ParseCount(opts[k])
		if err != nil {
			return args, fmt.Errorf("payload %s option %s: %w", s.Name, k, err)
		}
		if v < o.Min || v > o.Max {
			return args, fmt.Errorf("payload %s option %s=%d: want %d..%d", s.Name, k, v, o.Min, o.Max)
		}
		args[o.Arg] = v
	}
	if s.check != nil {
		if err := s.check(&args, dataSize); err != nil {
			return args, fmt.Errorf("payload %s: %w", s.Name, err)
		}
	}
	return args, nil
}

func (s *Spec) optionNames() string {
	if len(s.Options) == 0 {
		return "none"
	}
	var n []string
	for _, o := range s.Options {
		n = append(n, o.Name)
	}
	return strings.Join(n, ", ")
}

// ParseCount parses a non-negative integer: decimal, 0x hex, or decimal with
// a k/m/g suffix (powers of 1000) for counts.
func ParseCount(s string) (uint64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, fmt.Errorf("empty number")
	}
	mult := uint64(1)
	switch t[len(t)-1] {
	case 'k', 'K':
		mult, t = 1e3, t[:len(t)-1]
	case 'm', 'M':
		mult, t = 1e6, t[:len(t)-1]
	case 'g', 'G':
		mult, t = 1e9, t[:len(t)-1]
	}
	v, err := strconv.ParseUint(t, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a non-negative integer", s)
	}
	if mult > 1 && v > ^uint64(0)/mult {
		return 0, fmt.Errorf("%q is too large", s)
	}
	return v * mult, nil
}

const maxU64 = ^uint64(0)

var specs = []*Spec{
	{Name: "hello", Summary: "prints a greeting and exits 0"},
	{Name: "counter", Summary: "writes sequence numbers into hot and cold pages, one output record per iteration",
		Options: []Option{
			{Name: "pages", Arg: 0, Default: 64, Min: 1, Max: 1 << 28, Help: "counter pages (4 KiB each)"},
			{Name: "hot", Arg: 1, Default: 8, Min: 0, Max: 1 << 28, Help: "pages 0..hot-1 are written every iteration"},
			{Name: "cold_every", Arg: 2, Default: 16, Min: 0, Max: maxU64, Help: "write one cold page every N iterations (0: never)"},
			{Name: "iterations", Arg: 3, Default: 1000000, Min: 0, Max: maxU64, Help: "stop after N iterations (0: run until stopped)"},
			{Name: "spin", Arg: 4, Default: 0, Min: 0, Max: maxU64, Help: "busy-loop count per iteration"},
			{Name: "report", Arg: 5, Default: 250000, Min: 0, Max: maxU64, Help: "print progress every N iterations (0: never)"},
		},
		check: func(a *[NumArgs]uint64, data uint64) error {
			if a[1] > a[0] {
				return fmt.Errorf("hot=%d exceeds pages=%d", a[1], a[0])
			}
			if need := a[0] * 4096; need > data {
				return fmt.Errorf("pages=%d needs %d KiB of data memory, only %d KiB available: raise --mem", a[0], need>>10, data>>10)
			}
			return nil
		}},
	{Name: "touch", Summary: "dependent reads over 2 MiB regions with a hot subset, one output record per round",
		Options: []Option{
			{Name: "regions", Arg: 0, Default: 0, Min: 0, Max: 1 << 20, Help: "working set in 2 MiB regions (0: all data memory)"},
			{Name: "hot", Arg: 1, Default: 16, Min: 1, Max: 256, Help: "hot regions"},
			{Name: "hot_permille", Arg: 2, Default: 875, Min: 0, Max: 1000, Help: "share of reads that go to hot regions, per mille"},
			{Name: "accesses", Arg: 3, Default: 1000000, Min: 1, Max: maxU64, Help: "reads per round"},
			{Name: "rounds", Arg: 4, Default: 10, Min: 0, Max: maxU64, Help: "stop after N rounds (0: run until stopped)"},
			{Name: "seed", Arg: 5, Default: 0x9e3779b97f4a7c15, Min: 1, Max: maxU64, Help: "random seed"},
			{Name: "hot_stride", Arg: 6, Default: 0, Min: 0, Max: 1 << 20, Help: "hot region j is (j*stride) mod regions (0: regions/hot)"},
			{Name: "lines", Arg: 7, Default: 1, Min: 1, Max: 64, Help: "cache lines read per page (a power of 2; 1 makes reads translation-bound)"},
		},
		check: func(a *[NumArgs]uint64, data uint64) error {
			avail := data / RegionSize
			if a[0] == 0 {
				a[0] = avail
			}
			if a[0] == 0 || a[0] > avail {
				return fmt.Errorf("regions=%d but only %d 2 MiB regions of data memory are available: raise --mem", a[0], avail)
			}
			if a[1] > a[0] {
				return fmt.Errorf("hot=%d exceeds regions=%d", a[1], a[0])
			}
			if a[6] == 0 {
				a[6] = a[0] / a[1]
			}
			if a[7]&(a[7]-1) != 0 {
				return fmt.Errorf("lines=%d: want a power of 2 (1..64)", a[7])
			}
			a[7]-- // the payload takes the line mask
			return nil
		}},
	{Name: "pio", Summary: "emits N output records with one VM exit each (exit round-trip measurements)",
		Options: []Option{{Name: "count", Arg: 0, Default: 100000, Min: 0, Max: 1<<32 - 1, Help: "records to emit"}}},
	{Name: "fault", Summary: "writes past the end of RAM and takes a page fault (error reporting tests)"},
}

// Lookup returns the named payload.
func Lookup(name string) (*Spec, error) {
	for _, s := range specs {
		if s.Name == name {
			return s, nil
		}
	}
	return nil, fmt.Errorf("unknown payload %q (available: %s)", name, strings.Join(Names(), ", "))
}

// Names lists the built-in payloads.
func Names() []string {
	var n []string
	for _, s := range specs {
		n = append(n, s.Name)
	}
	return n
}

// All returns every built-in payload.
func All() []*Spec { return append([]*Spec(nil), specs...) }
