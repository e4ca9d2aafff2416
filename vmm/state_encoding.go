package vmm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"unicode/utf8"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// The binary encoding of a MachineState, version 1. It arrives over the
// network during failover, so decoding treats it as untrusted: every length
// and count is bounded and must match exactly, the sections and fields come
// in a fixed order, reserved fields and padding must be zero, and nothing
// may follow the last section. Encoding applies the same rules, so a decoded
// state re-encodes to the same bytes. All integers are little-endian.
//
//	header   magic "USVS" | version u16 (1) | flags u16 (0)
//	records  tag u16 | reserved u16 (0) | length u32 | body of length bytes
//
// The body of the state is a sequence of records ("sections"):
//
//	tag   section      count        body
//	0x01  config       1            memory size u64 | vCPUs u32 (1..MaxCPUs) | regions u32 (1..4) |
//	                                data base u64 | data size u64 |
//	                                per region: GPA u64 | size u64 | backing offset u64 | slot u32 | reserved u32 |
//	                                payload name length u16 (at most 255) | name (UTF-8)
//	0x02  vcpu         vCPUs        vCPU id u32 (0, 1, ... in order) | reserved u32 | fields (records)
//	0x03  vm           1            fields (records)
//	0x10  debug port   1            see vmm/devices/debugport_state.go
//	0x11  uart         0 or 1       see vmm/devices/uart_state.go; present only for a Linux machine
//	0x12  platform     0 or 1       see vmm/devices/platform_state.go; present only with a uart section
//	0x13  virtio       0..MaxVirtioDevices, in the machine's device order; only with a uart section:
//	                                one virtio-mmio transport and its device (vmm/virtio/mmio_state.go)
//
// A vcpu section holds these fields, each once and in this order. "struct"
// means the kernel's x86-64 KVM struct (<asm/kvm.h>) byte for byte:
//
//	0x01  regs        struct kvm_regs (144 bytes)
//	0x02  sregs       struct kvm_sregs (312)
//	0x03  fpu         struct kvm_fpu (416)
//	0x04  xsave       the XSAVE area, 4096..65536 bytes, a multiple of 4
//	0x05  xcrs        struct kvm_xcrs (392), at most 16 XCRs
//	0x06  msrs        struct kvm_msr_entry (16) × n, n <= 1024, no index twice
//	0x07  lapic       struct kvm_lapic_state (1024)
//	0x08  events      struct kvm_vcpu_events (64)
//	0x09  mp state    struct kvm_mp_state (4)
//	0x0a  debugregs   struct kvm_debugregs (128)
//	0x0b  cpuid       struct kvm_cpuid_entry2 (40) × n, n <= 256
//	0x0c  tsc khz     u32
//
// The vm section holds:
//
//	0x01  irqchip     struct kvm_irqchip (520), chip id 0 (PIC master)
//	0x02  irqchip     chip id 1 (PIC slave)
//	0x03  irqchip     chip id 2 (IOAPIC)
//	0x04  pit         struct kvm_pit_state2 (112)
//	0x05  clock       struct kvm_clock_data (48)
//
// A later version may add sections or fields; this one refuses any it does
// not know, and a state of another version.

// StateVersion is the version of the MachineState encoding this build
// writes and reads.
const StateVersion = 1

// ErrBadState is wrapped by every error about a malformed or inconsistent
// machine state.
// It is devices.ErrBadState, which the device states' decoders wrap.
var ErrBadState = devices.ErrBadState

// Limits of a machine state.
const (
	// MaxStateSize bounds an encoded MachineState: 8 MiB for the vCPUs
	// and the legacy devices, and room for MaxVirtioDevices virtio
	// sections each holding a full virtio-net backlog (about 4.2 MB).
	MaxStateSize = 8<<20 + MaxVirtioDevices*(virtio.MaxTransportStateSize+recordHeaderSize)
	// MaxStateMemSize bounds the guest memory a state may describe.
	MaxStateMemSize = 1 << 40

	maxStateRegions = 4
	maxStateMSRs    = 1024
	maxStateCPUID   = 256
	maxXSaveSize    = 64 << 10
	maxPayloadName  = 255
	maxXCRs         = 16
)

var stateMagic = [4]byte{'U', 'S', 'V', 'S'}

