package vmm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/devices"
	"github.com/understudy-vmm/understudy/vmm/virtio"
)

// testState returns a valid state of an 8 MiB machine with ncpus vCPUs,
// every part filled with recognizable values.
func testState(ncpus int) *MachineState {
	st := &MachineState{
		Config: StateConfig{
			MemSize: 8 << 20, CPUs: ncpus, Regions: []mmu.Region{{Size: 8 << 20}},
			Payload: "counter", DataBase: 2 << 20, DataSize: 6 << 20,
		},
	}
	for i := 0; i < ncpus; i++ {
		v := VCPUState{
			Regs:   arch.Regs{RAX: uint64(i), RIP: payloadBase + 0x40, RSP: stackAreaTop - 16, RFLAGS: 0x3002},
			XSave:  make([]byte, 4096),
			MSRs:   []arch.MSREntry{{Index: msrTSC, Data: 123456789}, {Index: msrSTAR, Data: 0x23001000000000}, {Index: msrKVMSystemTimeNew, Data: 0}},
			CPUID:  []arch.CPUIDEntry{{Function: 0, EAX: 0xd, EBX: 0x756e6547}, {Function: 1, EBX: uint32(i) << 24, ECX: 1 << 31}, {Function: 7, Index: 0, Flags: arch.CPUIDFlagSignificantIndex}},
			TSCKHz: 2_100_000,
		}
		v.Sregs.CS = arch.CodeSegment64(arch.SelUserCode, 3)
		v.Sregs.CR0, v.Sregs.CR3, v.Sregs.CR4, v.Sregs.EFER = 0x80050033, pageTablesAddr, 0x620, 0xd00
		v.Sregs.APICBase = 0xfee00900
		v.FPU.FCW, v.FPU.MXCSR = 0x37f, 0x1f80
		v.FPU.XMM[3][5] = byte(i + 7)
		v.XSave[24] = 0x80
		v.XSave[512] = 3
		v.XCRs.NrXCRs = 1
		v.XCRs.XCRs[0].Value = 3
		v.LAPIC.Regs[0x20] = byte(i) // APIC id
		v.LAPIC.Regs[0xf0] = 0xff
		v.Events.Flags = 7
		v.Events.Interrupt.Shadow = 1
		v.MPState.State = arch.MPStateRunnable
		v.DebugRegs.DR6, v.DebugRegs.DR7 = 0xffff0ff0, 0x400
		st.VCPUs = append(st.VCPUs, v)
	}
	for i := range st.VM.IRQChips {
		st.VM.IRQChips[i].ChipID = uint32(i)
		st.VM.IRQChips[i].Chip[0] = byte(0x10 + i)
	}
	st.VM.PIT.Channels[0].Count = 65536
	st.VM.PIT.Channels[0].Mode = 3
	st.VM.PIT.Flags = 1
	st.VM.Clock.Clock = 987654321
	st.Devices.DebugPort = devices.DebugPortState{Records: 7000, RecordHigh: make([]uint32, ncpus)}
	st.Devices.DebugPort.RecordHigh[ncpus-1] = 1
	return st
}

func mustMarshal(t testing.TB, st *MachineState) []byte {
	t.Helper()
	b, err := st.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary() = %v", err)
	}
	return b
}

func TestStateEncodingRoundTrip(t *testing.T) {
	for _, ncpus := range []int{1, 3, MaxCPUs} {
		st := testState(ncpus)
		b := mustMarshal(t, st)
		var got MachineState
		if err := got.UnmarshalBinary(b); err != nil {
			t.Fatalf("%d vCPUs: UnmarshalBinary(MarshalBinary()) = %v", ncpus, err)
		}
		if !reflect.DeepEqual(&got, st) {
			t.Errorf("%d vCPUs: UnmarshalBinary(MarshalBinary(st)) = %+v, want %+v", ncpus, got, *st)
		}
		if again := mustMarshal(t, &got); !bytes.Equal(again, b) {
			t.Errorf("%d vCPUs: re-encoding a decoded state gives other bytes", ncpus)
		}
		// AppendBinary appends.
		pre := []byte("prefix")
		if a, err := st.AppendBinary(pre); err != nil || !bytes.Equal(a[:6], pre) || !bytes.Equal(a[6:], b) {
			t.Errorf("%d vCPUs: AppendBinary(prefix) = %d bytes, %v; want prefix + %d bytes", ncpus, len(a), err, len(b))
		}
	}
}

