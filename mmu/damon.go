package mmu

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/arch"
)

// The DAMON sampler.
//
// Where the kernel has DAMON (the Data Access MONitor) with its
// virtual-address operations and its sysfs interface (CONFIG_DAMON_VADDR,
// CONFIG_DAMON_SYSFS: Debian's 6.12 kernels, which the appliance can be
// built with), the kernel samples accesses itself and no page is ever
// revoked. The VMM runs one kdamond on its own address space, with one
// monitoring region per 2 MiB guest region of the guest RAM mapping. In
// every sampling interval DAMON checks one random page of each region for
// an access and clears its accessed state: in the VMM's page tables and,
// through KVM's MMU notifier (test/clear young), in KVM's own mappings of
// the page, so the guest's accesses count though the VMM never touches the
// page. At the end of each aggregation interval a region's nr_accesses is
// the number of sampling intervals in which its sampled page was accessed;
// the sampler reads it through a "stat" scheme's tried regions and scales it
// to an estimate of accessed 4 KiB pages, like the refault sampler's.
//
// Clearing accessed bits changes no data and does not split huge
// mappings (DAMON ages a PMD-mapped huge page as a whole). The minimum and
// maximum region counts are both the number of 2 MiB regions, so DAMON
// neither splits a region nor merges two (a merge may not exceed the total
// size over the minimum count, 2 MiB).
//
// This host's kernel has DAMON with physical-address operations only, and
// its one kdamond belongs to the platform (proactive reclaim); DAMON's
// sysfs interface cannot add a kdamond while another runs, so there the
// sampler reports DAMON as busy and the refault sampler is used. Debian 6.1
// has no DAMON.
//
// Cost: the kernel's, one page table walk and one MMU-notifier call per
// region and sampling interval in the kdamond thread, plus reading three
// sysfs files per region per window.

// DAMONSysfs is where DAMON's sysfs interface lives.
const DAMONSysfs = "/sys/kernel/mm/damon/admin"

// ErrNoDAMON: the kernel has no usable DAMON (no sysfs interface, or no
// virtual-address operations).
var ErrNoDAMON = errors.New("no DAMON with virtual-address operations in this kernel")

// ErrDAMONBusy: DAMON is there but its kdamonds are someone else's.
var ErrDAMONBusy = errors.New("DAMON is in use by another monitor")

// DAMONConfig configures a DAMON sampler.
type DAMONConfig struct {
	Sample    time.Duration // DAMON's sampling interval (default 1 ms)
	Aggregate time.Duration // its aggregation interval: one window (default 50 ms)
	Root      string        // DAMON's sysfs directory (default DAMONSysfs)
}

// DAMON samples guest accesses with the kernel's DAMON.
type DAMON struct {
	mem     *Memory
	cfg     DAMONConfig
	kd      string   // the kdamond's sysfs directory
	regions []uint64 // guest-physical 2 MiB region of each DAMON region
	starts  map[uint64]uint64
	windows uint64
	cpu     time.Duration
}

// DAMONStats are cumulative counters.
type DAMONStats struct {
	Windows uint64
	Regions int
	CPU     time.Duration // time spent reading results
}

