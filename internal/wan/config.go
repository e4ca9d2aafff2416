package wan

import (
	"fmt"
	"time"
)

// Limits of Config. They keep the derived tc and relay parameters inside what
// the kernel and a test host can honour.
const (
	// MaxRateMbit is the highest RateMbit New accepts (10 Gbit/s).
	MaxRateMbit = 10000
	// MinRateMbit is the lowest RateMbit New accepts (64 kbit/s).
	MinRateMbit = 0.064
	// MaxRTT is the longest RTT New accepts.
	MaxRTT = 10 * time.Second
	// MaxNameLen is the longest Name New accepts.
	MaxNameLen = 32
	// MinRelayQueueBytes is the smallest RelayQueueBytes New accepts: one
	// relay read.
	MinRelayQueueBytes = relayReadSize
	// MaxRelayQueueBytes is the largest RelayQueueBytes New accepts.
	MaxRelayQueueBytes = 1 << 30
	// MaxShaperBytes bounds BurstBytes and ShaperQueueBytes.
	MaxShaperBytes = 1 << 30
)

// ethFrame is the largest non-GSO frame on the veth pair (1500-byte MTU plus
// the Ethernet header); a tbf bucket smaller than one frame would drop it.
const ethFrame = 1514

// Config describes one emulated WAN link. The zero value of every field but
// RateMbit picks a documented default.
type Config struct {
	// RateMbit is the bandwidth of each direction in Mbit/s (10^6 bit/s),
	// enforced by a tc tbf qdisc on the egress of each veth end.
	// MinRateMbit..MaxRateMbit; required.
	RateMbit float64
	// RTT is the round trip the relays add: RTT/2 one way in each direction.
	// 0 adds no delay; at most MaxRTT.
	RTT time.Duration
	// Name is an optional label appended to the namespace's name, to tell
	// links apart in `ip netns list`. Letters, digits, '.', '_' and '-', at
	// most MaxNameLen bytes. Names are unique per New call regardless.
	Name string
	// BurstBytes is the tbf bucket: how many bytes may leave at line rate
	// after the link was idle. 0 picks 4 ms worth of RateMbit, at least two
	// Ethernet frames. At least one frame (1514), at most MaxShaperBytes.
	BurstBytes int
	// ShaperQueueBytes is the tbf limit: how many bytes may wait in the
	// shaper before it drops packets. 0 picks 20 ms worth of RateMbit plus
	// BurstBytes, at least 64 KiB. At least one frame, at most
	// MaxShaperBytes.
	ShaperQueueBytes int
	// RelayQueueBytes bounds the bytes a relay connection holds per
	// direction while it delays them; a full queue stops the relay reading
	// from that side (TCP backpressure). It must hold at least RateMbit ×
	// RTT/2 or the relay, not the shaper, limits throughput. 0 picks twice
	// that, clamped to 1 MiB..256 MiB. MinRelayQueueBytes..MaxRelayQueueBytes.
	RelayQueueBytes int
}

// bytesPerSecond is RateMbit in bytes per second.
func (c Config) bytesPerSecond() float64 { return c.RateMbit * 1e6 / 8 }

// bytesIn is how many bytes RateMbit carries in d.
func (c Config) bytesIn(d time.Duration) int { return int(c.bytesPerSecond() * d.Seconds()) }

// withDefaults validates c and fills in its zero fields.
func (c Config) withDefaults() (Config, error) {
	// The negated comparison also refuses NaN.
	if !(c.RateMbit >= MinRateMbit && c.RateMbit <= MaxRateMbit) {
		return c, fmt.Errorf("wan: RateMbit %v: want %v..%v Mbit/s", c.RateMbit, MinRateMbit, MaxRateMbit)
	}
	if c.RTT < 0 || c.RTT > MaxRTT {
		return c, fmt.Errorf("wan: RTT %v: want 0..%v", c.RTT, MaxRTT)
	}
	if len(c.Name) > MaxNameLen {
		return c, fmt.Errorf("wan: Name %q: %d bytes, want at most %d", c.Name, len(c.Name), MaxNameLen)
	}
	for _, r := range c.Name {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return c, fmt.Errorf("wan: Name %q: character %q, want letters, digits, '.', '_' or '-'", c.Name, r)
		}
	}
	if c.BurstBytes == 0 {
		c.BurstBytes = max(c.bytesIn(4*time.Millisecond), 2*ethFrame)
	}
	if c.BurstBytes < ethFrame || c.BurstBytes > MaxShaperBytes {
		return c, fmt.Errorf("wan: BurstBytes %d: want %d..%d", c.BurstBytes, ethFrame, MaxShaperBytes)
	}
	if c.ShaperQueueBytes == 0 {
		c.ShaperQueueBytes = min(max(c.bytesIn(20*time.Millisecond)+c.BurstBytes, 64<<10), MaxShaperBytes)
	}
	if c.ShaperQueueBytes < ethFrame || c.ShaperQueueBytes > MaxShaperBytes {
		return c, fmt.Errorf("wan: ShaperQueueBytes %d: want %d..%d", c.ShaperQueueBytes, ethFrame, MaxShaperBytes)
	}
	if c.RelayQueueBytes == 0 {
		c.RelayQueueBytes = min(max(2*c.bytesIn(c.RTT/2), 1<<20), 256<<20)
	}
	if c.RelayQueueBytes < MinRelayQueueBytes || c.RelayQueueBytes > MaxRelayQueueBytes {
		return c, fmt.Errorf("wan: RelayQueueBytes %d: want %d..%d", c.RelayQueueBytes, MinRelayQueueBytes, MaxRelayQueueBytes)
	}
	return c, nil
}