// TestStateKernelLayouts checks that the fixed-size fields are encoded with
// the sizes the format documents (the kernel's struct sizes).
func TestStateKernelLayouts(t *testing.T) {
	for _, tc := range []struct {
		v    any
		size int
	}{
		{&arch.Regs{}, 144}, {&arch.Sregs{}, 312}, {&arch.FPU{}, 416}, {&arch.XCRs{}, 392},
		{&arch.LAPICState{}, 1024}, {&arch.VCPUEvents{}, 64}, {&arch.MPState{}, 4}, {&arch.DebugRegs{}, 128},
		{&arch.MSREntry{}, msrEntrySize}, {&arch.CPUIDEntry{}, cpuidEntrySize}, {&arch.IRQChip{}, irqChipSize},
		{&arch.PITState2{}, 112}, {&arch.ClockData{}, 48},
	} {
		if got := binary.Size(tc.v); got != tc.size {
			t.Errorf("binary.Size(%T) = %d, want %d", tc.v, got, tc.size)
		}
	}
}

// TestStateMaxSize checks that the largest state the limits allow fits in
// MaxStateSize.
func TestStateMaxSize(t *testing.T) {
	st := testState(MaxCPUs)
	st.Config.Payload = strings.Repeat("p", maxPayloadName)
	for i := range st.VCPUs {
		v := &st.VCPUs[i]
		v.XSave = make([]byte, maxXSaveSize)
		v.MSRs = make([]arch.MSREntry, maxStateMSRs)
		for j := range v.MSRs {
			v.MSRs[j].Index = uint32(j)
		}
		v.CPUID = make([]arch.CPUIDEntry, maxStateCPUID)
	}
	b := mustMarshal(t, st)
	if len(b) > MaxStateSize {
		t.Errorf("largest state encodes to %d bytes, more than MaxStateSize %d", len(b), MaxStateSize)
	}
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil {
		t.Errorf("UnmarshalBinary(largest state) = %v", err)
	}
}

// putU32At returns a copy of b with the u32 at off replaced.
func putU32At(b []byte, off int, v uint32) []byte {
	c := bytes.Clone(b)
	binary.LittleEndian.PutUint32(c[off:], v)
	return c
}

// fieldOffset returns the offset of the body of vCPU 0's field tag in an
// encoded state.
func fieldOffset(t *testing.T, b []byte, tag uint16) int {
	t.Helper()
	off := 8                                        // header
	off += 8 + int(le.Uint32(b[off+4:]))            // config
	off += 8 + 8                                    // vCPU 0 section header, id
	for le.Uint16(b[off:]) != tag && off < len(b) { // fields before tag
		off += 8 + int(le.Uint32(b[off+4:]))
	}
	return off + 8
}

