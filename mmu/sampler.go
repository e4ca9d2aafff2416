package mmu

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The guest-physical access sampler.
//
// Where the kernel has DAMON with virtual-address operations, the DAMON
// sampler (damon.go) is used. Neither this host's kernel (its DAMON has
// physical-address operations only, and the platform runs its one kdamond)
// nor Debian 6.1 offers that or page_idle, and KVM exposes no accessed bits
// to user space. There the sampler revokes
// access to a sample of guest pages through the VMM's own mapping
// (mprotect PROT_NONE). KVM's MMU notifier drops its mappings of those pages;
// the guest's next access to one makes KVM fail to fault the page in, and
// KVM_RUN returns EFAULT (or a KVM_EXIT_MEMORY_FAULT with the GPA where the
// kernel reports it). The VMM works out the guest-physical address the
// faulting instruction touched, calls Fault, and the sampler restores the page
// and counts it as accessed. Guest data is never touched: only the protection
// of the host mapping changes, so nothing can be lost.
//
// Per window and region it samples a contiguous block of PagesPerRegion
// 4 KiB pages at a random offset (one mprotect per region instead of one per
// page). Regions mapped large on the host (promoted) are sampled whole, with a
// 2 MiB-aligned mprotect that keeps the huge mapping intact, so the sampler
// never leaves a large mapping split; for them a window only says whether the
// region was touched.
//
// Cost: two mprotect calls per sampled region per window, plus one refault
// (a KVM_RUN EFAULT round trip and one mprotect) per sampled page the guest
// touches. BenchmarkSampler in vmm/bench measures it.

// SampleSpec names a region to sample in a window.
type SampleSpec struct {
	Region uint64 // guest-physical 2 MiB region index (GPA >> 21)
	Large  bool   // sample the whole region at once (it is mapped large)
}

// RegionCount is one region's result for a window.
type RegionCount struct {
	Region   uint64
	Large    bool
	Sampled  int // pages sampled (1 for a Large region)
	Accessed int // of those, how many the guest touched
}

// Estimate scales the sample to the number of accessed 4 KiB pages in the
// region (0..512). For a Large region it is 512 if touched, else 0.
func (c RegionCount) Estimate() float64 {
	if c.Sampled == 0 {
		return 0
	}
	return float64(c.Accessed) * float64(RegionSize/PageSize) / float64(c.Sampled)
}

// SamplerStats are cumulative counters.
type SamplerStats struct {
	Windows    uint64        // completed windows
	Protects   uint64        // mprotect calls
	Refaults   uint64        // guest accesses to sampled pages
	Unresolved uint64        // faults whose page could not be identified (window dropped)
	Stale      uint64        // faults that arrived after their page was restored
	CPU        time.Duration // time spent in Arm, Fault and Disarm
}

// SamplerConfig configures a Sampler.
type SamplerConfig struct {
	PagesPerRegion int    // contiguous 4 KiB pages per region and window (default 8, at most 64)
	Seed           uint64 // random seed for the block offsets
}

type sampleBlock struct {
	gpa       uint64 // first sampled byte (guest-physical)
	off       uint64 // its offset into the backing
	pages     int
	region    uint64
	large     bool
	protected uint64 // bit i: page i still revoked
	accessed  int
}

// Sampler revokes and counts access to sampled guest pages. Fault is called
// from vCPU threads, Arm and Disarm from a controller goroutine.
type Sampler struct {
	mem *Memory
	cfg SamplerConfig

	// mu guards everything below.
	mu       sync.Mutex
	rng      *rand.Rand
	blocks   []sampleBlock // sorted by gpa while armed
	armed    bool
	dropped  bool // an unresolved fault restored everything: the window is void
	disarmed time.Time
	stats    SamplerStats
}

// NewSampler returns a sampler over mem.
func NewSampler(mem *Memory, cfg SamplerConfig) (*Sampler, error) {
	if cfg.PagesPerRegion == 0 {
		cfg.PagesPerRegion = 8
	}
	if cfg.PagesPerRegion < 1 || cfg.PagesPerRegion > 64 {
		return nil, fmt.Errorf("sampler: %d pages per region, want 1..64", cfg.PagesPerRegion)
	}
	return &Sampler{mem: mem, cfg: cfg, rng: rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x5eed))}, nil
}