// Section tags.
const (
	tagConfig    = 0x01
	tagVCPU      = 0x02
	tagVM        = 0x03
	tagDebugPort = 0x10
	tagUART      = 0x11
	tagPlatform  = 0x12
	tagVirtio    = 0x13
)

// vCPU field tags.
const (
	tagRegs = iota + 1
	tagSregs
	tagFPU
	tagXSave
	tagXCRs
	tagMSRs
	tagLAPIC
	tagEvents
	tagMPState
	tagDebugRegs
	tagCPUID
	tagTSCKHz
)

// VM field tags.
const (
	tagPICMaster = iota + 1
	tagPICSlave
	tagIOAPIC
	tagPIT
	tagClock
)

const (
	recordHeaderSize = 8
	msrEntrySize     = 16
	cpuidEntrySize   = 40
	irqChipSize      = 8 + 512
	regionSize       = 32
)

var le = binary.LittleEndian

// stateEncoder appends records to b.
type stateEncoder struct{ b []byte }

// begin starts a record; end(begin(...)) fills in its length.
func (e *stateEncoder) begin(tag uint16) int {
	e.b = le.AppendUint16(e.b, tag)
	e.b = le.AppendUint16(e.b, 0)
	e.b = le.AppendUint32(e.b, 0)
	return len(e.b)
}

func (e *stateEncoder) end(start int) { le.PutUint32(e.b[start-4:], uint32(len(e.b)-start)) }

// record appends a whole record whose body body appends.
func (e *stateEncoder) record(tag uint16, body func(b []byte) []byte) {
	start := e.begin(tag)
	e.b = body(e.b)
	e.end(start)
}

// fixed appends a record holding *v, a fixed-size struct, in its kernel layout.
func (e *stateEncoder) fixed(tag uint16, v any) {
	e.record(tag, func(b []byte) []byte {
		b, err := binary.Append(b, le, v)
		if err != nil {
			panic(fmt.Sprintf("vmm: state field %T is not fixed-size: %v", v, err))
		}
		return b
	})
}

// MarshalBinary encodes the state (see the format above). It fails if the
// state breaks a rule that decoding enforces.
func (st *MachineState) MarshalBinary() ([]byte, error) {
	return st.AppendBinary(make([]byte, 0, st.sizeHint()))
}

// sizeHint is about the encoded size of the state, at least as large, so
// that encoding it allocates once.
func (st *MachineState) sizeHint() int {
	n := 4096 + maxPayloadName + regionSize*len(st.Config.Regions)
	for _, v := range st.Devices.Virtio {
		n += recordHeaderSize + len(v)
	}
	for i := range st.VCPUs {
		v := &st.VCPUs[i]
		n += 4096 + len(v.XSave) + msrEntrySize*len(v.MSRs) + cpuidEntrySize*len(v.CPUID)
	}
	return n
}

// AppendBinary appends the encoded state to b.
func (st *MachineState) AppendBinary(b []byte) ([]byte, error) {
	if err := st.validate(); err != nil {
		return b, err
	}
	return st.encode(b), nil
}

// encode appends the encoded state to b without validating it.
func (st *MachineState) encode(b []byte) []byte {
	e := &stateEncoder{b: b}
	e.b = append(e.b, stateMagic[:]...)
	e.b = le.AppendUint16(e.b, StateVersion)
	e.b = le.AppendUint16(e.b, 0)
	e.record(tagConfig, st.Config.appendBinary)
	for i := range st.VCPUs {
		start := e.begin(tagVCPU)
		e.b = le.AppendUint32(e.b, uint32(i))
		e.b = le.AppendUint32(e.b, 0)
		st.VCPUs[i].encode(e)
		e.end(start)
	}
	start := e.begin(tagVM)
	st.VM.encode(e)
	e.end(start)
	e.record(tagDebugPort, st.Devices.DebugPort.AppendBinary)
	if st.Devices.UART != nil {
		e.record(tagUART, st.Devices.UART.AppendBinary)
	}
	if st.Devices.Platform != nil {
		e.record(tagPlatform, st.Devices.Platform.AppendBinary)
	}
	for _, v := range st.Devices.Virtio {
		e.record(tagVirtio, func(b []byte) []byte { return append(b, v...) })
	}
	return e.b
}