func TestUnmarshalStateErrors(t *testing.T) {
	good := mustMarshal(t, testState(2))
	mutate := func(f func(st *MachineState)) []byte {
		st := testState(2)
		f(st)
		return st.encode(nil) // not validated: the decoder must catch it
	}
	sregs := fieldOffset(t, good, tagSregs)
	tests := []struct {
		name string
		in   []byte
		want string
	}{
		{"empty", nil, "truncated"},
		{"header only", good[:8], "config section missing"},
		{"foreign", []byte("\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00"), "not an encoded machine state"},
		{"version 2", putU32At(good, 4, 2), "version 2, this build reads version 1"},
		{"flags", putU32At(good, 4, 1|1<<16), "flags 0x1"},
		{"trailing byte", append(bytes.Clone(good), 0), "1 bytes after the last section"},
		{"too large", make([]byte, MaxStateSize+1), "at most"},
		{"record reserved", putU32At(good, 8, tagConfig|1<<16), "reserved field is 0x1"},
		{"section length beyond end", putU32At(good, 12, 1<<30), "only"},
		{"no vCPUs", mutate(func(st *MachineState) { st.Config.CPUs = 0; st.VCPUs = nil }), "0 vCPUs"},
		{"too many vCPUs", putU32At(good, 16+8, MaxCPUs+1), "33 vCPUs"},
		{"vCPU count mismatch", putU32At(good, 16+8, 3), "vCPU 2 section"},
		{"too many regions", putU32At(good, 16+12, 5), "5 memory regions"},
		{"memory size odd", mutate(func(st *MachineState) { st.Config.MemSize += 4096; st.Config.Regions[0].Size += 4096 }), "memory size"},
		{"memory size huge", mutate(func(st *MachineState) { st.Config.MemSize = 1 << 50; st.Config.Regions[0].Size = 1 << 50 }), "memory size"},
		{"regions short of memory", mutate(func(st *MachineState) { st.Config.Regions[0].Size = 4 << 20 }), "regions cover"},
		{"regions overlap", mutate(func(st *MachineState) {
			st.Config.Regions = []mmu.Region{{Size: 4 << 20}, {GPA: 2 << 20, Size: 4 << 20, Offset: 4 << 20, Slot: 1}}
		}), "overlaps"},
		{"regions share a slot", mutate(func(st *MachineState) {
			st.Config.Regions = []mmu.Region{{Size: 4 << 20}, {GPA: 8 << 20, Size: 4 << 20, Offset: 4 << 20}}
		}), "slot 0 twice"},
		{"region size wraps", mutate(func(st *MachineState) {
			st.Config.Regions = []mmu.Region{{Size: 4 << 20}, {GPA: 8 << 20, Size: ^uint64(0) - (2<<20 - 1), Offset: 4 << 20, Slot: 1}}
		}), "region 1"},
		{"data outside memory", mutate(func(st *MachineState) { st.Config.DataSize = 8 << 20 }), "data area"},
		{"payload name not UTF-8", mutate(func(st *MachineState) { st.Config.Payload = "\xff" }), "UTF-8"},
		{"payload name length", putU32At(good, 16+32+32, 300), "payload name of"},
		{"xsave short", mutate(func(st *MachineState) { st.VCPUs[1].XSave = make([]byte, 4092) }), "vCPU 1 xsave area is 4092 bytes"},
		{"xsave long", mutate(func(st *MachineState) { st.VCPUs[0].XSave = make([]byte, maxXSaveSize+4) }), "xsave area is 65540 bytes"},
		{"xsave unaligned", mutate(func(st *MachineState) { st.VCPUs[0].XSave = make([]byte, 4098) }), "multiple of 4"},
		{"too many XCRs", mutate(func(st *MachineState) { st.VCPUs[0].XCRs.NrXCRs = 17 }), "17 XCRs"},
		{"too many MSRs", mutate(func(st *MachineState) { st.VCPUs[0].MSRs = make([]arch.MSREntry, maxStateMSRs+1) }), "1025 entries, at most 1024"},
		{"MSR twice", mutate(func(st *MachineState) { st.VCPUs[0].MSRs[1].Index = msrTSC }), "MSR 0x10 appears twice"},
		{"too many CPUID entries", mutate(func(st *MachineState) { st.VCPUs[0].CPUID = make([]arch.CPUIDEntry, maxStateCPUID+1) }), "257 entries"},
		{"sregs padding", func() []byte { b := bytes.Clone(good); b[sregs+23] = 1; return b }(), "padding or reserved bytes are not zero"},
		{"sregs short", putU32At(good, sregs-4, 311), "sregs is 311 bytes, want 312"},
		{"irqchip id", mutate(func(st *MachineState) { st.VM.IRQChips[2].ChipID = 7 }), "chip id 7"},
		{"debug port vCPUs", mutate(func(st *MachineState) { st.Devices.DebugPort.RecordHigh = []uint32{1, 2, 3} }), "debug port section has 3 vCPUs"},
	}
	for _, tc := range tests {
		var st MachineState
		err := st.UnmarshalBinary(tc.in)
		if err == nil || !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: UnmarshalBinary() = %v, want ErrBadState and %q", tc.name, err, tc.want)
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: UnmarshalBinary() = %q, want one line", tc.name, err)
		}
		if st.VCPUs != nil || st.Config.CPUs != 0 {
			t.Errorf("%s: UnmarshalBinary() failed but changed the state", tc.name)
		}
	}
}

// TestUnmarshalStateTruncated decodes every prefix of a valid state.
func TestUnmarshalStateTruncated(t *testing.T) {
	good := mustMarshal(t, testState(2))
	for n := 0; n < len(good); n++ {
		var st MachineState
		if err := st.UnmarshalBinary(good[:n]); !errors.Is(err, ErrBadState) {
			t.Fatalf("UnmarshalBinary(first %d of %d bytes) = %v, want ErrBadState", n, len(good), err)
		}
	}
}