// Arm starts a window: it revokes access to a block of pages in each region.
func (s *Sampler) Arm(specs []SampleSpec) error {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.armed {
		return fmt.Errorf("sampler: already armed")
	}
	if err := s.mem.beginRevoke(); err != nil {
		return fmt.Errorf("sampler: %w", err)
	}
	s.blocks = s.blocks[:0]
	s.dropped = false
	for _, sp := range specs {
		base := sp.Region * RegionSize
		off, err := s.mem.Offset(base, RegionSize)
		if err != nil {
			s.restoreAllLocked()
			s.mem.endRevoke()
			return fmt.Errorf("sampler: region %d: %w", sp.Region, err)
		}
		b := sampleBlock{gpa: base, off: off, pages: RegionSize / PageSize, region: sp.Region, large: sp.Large}
		if !sp.Large {
			first := s.rng.IntN(RegionSize/PageSize - s.cfg.PagesPerRegion + 1)
			b.gpa += uint64(first) * PageSize
			b.off += uint64(first) * PageSize
			b.pages = s.cfg.PagesPerRegion
		}
		if err := s.protect(b.off, uint64(b.pages)*PageSize, unix.PROT_NONE); err != nil {
			s.restoreAllLocked()
			s.mem.endRevoke()
			return err
		}
		b.protected = 1<<b.pages - 1
		if b.large {
			b.protected = 1
		}
		s.blocks = append(s.blocks, b)
	}
	sort.Slice(s.blocks, func(i, j int) bool { return s.blocks[i].gpa < s.blocks[j].gpa })
	s.armed = true
	s.stats.CPU += time.Since(start)
	return nil
}

func (s *Sampler) protect(off, n uint64, prot int) error {
	s.stats.Protects++
	if err := unix.Mprotect(s.mem.mem[off:off+n], prot); err != nil {
		return fmt.Errorf("sampler: mprotect guest memory at offset %#x (+%#x): %w", off, n, err)
	}
	return nil
}

// Fault handles a guest access that KVM could not complete. gpas are the
// guest-physical addresses the faulting instruction may have touched (empty
// if unknown). It returns true if the fault is the sampler's doing and the
// vCPU should simply retry; false means the fault is real.
func (s *Sampler) Fault(gpas []uint64) bool {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	defer func() { s.stats.CPU += time.Since(start) }()
	if !s.armed {
		// A vCPU may report a fault on a page that Disarm restored after the
		// fault was taken; a retry then succeeds.
		if !s.disarmed.IsZero() && time.Since(s.disarmed) < time.Second {
			s.stats.Stale++
			return true
		}
		return false
	}
	found := false
	for _, gpa := range gpas {
		i := sort.Search(len(s.blocks), func(i int) bool { return s.blocks[i].gpa+uint64(s.blocks[i].pages)*PageSize > gpa })
		if i == len(s.blocks) || gpa < s.blocks[i].gpa {
			continue
		}
		b := &s.blocks[i]
		page := 0
		if !b.large {
			page = int((gpa - b.gpa) / PageSize)
		}
		if b.protected&(1<<page) == 0 {
			found = true // restored already by another vCPU
			continue
		}
		off, n := b.off+uint64(page)*PageSize, uint64(PageSize)
		if b.large {
			off, n = b.off, RegionSize
		}
		if err := s.protect(off, n, unix.PROT_READ|unix.PROT_WRITE); err != nil {
			s.restoreAllLocked()
			s.stats.Unresolved++
			return true
		}
		b.protected &^= 1 << page
		b.accessed++
		s.stats.Refaults++
		found = true
	}
	if !found {
		// The faulting access could not be tied to a sampled page (an
		// implicit access the decoder does not know, or a kernel-internal
		// one): restore everything so the guest can go on, and void the window.
		s.restoreAllLocked()
		s.dropped = true
		s.stats.Unresolved++
	}
	return true
}

// restoreAllLocked makes every sampled page accessible again.
func (s *Sampler) restoreAllLocked() {
	for i := range s.blocks {
		b := &s.blocks[i]
		if b.protected == 0 {
			continue
		}
		// One call restores the whole block; on failure keep going and let
		// the next fault report it.
		_ = s.protect(b.off, uint64(b.pages)*PageSize, unix.PROT_READ|unix.PROT_WRITE)
		b.protected = 0
	}
}

// Disarm ends the window, restores every sampled page and returns the counts
// (nil if the window was voided by an unresolved fault).
func (s *Sampler) Disarm() ([]RegionCount, error) {
	start := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.armed {
		return nil, fmt.Errorf("sampler: not armed")
	}
	s.restoreAllLocked()
	s.mem.endRevoke()
	s.armed = false
	s.disarmed = time.Now()
	s.stats.Windows++
	s.stats.CPU += time.Since(start)
	if s.dropped {
		return nil, nil
	}
	out := make([]RegionCount, 0, len(s.blocks))
	for _, b := range s.blocks {
		n := b.pages
		if b.large {
			n = 1
		}
		out = append(out, RegionCount{Region: b.region, Large: b.large, Sampled: n, Accessed: b.accessed})
	}
	return out, nil
}

// Stats returns the cumulative counters.
func (s *Sampler) Stats() SamplerStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
}