func (c *StateConfig) appendBinary(b []byte) []byte {
	b = le.AppendUint64(b, c.MemSize)
	b = le.AppendUint32(b, uint32(c.CPUs))
	b = le.AppendUint32(b, uint32(len(c.Regions)))
	b = le.AppendUint64(b, c.DataBase)
	b = le.AppendUint64(b, c.DataSize)
	for _, r := range c.Regions {
		b = le.AppendUint64(b, r.GPA)
		b = le.AppendUint64(b, r.Size)
		b = le.AppendUint64(b, r.Offset)
		b = le.AppendUint32(b, r.Slot)
		b = le.AppendUint32(b, 0)
	}
	b = le.AppendUint16(b, uint16(len(c.Payload)))
	return append(b, c.Payload...)
}

func (s *VCPUState) encode(e *stateEncoder) {
	e.fixed(tagRegs, &s.Regs)
	e.fixed(tagSregs, &s.Sregs)
	e.record(tagFPU, func(b []byte) []byte { return appendFPU(b, &s.FPU) })
	e.record(tagXSave, func(b []byte) []byte { return append(b, s.XSave...) })
	e.fixed(tagXCRs, &s.XCRs)
	e.record(tagMSRs, func(b []byte) []byte {
		for _, m := range s.MSRs {
			b = le.AppendUint32(b, m.Index)
			b = le.AppendUint32(b, 0)
			b = le.AppendUint64(b, m.Data)
		}
		return b
	})
	e.record(tagLAPIC, func(b []byte) []byte { return append(b, s.LAPIC.Regs[:]...) })
	e.fixed(tagEvents, &s.Events)
	e.fixed(tagMPState, &s.MPState)
	e.fixed(tagDebugRegs, &s.DebugRegs)
	e.record(tagCPUID, func(b []byte) []byte {
		for _, c := range s.CPUID {
			for _, v := range [...]uint32{c.Function, c.Index, c.Flags, c.EAX, c.EBX, c.ECX, c.EDX, 0, 0, 0} {
				b = le.AppendUint32(b, v)
			}
		}
		return b
	})
	e.record(tagTSCKHz, func(b []byte) []byte { return le.AppendUint32(b, s.TSCKHz) })
}

// appendFPU appends struct kvm_fpu, as fixed would, without reflection
// (its byte arrays are most of a state's reflective encoding time).
func appendFPU(b []byte, f *arch.FPU) []byte {
	for i := range f.FPR {
		b = append(b, f.FPR[i][:]...)
	}
	b = le.AppendUint16(b, f.FCW)
	b = le.AppendUint16(b, f.FSW)
	b = append(b, f.FTWX, 0)
	b = le.AppendUint16(b, f.LastOpcode)
	b = le.AppendUint64(b, f.LastIP)
	b = le.AppendUint64(b, f.LastDP)
	for i := range f.XMM {
		b = append(b, f.XMM[i][:]...)
	}
	b = le.AppendUint32(b, f.MXCSR)
	return le.AppendUint32(b, 0)
}

func (s *VMState) encode(e *stateEncoder) {
	for i, tag := range [...]uint16{tagPICMaster, tagPICSlave, tagIOAPIC} {
		c := &s.IRQChips[i]
		e.record(tag, func(b []byte) []byte {
			b = le.AppendUint32(b, c.ChipID)
			b = le.AppendUint32(b, 0)
			return append(b, c.Chip[:]...)
		})
	}
	e.fixed(tagPIT, &s.PIT)
	e.fixed(tagClock, &s.Clock)
}

// stateDecoder reads records from b. The first error sticks; later reads
// return zero values.
type stateDecoder struct {
	b   []byte
	err error
}

func (d *stateDecoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrBadState, fmt.Sprintf(format, args...))
	}
}

// record reads the next record, which must have tag, and returns its body.
func (d *stateDecoder) record(tag uint16, name string) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < recordHeaderSize {
		if len(d.b) == 0 {
			d.fail("truncated: %s missing", name)
		} else {
			d.fail("truncated: %s record header is %d of %d bytes", name, len(d.b), recordHeaderSize)
		}
		return nil
	}
	got, reserved, n := le.Uint16(d.b), le.Uint16(d.b[2:]), le.Uint32(d.b[4:])
	switch {
	case got != tag:
		d.fail("%s expected (tag %#x), found tag %#x", name, tag, got)
		return nil
	case reserved != 0:
		d.fail("%s: reserved field is %#x, want 0", name, reserved)
		return nil
	case uint64(n) > uint64(len(d.b)-recordHeaderSize):
		d.fail("truncated: %s is %d bytes, only %d follow", name, n, len(d.b)-recordHeaderSize)
		return nil
	}
	body := d.b[recordHeaderSize : recordHeaderSize+int(n)]
	d.b = d.b[recordHeaderSize+int(n):]
	return body
}