func TestMarshalStateRejectsInvalid(t *testing.T) {
	for _, tc := range []struct {
		name string
		f    func(st *MachineState)
		want string
	}{
		{"vCPU states missing", func(st *MachineState) { st.VCPUs = st.VCPUs[:1] }, "1 vCPU states for 2 vCPUs"},
		{"no regions", func(st *MachineState) { st.Config.Regions = nil }, "0 memory regions"},
		{"debug port", func(st *MachineState) { st.Devices.DebugPort.RecordHigh = nil }, "record high halves for 0 vCPUs"},
		{"name too long", func(st *MachineState) { st.Config.Payload = strings.Repeat("x", 256) }, "payload name"},
	} {
		st := testState(2)
		tc.f(st)
		if _, err := st.MarshalBinary(); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: MarshalBinary() = %v, want ErrBadState and %q", tc.name, err, tc.want)
		}
	}
}

func FuzzUnmarshalMachineState(f *testing.F) {
	for _, n := range []int{1, 2} {
		b, err := testState(n).MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		f.Add(b[:len(b)/2])
	}
	f.Add(mustMarshal(f, linuxTestState()))
	f.Add(mustMarshal(f, linuxVirtioTestState(f, 1)))
	f.Add(mustMarshal(f, linuxVirtioTestState(f, 2)))
	f.Add([]byte("USVS\x01\x00\x00\x00"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var st MachineState
		err := st.UnmarshalBinary(data)
		if err != nil {
			if !errors.Is(err, ErrBadState) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("UnmarshalBinary() = %q, want one line wrapping ErrBadState", err)
			}
			return
		}
		again, err := st.MarshalBinary()
		if err != nil || !bytes.Equal(again, data) {
			t.Fatalf("MarshalBinary(UnmarshalBinary(%d bytes)) = %d bytes, %v; want the same bytes", len(data), len(again), err)
		}
	})
}

// linuxTestState is a Linux machine's state: a payload state plus the
// serial port.
func linuxTestState() *MachineState {
	st := testState(2)
	st.Config.Payload, st.Config.DataBase, st.Config.DataSize = "", 0, 0
	// IER: RDI and THRI; FCR: FIFOs on; MCR: OUT2; MSR: CTS, DSR and DCD.
	st.Devices.UART = &devices.UARTState{IER: 0x01 | 0x02, FCR: 0x01, LCR: 3, MCR: 0x08, MSR: 0x10 | 0x20 | 0x80, DLL: 1, THRPending: true, RX: []byte("ls\r")}
	return st
}

func TestStateEncodingPlatform(t *testing.T) {
	st := linuxTestState()
	withoutPlatform := mustMarshal(t, st)
	st.Devices.Platform = &devices.PlatformState{ACPIEnable: 0x100, ACPIControl: 1, KbdWriteOutput: true}
	b := mustMarshal(t, st)
	if len(b) != len(withoutPlatform)+recordHeaderSize+len((&devices.PlatformState{}).AppendBinary(nil)) {
		t.Errorf("with platform state %d bytes, without %d: want one platform section more", len(b), len(withoutPlatform))
	}
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil || !reflect.DeepEqual(&got, st) {
		t.Errorf("platform state after a round trip: %+v, %v; want %+v", got.Devices.Platform, err, st.Devices.Platform)
	}
	// A state from before platform sections (a Linux machine without one)
	// still decodes.
	if err := got.UnmarshalBinary(withoutPlatform); err != nil || got.Devices.Platform != nil {
		t.Errorf("UnmarshalBinary(no platform section) = %v, platform %+v; want nil, none", err, got.Devices.Platform)
	}
	bad := append([]byte(nil), b...)
	bad[len(bad)-4] = 2 // an unknown keyboard flag
	if err := got.UnmarshalBinary(bad); err == nil || !strings.Contains(err.Error(), "platform") {
		t.Errorf("UnmarshalBinary(unknown keyboard flag) = %v, want a platform section error", err)
	}
	st.Devices.UART = nil
	if _, err := st.MarshalBinary(); err == nil {
		t.Errorf("MarshalBinary accepted platform devices without a serial port")
	}
}