// NewDAMON starts a kdamond that monitors mem's guest RAM in this process.
// It fails with ErrNoDAMON or ErrDAMONBusy (wrapped, with the reason) when
// DAMON cannot be used here. Close stops it.
func NewDAMON(mem *Memory, cfg DAMONConfig) (*DAMON, error) {
	if cfg.Sample == 0 {
		cfg.Sample = time.Millisecond
	}
	if cfg.Aggregate == 0 {
		cfg.Aggregate = 50 * time.Millisecond
	}
	if cfg.Root == "" {
		cfg.Root = DAMONSysfs
	}
	if cfg.Sample <= 0 || cfg.Aggregate < cfg.Sample {
		return nil, fmt.Errorf("damon: sampling interval %v and aggregation interval %v: want 0 < sampling <= aggregation", cfg.Sample, cfg.Aggregate)
	}
	kds := filepath.Join(cfg.Root, "kdamonds")
	n, err := readUint(filepath.Join(kds, "nr_kdamonds"))
	if err != nil {
		return nil, fmt.Errorf("damon: %w: %v", ErrNoDAMON, err)
	}
	if n != 0 {
		// Changing the kdamond count rebuilds every kdamond's
		// configuration: never touch someone else's.
		why := fmt.Sprintf("%d kdamond(s) configured", n)
		if st, err := os.ReadFile(filepath.Join(kds, "0", "state")); err == nil && strings.TrimSpace(string(st)) == "on" {
			pid, _ := os.ReadFile(filepath.Join(kds, "0", "pid"))
			why = fmt.Sprintf("kdamond 0 is running (pid %s)", strings.TrimSpace(string(pid)))
		}
		return nil, fmt.Errorf("damon: %w: %s", ErrDAMONBusy, why)
	}
	if err := writeFile(filepath.Join(kds, "nr_kdamonds"), "1"); err != nil {
		return nil, fmt.Errorf("damon: %w: %v", ErrDAMONBusy, err)
	}
	d := &DAMON{mem: mem, cfg: cfg, kd: filepath.Join(kds, "0"), starts: map[uint64]uint64{}}
	if err := d.setup(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func (d *DAMON) setup() error {
	ctx := filepath.Join(d.kd, "contexts", "0")
	if err := writeFile(filepath.Join(d.kd, "contexts", "nr_contexts"), "1"); err != nil {
		return fmt.Errorf("damon: %w", err)
	}
	if ops, err := os.ReadFile(filepath.Join(ctx, "avail_operations")); err != nil || !strings.Contains(string(ops), "vaddr") {
		return fmt.Errorf("damon: %w (available: %q)", ErrNoDAMON, strings.TrimSpace(string(ops)))
	}
	base := uint64(arch.SliceAddr(d.mem.mem))
	for off := uint64(0); off < d.mem.cfg.Size; off += RegionSize {
		gpa, err := d.mem.gpaOf(off)
		if err != nil {
			return fmt.Errorf("damon: %w", err)
		}
		d.regions = append(d.regions, gpa/RegionSize)
		d.starts[base+off] = gpa / RegionSize
	}
	nr := strconv.Itoa(len(d.regions))
	// Regions are never re-derived from the address space's mappings
	// (update_us: a year), never split (max = count) or merged (min =
	// count: no merge may exceed 2 MiB).
	set := []struct{ file, val string }{
		{"operations", "vaddr"},
		{"monitoring_attrs/intervals/sample_us", strconv.FormatInt(d.cfg.Sample.Microseconds(), 10)},
		{"monitoring_attrs/intervals/aggr_us", strconv.FormatInt(d.cfg.Aggregate.Microseconds(), 10)},
		{"monitoring_attrs/intervals/update_us", strconv.FormatInt((365 * 24 * time.Hour).Microseconds(), 10)},
		{"monitoring_attrs/nr_regions/max", nr},
		{"monitoring_attrs/nr_regions/min", nr},
		{"targets/nr_targets", "1"},
		{"targets/0/pid_target", strconv.Itoa(os.Getpid())},
		{"targets/0/regions/nr_regions", nr},
		{"schemes/nr_schemes", "1"},
		{"schemes/0/action", "stat"},
		// The scheme must match every region: its tried regions are the
		// results (the access pattern's ranges start out empty).
		{"schemes/0/access_pattern/sz/min", "0"},
		{"schemes/0/access_pattern/sz/max", strconv.FormatUint(1<<64-1, 10)},
		{"schemes/0/access_pattern/nr_accesses/min", "0"},
		{"schemes/0/access_pattern/nr_accesses/max", strconv.FormatUint(1<<32-1, 10)},
		{"schemes/0/access_pattern/age/min", "0"},
		{"schemes/0/access_pattern/age/max", strconv.FormatUint(1<<32-1, 10)},
	}
	for _, s := range set {
		if err := writeFile(filepath.Join(ctx, s.file), s.val); err != nil {
			return fmt.Errorf("damon: %w", err)
		}
	}
	for i := range d.regions {
		dir := filepath.Join(ctx, "targets", "0", "regions", strconv.Itoa(i))
		start := base + uint64(i)*RegionSize
		if err := writeFile(filepath.Join(dir, "start"), strconv.FormatUint(start, 10)); err != nil {
			return fmt.Errorf("damon: %w", err)
		}
		if err := writeFile(filepath.Join(dir, "end"), strconv.FormatUint(start+RegionSize, 10)); err != nil {
			return fmt.Errorf("damon: %w", err)
		}
	}
	if err := writeFile(filepath.Join(d.kd, "state"), "on"); err != nil {
		return fmt.Errorf("damon: start the kdamond: %w", err)
	}
	return nil
}

// gpaOf returns the guest-physical address of backing offset off.
func (m *Memory) gpaOf(off uint64) (uint64, error) {
	for _, r := range m.regions {
		if off >= r.Offset && off < r.Offset+r.Size {
			return r.GPA + off - r.Offset, nil
		}
	}
	return 0, fmt.Errorf("offset %#x: %w", off, ErrOutOfRange)
}

// Counts asks DAMON for its latest aggregation (waiting for the next one
// to end) and returns, per guest-physical 2 MiB region, the estimated
// number of 4 KiB pages accessed in a sampling interval: the fraction of
// sampling intervals in which the region's sampled page was accessed,
// times 512.
func (d *DAMON) Counts() (map[uint64]float64, error) {
	start := time.Now()
	defer func() { d.cpu += time.Since(start) }()
	if err := writeFile(filepath.Join(d.kd, "state"), "update_schemes_tried_regions"); err != nil {
		return nil, fmt.Errorf("damon: %w", err)
	}
	dir := filepath.Join(d.kd, "contexts", "0", "schemes", "0", "tried_regions")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("damon: %w", err)
	}
	per := float64(d.cfg.Aggregate / d.cfg.Sample)
	out := make(map[uint64]float64, len(d.regions))
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		start, err1 := readUint(filepath.Join(dir, e.Name(), "start"))
		end, err2 := readUint(filepath.Join(dir, e.Name(), "end"))
		acc, err3 := readUint(filepath.Join(dir, e.Name(), "nr_accesses"))
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("damon: tried region %s: %w", e.Name(), err)
		}
		// A region is one 2 MiB guest region, or (merged) several whole
		// ones: each gets the region's rate.
		for a := start &^ (RegionSize - 1); a < end; a += RegionSize {
			if r, ok := d.starts[a]; ok {
				out[r] = min(1, float64(acc)/per) * float64(RegionSize/PageSize)
			}
		}
	}
	d.windows++
	return out, nil
}

// Stats returns the cumulative counters.
func (d *DAMON) Stats() DAMONStats {
	return DAMONStats{Windows: d.windows, Regions: len(d.regions), CPU: d.cpu}
}

// Close stops the kdamond and removes it.
func (d *DAMON) Close() error {
	if st, err := os.ReadFile(filepath.Join(d.kd, "state")); err == nil && strings.TrimSpace(string(st)) == "on" {
		if err := writeFile(filepath.Join(d.kd, "state"), "off"); err != nil {
			return fmt.Errorf("damon: stop the kdamond: %w", err)
		}
	}
	return writeFile(filepath.Join(filepath.Dir(d.kd), "nr_kdamonds"), "0")
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

func writeFile(path, val string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(val)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %q to %s: %w", val, path, err)
	}
	return nil
}