// fixed reads a record holding the fixed-size struct *v.
func (d *stateDecoder) fixed(tag uint16, name string, v any) {
	body := d.record(tag, name)
	if d.err != nil {
		return
	}
	if want := binary.Size(v); len(body) != want {
		d.fail("%s is %d bytes, want %d", name, len(body), want)
		return
	}
	if _, err := binary.Decode(body, le, v); err != nil {
		d.fail("%s: %v", name, err)
	}
}

// sized reads a record of exactly want bytes.
func (d *stateDecoder) sized(tag uint16, name string, want int) []byte {
	body := d.record(tag, name)
	if d.err == nil && len(body) != want {
		d.fail("%s is %d bytes, want %d", name, len(body), want)
		return nil
	}
	return body
}

// array reads a record of count entries of size bytes each, count <= max.
func (d *stateDecoder) array(tag uint16, name string, size, max int) ([]byte, int) {
	body := d.record(tag, name)
	if d.err != nil {
		return nil, 0
	}
	if len(body)%size != 0 {
		d.fail("%s is %d bytes, not a multiple of the %d-byte entry", name, len(body), size)
		return nil, 0
	}
	if n := len(body) / size; n > max {
		d.fail("%s: %d entries, at most %d", name, n, max)
		return nil, 0
	}
	return body, len(body) / size
}

// done checks that nothing is left.
func (d *stateDecoder) done(name string) {
	if d.err == nil && len(d.b) != 0 {
		d.fail("%d bytes after the last field of %s", len(d.b), name)
	}
}

// UnmarshalBinary decodes an encoded state, validating it strictly (see the
// format above). On error st is unchanged.
func (st *MachineState) UnmarshalBinary(data []byte) error {
	if len(data) > MaxStateSize {
		return fmt.Errorf("%w: %d bytes, at most %d", ErrBadState, len(data), MaxStateSize)
	}
	var s MachineState
	if err := decodeState(data, &s); err != nil {
		return err
	}
	// Re-encoding validates the state and catches what the field decoders
	// skip (struct padding): a canonical encoding re-encodes to itself.
	enc, err := s.AppendBinary(make([]byte, 0, len(data)))
	if err != nil {
		return err
	}
	if !bytes.Equal(enc, data) {
		return fmt.Errorf("%w: padding or reserved bytes are not zero", ErrBadState)
	}
	*st = s
	return nil
}

func decodeState(data []byte, s *MachineState) error {
	const hdr = len(stateMagic) + 4
	if len(data) < hdr {
		return fmt.Errorf("%w: truncated: %d bytes, the header alone is %d", ErrBadState, len(data), hdr)
	}
	if !bytes.Equal(data[:len(stateMagic)], stateMagic[:]) {
		return fmt.Errorf("%w: not an encoded machine state (starts with %q, want %q)", ErrBadState, data[:len(stateMagic)], stateMagic[:])
	}
	if v := le.Uint16(data[4:]); v != StateVersion {
		return fmt.Errorf("%w: version %d, this build reads version %d", ErrBadState, v, StateVersion)
	}
	if f := le.Uint16(data[6:]); f != 0 {
		return fmt.Errorf("%w: flags %#x, none are defined", ErrBadState, f)
	}
	d := &stateDecoder{b: data[hdr:]}
	s.Config = decodeConfig(d, d.record(tagConfig, "config section"))
	if d.err != nil {
		return d.err
	}
	s.VCPUs = make([]VCPUState, s.Config.CPUs)
	for i := range s.VCPUs {
		name := fmt.Sprintf("vCPU %d section", i)
		body := d.record(tagVCPU, name)
		if d.err != nil {
			return d.err
		}
		if err := decodeVCPU(body, i, &s.VCPUs[i]); err != nil {
			return err
		}
	}
	body := d.record(tagVM, "vm section")
	if d.err != nil {
		return d.err
	}
	if err := decodeVM(body, &s.VM); err != nil {
		return err
	}
	body = d.record(tagDebugPort, "debug port section")
	if d.err != nil {
		return d.err
	}
	var err error
	if s.Devices.DebugPort, err = devices.DecodeDebugPortState(body, s.Config.CPUs); err != nil {
		return err
	}
	if len(d.b) >= 2 && le.Uint16(d.b) == tagUART {
		body = d.record(tagUART, "uart section")
		if d.err != nil {
			return d.err
		}
		u, err := devices.DecodeUARTState(body)
		if err != nil {
			return err
		}
		s.Devices.UART = &u
	}
	if len(d.b) >= 2 && le.Uint16(d.b) == tagPlatform {
		body = d.record(tagPlatform, "platform section")
		if d.err != nil {
			return d.err
		}
		p, err := devices.DecodePlatformState(body)
		if err != nil {
			return err
		}
		s.Devices.Platform = &p
	}
	for len(d.b) >= 2 && le.Uint16(d.b) == tagVirtio {
		if len(s.Devices.Virtio) == MaxVirtioDevices {
			return fmt.Errorf("%w: more than %d virtio sections", ErrBadState, MaxVirtioDevices)
		}
		body = d.record(tagVirtio, "virtio section")
		if d.err != nil {
			return d.err
		}
		if err := checkVirtioState(body); err != nil {
			return fmt.Errorf("%w: virtio device %d: %w", ErrBadState, len(s.Devices.Virtio), err)
		}
		s.Devices.Virtio = append(s.Devices.Virtio, bytes.Clone(body))
	}
	if len(d.b) != 0 {
		return fmt.Errorf("%w: %d bytes after the last section", ErrBadState, len(d.b))
	}
	return nil
}