func TestStateEncodingUART(t *testing.T) {
	st := linuxTestState()
	b := mustMarshal(t, st)
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(&got, st) {
		t.Errorf("UART state after a round trip: %+v, want %+v", got.Devices.UART, st.Devices.UART)
	}
	// A payload state has no UART section: its encoding ends with the
	// debug port, as before Linux machines existed.
	plain := linuxTestState()
	plain.Devices.UART = nil
	pb := mustMarshal(t, plain)
	if len(b) != len(pb)+recordHeaderSize+len((&devices.UARTState{}).AppendBinary(nil))+len(st.Devices.UART.RX) {
		t.Errorf("Linux state is %d bytes, payload state %d: want exactly one UART section more", len(b), len(pb))
	}
	bad := append([]byte(nil), b...)
	bad[len(bad)-len(st.Devices.UART.RX)-len((&devices.UARTState{}).AppendBinary(nil))] = 0x40 // IER with a bit that does not exist
	if err := got.UnmarshalBinary(bad); err == nil || !strings.Contains(err.Error(), "IER") {
		t.Errorf("UnmarshalBinary(bad IER) = %v", err)
	}
	if err := got.UnmarshalBinary(append(b, 0x11, 0, 0, 0, 0, 0, 0, 0)); err == nil {
		t.Errorf("UnmarshalBinary accepted a second UART section")
	}
	st.Devices.UART.RX = make([]byte, 17)
	if _, err := st.MarshalBinary(); err == nil {
		t.Errorf("MarshalBinary accepted a 17-byte FIFO")
	}
}

// TestAppendFPU checks the hand-written kvm_fpu encoder against the
// reflective one it replaces, and fpuFromXSave against the FXSAVE layout.
func TestAppendFPU(t *testing.T) {
	var f arch.FPU
	for i := range f.FPR {
		f.FPR[i][3] = byte(i + 1)
	}
	for i := range f.XMM {
		f.XMM[i][i] = byte(0x80 + i)
	}
	f.FCW, f.FSW, f.FTWX, f.LastOpcode, f.LastIP, f.LastDP, f.MXCSR = 0x37f, 0x1234, 0x81, 0x55, 0x1122334455667788, 0x99aabbccddeeff00, 0x1f80
	want, err := binary.Append(nil, le, &f)
	if err != nil {
		t.Fatal(err)
	}
	if got := appendFPU(nil, &f); !bytes.Equal(got, want) {
		t.Fatalf("appendFPU = %x, want %x", got, want)
	}
	// The same values in an FXSAVE area.
	x := make([]byte, xsaveLegacySize)
	le.PutUint16(x[0:], f.FCW)
	le.PutUint16(x[2:], f.FSW)
	x[4] = f.FTWX
	le.PutUint16(x[6:], f.LastOpcode)
	le.PutUint64(x[8:], f.LastIP)
	le.PutUint64(x[16:], f.LastDP)
	le.PutUint32(x[24:], f.MXCSR)
	le.PutUint32(x[28:], 0xffff) // MXCSR_MASK: not part of kvm_fpu
	for i := range f.FPR {
		copy(x[32+16*i:], f.FPR[i][:])
	}
	for i := range f.XMM {
		copy(x[160+16*i:], f.XMM[i][:])
	}
	if got := fpuFromXSave(x); got != f {
		t.Errorf("fpuFromXSave = %+v, want %+v", got, f)
	}
}

// virtioTestStates are a virtio-blk and a virtio-net transport's states,
// the net device with a backlog of frames of frameSize bytes.
func virtioTestStates(t testing.TB, frames, frameSize int) [][]byte {
	t.Helper()
	q := virtio.QueueState{Size: 8, Ready: true, LastAvail: 3, UsedIdx: 3, Desc: 0x10000, Driver: 0x10400, Device: 0x10800}
	ts := virtio.TransportState{
		Status:         virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK | virtio.StatusDriverOK,
		DriverFeatures: virtio.FeatureVersion1, Queues: []virtio.QueueState{q},
	}
	bs := virtio.BlockState{Capacity: 2048, DiskSize: 2048 * 512, Fingerprint: [32]byte{1, 2, 3}}
	body, err := bs.AppendBinary(nil)
	if err != nil {
		t.Fatal(err)
	}
	blk, err := virtio.AppendTransportState(nil, virtio.DeviceIDBlock, &ts, body)
	if err != nil {
		t.Fatal(err)
	}
	ns := virtio.NetState{MAC: DefaultMAC(0), LinkStatus: 1}
	for i := range frames {
		ns.Backlog = append(ns.Backlog, bytes.Repeat([]byte{byte(i + 1)}, frameSize))
	}
	if body, err = ns.AppendBinary(nil); err != nil {
		t.Fatal(err)
	}
	ts.Queues = []virtio.QueueState{q, q}
	nic, err := virtio.AppendTransportState(nil, virtio.DeviceIDNet, &ts, body)
	if err != nil {
		t.Fatal(err)
	}
	return [][]byte{blk, nic}
}

// linuxVirtioTestState is a Linux machine's state with a virtio-blk and a
// virtio-net device, the latter with frames frames in its backlog.
func linuxVirtioTestState(t testing.TB, frames int) *MachineState {
	st := linuxTestState()
	st.Devices.Platform = &devices.PlatformState{ACPIEnable: 0x100}
	st.Devices.Virtio = virtioTestStates(t, frames, 60)
	return st
}

func TestStateEncodingVirtio(t *testing.T) {
	st := linuxVirtioTestState(t, 2)
	b := mustMarshal(t, st)
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if len(got.Devices.Virtio) != 2 || !bytes.Equal(got.Devices.Virtio[0], st.Devices.Virtio[0]) || !bytes.Equal(got.Devices.Virtio[1], st.Devices.Virtio[1]) {
		t.Errorf("virtio sections after a round trip differ")
	}
	// A state without virtio sections (an older one) still decodes.
	old := linuxVirtioTestState(t, 0)
	old.Devices.Virtio = nil
	if err := got.UnmarshalBinary(mustMarshal(t, old)); err != nil || got.Devices.Virtio != nil {
		t.Errorf("state without virtio sections: %v, %d sections", err, len(got.Devices.Virtio))
	}
	// Refused: virtio sections in a payload machine's state, too many, a
	// malformed one.
	payload := testState(1)
	payload.Devices.Virtio = st.Devices.Virtio
	if _, err := payload.MarshalBinary(); !errors.Is(err, ErrBadState) {
		t.Errorf("payload state with virtio devices: MarshalBinary = %v, want ErrBadState", err)
	}
	many := linuxVirtioTestState(t, 0)
	for len(many.Devices.Virtio) <= MaxVirtioDevices {
		many.Devices.Virtio = append(many.Devices.Virtio, many.Devices.Virtio[0])
	}
	if _, err := many.MarshalBinary(); !errors.Is(err, ErrBadState) {
		t.Errorf("%d virtio devices: MarshalBinary = %v, want ErrBadState", len(many.Devices.Virtio), err)
	}
	enc := many.encode(nil) // without validation
	if err := got.UnmarshalBinary(enc); !errors.Is(err, ErrBadState) {
		t.Errorf("%d virtio sections: UnmarshalBinary = %v, want ErrBadState", len(many.Devices.Virtio), err)
	}
	bad := bytes.Clone(b)
	bad[len(bad)-1] ^= 0xff                       // inside the net backlog's last frame: still valid
	bad[len(bad)-len(st.Devices.Virtio[1])] = 'X' // the net section's magic
	if err := got.UnmarshalBinary(bad); !errors.Is(err, ErrBadState) || !strings.Contains(err.Error(), "virtio device 1") {
		t.Errorf("malformed virtio section: UnmarshalBinary = %v, want ErrBadState naming virtio device 1", err)
	}
}

// TestMaxStateSizeFitsVirtio checks that the largest Linux state fits
// MaxStateSize: MaxCPUs vCPUs at their limits and MaxVirtioDevices
// virtio-net devices each with a full backlog of maximal frames.
func TestMaxStateSizeFitsVirtio(t *testing.T) {
	full := virtioTestStates(t, virtio.NetBacklog, virtio.NetMaxFrame)[1]
	if len(full) > virtio.MaxTransportStateSize {
		t.Fatalf("a full virtio-net state is %d bytes, more than MaxTransportStateSize %d", len(full), virtio.MaxTransportStateSize)
	}
	st := linuxVirtioTestState(t, 0)
	st.Devices.Virtio = nil
	for range MaxVirtioDevices {
		st.Devices.Virtio = append(st.Devices.Virtio, full)
	}
	b := mustMarshal(t, st)
	vcpu := recordHeaderSize + 8 + 12*recordHeaderSize + 144 + 312 + 416 + maxXSaveSize + 392 + msrEntrySize*maxStateMSRs +
		1024 + 64 + 4 + 128 + cpuidEntrySize*maxStateCPUID + 4
	worst := len(b) + MaxCPUs*vcpu
	if worst > MaxStateSize {
		t.Errorf("the largest state is about %d bytes, MaxStateSize %d", worst, MaxStateSize)
	}
	t.Logf("full virtio-net state %d bytes; largest machine state about %d bytes of %d", len(full), worst, MaxStateSize)
	var got MachineState
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
}