func decodeConfig(d *stateDecoder, body []byte) StateConfig {
	var c StateConfig
	if d.err != nil {
		return c
	}
	const fixed = 32
	if len(body) < fixed {
		d.fail("config section is %d bytes, at least %d", len(body), fixed)
		return c
	}
	c.MemSize = le.Uint64(body)
	cpus := le.Uint32(body[8:])
	nreg := le.Uint32(body[12:])
	c.DataBase = le.Uint64(body[16:])
	c.DataSize = le.Uint64(body[24:])
	if cpus < 1 || cpus > MaxCPUs {
		d.fail("%d vCPUs, want 1..%d", cpus, MaxCPUs)
		return c
	}
	if nreg < 1 || nreg > maxStateRegions {
		d.fail("%d memory regions, want 1..%d", nreg, maxStateRegions)
		return c
	}
	c.CPUs = int(cpus)
	rest := body[fixed:]
	if len(rest) < int(nreg)*regionSize+2 {
		d.fail("config section is %d bytes, too short for %d regions", len(body), nreg)
		return c
	}
	for i := 0; i < int(nreg); i++ {
		r := rest[i*regionSize:]
		if res := le.Uint32(r[28:]); res != 0 {
			d.fail("region %d: reserved field is %#x, want 0", i, res)
			return c
		}
		c.Regions = append(c.Regions, mmu.Region{GPA: le.Uint64(r), Size: le.Uint64(r[8:]), Offset: le.Uint64(r[16:]), Slot: le.Uint32(r[24:])})
	}
	rest = rest[int(nreg)*regionSize:]
	n := int(le.Uint16(rest))
	if len(rest)-2 != n {
		d.fail("config section: payload name of %d bytes, %d bytes left", n, len(rest)-2)
		return c
	}
	c.Payload = string(rest[2:])
	return c
}

func decodeVCPU(body []byte, id int, s *VCPUState) error {
	d := &stateDecoder{b: body}
	p := fmt.Sprintf("vCPU %d ", id)
	if len(body) < 8 {
		d.fail("%ssection is %d bytes, at least 8", p, len(body))
		return d.err
	}
	if got, res := le.Uint32(body), le.Uint32(body[4:]); got != uint32(id) || res != 0 {
		d.fail("%ssection: id %d (reserved %#x), want id %d", p, got, res, id)
		return d.err
	}
	d.b = body[8:]
	d.fixed(tagRegs, p+"regs", &s.Regs)
	d.fixed(tagSregs, p+"sregs", &s.Sregs)
	d.fixed(tagFPU, p+"fpu", &s.FPU)
	if x := d.record(tagXSave, p+"xsave"); d.err == nil {
		if len(x) < xsaveLegacySize || len(x) > maxXSaveSize || len(x)%4 != 0 {
			d.fail("%sxsave area is %d bytes, want %d..%d and a multiple of 4", p, len(x), xsaveLegacySize, maxXSaveSize)
		}
		s.XSave = bytes.Clone(x)
	}
	d.fixed(tagXCRs, p+"xcrs", &s.XCRs)
	if b, n := d.array(tagMSRs, p+"msrs", msrEntrySize, maxStateMSRs); d.err == nil {
		s.MSRs = make([]arch.MSREntry, n)
		for i := range s.MSRs {
			e := b[i*msrEntrySize:]
			if res := le.Uint32(e[4:]); res != 0 {
				d.fail("%sMSR %#x: reserved field is %#x, want 0", p, le.Uint32(e), res)
				break
			}
			s.MSRs[i] = arch.MSREntry{Index: le.Uint32(e), Data: le.Uint64(e[8:])}
		}
	}
	if b := d.sized(tagLAPIC, p+"lapic", len(s.LAPIC.Regs)); d.err == nil {
		copy(s.LAPIC.Regs[:], b)
	}
	d.fixed(tagEvents, p+"events", &s.Events)
	d.fixed(tagMPState, p+"mp state", &s.MPState)
	d.fixed(tagDebugRegs, p+"debugregs", &s.DebugRegs)
	if b, n := d.array(tagCPUID, p+"cpuid", cpuidEntrySize, maxStateCPUID); d.err == nil {
		s.CPUID = make([]arch.CPUIDEntry, n)
		for i := range s.CPUID {
			e := b[i*cpuidEntrySize:]
			if pad := e[28:40]; !bytes.Equal(pad, make([]byte, len(pad))) {
				d.fail("%scpuid entry %d: padding is not zero", p, i)
				break
			}
			s.CPUID[i] = arch.CPUIDEntry{
				Function: le.Uint32(e), Index: le.Uint32(e[4:]), Flags: le.Uint32(e[8:]),
				EAX: le.Uint32(e[12:]), EBX: le.Uint32(e[16:]), ECX: le.Uint32(e[20:]), EDX: le.Uint32(e[24:]),
			}
		}
	}
	if b := d.sized(tagTSCKHz, p+"tsc khz", 4); d.err == nil {
		s.TSCKHz = le.Uint32(b)
	}
	d.done(p + "section")
	return d.err
}

func decodeVM(body []byte, s *VMState) error {
	d := &stateDecoder{b: body}
	for i, tag := range [...]uint16{tagPICMaster, tagPICSlave, tagIOAPIC} {
		name := fmt.Sprintf("vm irqchip %d", i)
		b := d.sized(tag, name, irqChipSize)
		if d.err != nil {
			break
		}
		c := &s.IRQChips[i]
		c.ChipID = le.Uint32(b)
		if res := le.Uint32(b[4:]); res != 0 {
			d.fail("%s: padding is %#x, want 0", name, res)
			break
		}
		copy(c.Chip[:], b[8:])
	}
	d.fixed(tagPIT, "vm pit", &s.PIT)
	d.fixed(tagClock, "vm clock", &s.Clock)
	d.done("the vm section")
	return d.err
}

// validate checks the rules of the encoding that are about values rather
// than layout; MarshalBinary, UnmarshalBinary and Restore apply it.
func (st *MachineState) validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrBadState, fmt.Sprintf(format, args...))
	}
	c := &st.Config
	if c.MemSize < MinMemSize || c.MemSize > MaxStateMemSize || c.MemSize%mmu.RegionSize != 0 {
		return bad("memory size %d: want a multiple of 2 MiB from %s to %s", c.MemSize, option.FormatSize(MinMemSize), option.FormatSize(MaxStateMemSize))
	}
	if c.CPUs < 1 || c.CPUs > MaxCPUs {
		return bad("%d vCPUs, want 1..%d", c.CPUs, MaxCPUs)
	}
	if len(c.Regions) < 1 || len(c.Regions) > maxStateRegions {
		return bad("%d memory regions, want 1..%d", len(c.Regions), maxStateRegions)
	}
	var off uint64
	for i, r := range c.Regions {
		switch {
		case r.Size == 0 || r.Size > MaxStateMemSize || r.Size%mmu.RegionSize != 0 || r.GPA%mmu.RegionSize != 0:
			return bad("region %d (GPA %#x, size %#x): want a non-empty, 2 MiB aligned range", i, r.GPA, r.Size)
		case r.GPA > MaxStateMemSize<<2:
			return bad("region %d starts at GPA %#x, beyond any guest-physical address", i, r.GPA)
		case r.Offset != off:
			return bad("region %d at backing offset %#x, want %#x (regions follow each other in the backing)", i, r.Offset, off)
		case i > 0 && r.GPA < c.Regions[i-1].GPA+c.Regions[i-1].Size:
			return bad("region %d (GPA %#x) overlaps or precedes region %d", i, r.GPA, i-1)
		}
		for _, q := range c.Regions[:i] {
			if q.Slot == r.Slot {
				return bad("regions use memory slot %d twice", r.Slot)
			}
		}
		off += r.Size
		if off > c.MemSize {
			break
		}
	}
	if off != c.MemSize {
		return bad("memory regions cover %#x bytes, memory size is %#x", off, c.MemSize)
	}
	if c.DataSize > 0 {
		inside := false
		for _, r := range c.Regions {
			if c.DataBase >= r.GPA && c.DataBase-r.GPA < r.Size && c.DataSize <= r.Size-(c.DataBase-r.GPA) {
				inside = true
			}
		}
		if !inside {
			return bad("payload data area [%#x, +%#x) is not inside one memory region", c.DataBase, c.DataSize)
		}
	}
	if len(c.Payload) > maxPayloadName || !utf8.ValidString(c.Payload) {
		return bad("payload name: want at most %d bytes of UTF-8", maxPayloadName)
	}
	if len(st.VCPUs) != c.CPUs {
		return bad("%d vCPU states for %d vCPUs", len(st.VCPUs), c.CPUs)
	}
	for i := range st.VCPUs {
		if err := st.VCPUs[i].validate(); err != nil {
			return bad("vCPU %d: %v", i, err)
		}
	}
	for i, chip := range st.VM.IRQChips {
		if chip.ChipID != uint32(i) {
			return bad("irqchip %d has chip id %d", i, chip.ChipID)
		}
	}
	if err := st.Devices.DebugPort.Validate(c.CPUs); err != nil {
		return bad("debug port: %v", err)
	}
	if u := st.Devices.UART; u != nil {
		if err := u.Validate(); err != nil {
			return bad("serial port: %v", err)
		}
	}
	if st.Devices.Platform != nil && st.Devices.UART == nil {
		return bad("platform devices without a serial port: only a Linux machine has them")
	}
	if len(st.Devices.Virtio) > 0 && st.Devices.UART == nil {
		return bad("virtio devices without a serial port: only a Linux machine has them")
	}
	if len(st.Devices.Virtio) > MaxVirtioDevices {
		return bad("%d virtio devices, at most %d", len(st.Devices.Virtio), MaxVirtioDevices)
	}
	for i, v := range st.Devices.Virtio {
		if err := checkVirtioState(v); err != nil {
			return bad("virtio device %d: %v", i, err)
		}
	}
	return nil
}

// checkVirtioState decodes a virtio section: the transport and its
// device's body. What depends on the machine (offered features, guest
// memory, the disk) is for Transport.LoadState.
func checkVirtioState(b []byte) error {
	_, id, body, err := virtio.DecodeTransportState(b)
	if err != nil {
		return err
	}
	switch id {
	case virtio.DeviceIDBlock:
		_, err = virtio.DecodeBlockState(body)
	case virtio.DeviceIDNet:
		_, err = virtio.DecodeNetState(body)
	}
	return err
}

func (s *VCPUState) validate() error {
	if n := len(s.XSave); n < xsaveLegacySize || n > maxXSaveSize || n%4 != 0 {
		return fmt.Errorf("xsave area is %d bytes, want %d..%d and a multiple of 4", n, xsaveLegacySize, maxXSaveSize)
	}
	if n := s.XCRs.NrXCRs; n > maxXCRs {
		return fmt.Errorf("%d XCRs, at most %d", n, maxXCRs)
	}
	if n := len(s.MSRs); n > maxStateMSRs {
		return fmt.Errorf("%d MSRs, at most %d", n, maxStateMSRs)
	}
	seen := make(map[uint32]bool, len(s.MSRs))
	for _, m := range s.MSRs {
		if seen[m.Index] {
			return fmt.Errorf("MSR %#x appears twice", m.Index)
		}
		seen[m.Index] = true
	}
	if n := len(s.CPUID); n > maxStateCPUID {
		return fmt.Errorf("%d CPUID entries, at most %d", n, maxStateCPUID)
	}
	return nil
}
