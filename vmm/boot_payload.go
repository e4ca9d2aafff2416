package vmm

import (
	"encoding/binary"
	"fmt"
	"os"
	"strings"

	"github.com/understudy-vmm/understudy/arch"
	"github.com/understudy-vmm/understudy/mmu"
	"github.com/understudy-vmm/understudy/vmm/option"
	"github.com/understudy-vmm/understudy/vmm/payload"
)

// Guest-physical layout of a payload machine:
//
//	0x1000   GDT
//	0x2000   params block (read by the payload)
//	0x3000   TSS, followed by its I/O permission bitmap
//	0x10000  identity-mapped page tables (2 MiB pages, U/S set)
//	0x80000  vCPU stacks, 16 KiB each and 16 KiB aligned, growing down from
//	         0x100000; the u32 at top-8 is the payload's record high half
//	0x100000 payload image; entry point at its first byte
//	data     from the first 2 MiB boundary after the image to the end of
//	         the first RAM region (at most 3 GiB): the payload's data area
const (
	gdtAddr         = 0x1000
	paramsAddr      = 0x2000
	tssAddr         = 0x3000
	tssIOBitmapOff  = 0x68
	tssLimit        = tssIOBitmapOff + 8192 // bitmap plus its terminating byte
	pageTablesAddr  = 0x10000
	pageTablesEnd   = 0x80000
	stackAreaTop    = 0x100000
	stackSize       = 16 << 10
	payloadMaxCPUs  = (stackAreaTop - pageTablesEnd) / stackSize
	payloadBase     = 0x100000
	tssAddrKVM      = 0xfffbd000 // KVM's own three-page TSS region (Intel)
	payloadDataMask = mmu.RegionSize - 1
)

type loadedPayload struct {
	name     string
	image    []byte
	args     [payload.NumArgs]uint64
	dataBase uint64
	dataSize uint64
}

// resolvePayload finds the payload's image and validates its options against
// the memory it will get.
func resolvePayload(cfg Config) (*loadedPayload, error) {
	pc := cfg.Payload
	if pc == nil || pc.Name == "" {
		return nil, fmt.Errorf("no payload given (built-in payloads: %s)", strings.Join(payload.Names(), ", "))
	}
	pl := &loadedPayload{name: pc.Name}
	var spec *payload.Spec
	if strings.ContainsRune(pc.Name, '/') || strings.HasSuffix(pc.Name, ".bin") {
		img, err := os.ReadFile(pc.Name)
		if err != nil {
			return nil, fmt.Errorf("payload file: %w", err)
		}
		if len(img) == 0 {
			return nil, fmt.Errorf("payload file %s is empty", pc.Name)
		}
		if len(pc.Options) > 0 {
			return nil, fmt.Errorf("payload file %s takes no options", pc.Name)
		}
		pl.image = img
	} else {
		var err error
		if spec, err = payload.Lookup(pc.Name); err != nil {
			return nil, err
		}
		pl.image = spec.Image()
	}
	ramEnd := cfg.MemSize
	if ramEnd > mmu.HoleStart {
		ramEnd = mmu.HoleStart
	}
	end := uint64(payloadBase) + uint64(len(pl.image))
	if end > ramEnd {
		return nil, fmt.Errorf("payload %s (%d bytes, loaded at 1 MiB) does not fit in %s of guest memory", pc.Name, len(pl.image), option.FormatSize(cfg.MemSize))
	}
	pl.dataBase = (end + payloadDataMask) &^ payloadDataMask
	if pl.dataBase < ramEnd {
		pl.dataSize = ramEnd - pl.dataBase
	}
	if spec != nil {
		args, err := spec.Args(pc.Options, pl.dataSize)
		if err != nil {
			return nil, err
		}
		pl.args = args
	}
	return pl, nil
}

// loadPayload writes the GDT, TSS, params, page tables and image into guest
// memory and puts every vCPU in 64-bit mode at CPL3 at the payload's entry.
func (m *Machine) loadPayload(pl *loadedPayload) error {
	mem := m.mem
	regions := mem.Regions()
	top := regions[len(regions)-1].GPA + regions[len(regions)-1].Size

	gdt := []uint64{
		0,
		arch.Descriptor(arch.CodeSegment64(arch.SelKernelCode, 0)),
		arch.Descriptor(arch.DataSegment(arch.SelKernelData, 0)),
		arch.Descriptor(arch.CodeSegment64(arch.SelUserCode, 3)),
		arch.Descriptor(arch.DataSegment(arch.SelUserData, 3)),
	}
	tss := arch.TSSSegment(arch.SelTSS, tssAddr, tssLimit)
	lo, hi := arch.SystemDescriptor(tss)
	gdt = append(gdt, lo, hi)
	gdtBytes := make([]byte, 8*len(gdt))
	for i, d := range gdt {
		binary.LittleEndian.PutUint64(gdtBytes[8*i:], d)
	}
	if err := mem.Write(gdtAddr, gdtBytes); err != nil {
		return err
	}

	// TSS: I/O bitmap denies every port but the debug ports, so CPL3 code
	// can reach exactly those.
	tssBytes := make([]byte, tssLimit+1)
	binary.LittleEndian.PutUint16(tssBytes[102:], tssIOBitmapOff)
	bitmap := tssBytes[tssIOBitmapOff:]
	for i := range bitmap {
		bitmap[i] = 0xff
	}
	for p := payload.PortFirst; p <= payload.PortLast; p++ {
		bitmap[p/8] &^= 1 << (p % 8)
	}
	if err := mem.Write(tssAddr, tssBytes); err != nil {
		return err
	}

	params := make([]byte, payload.ParamArgs+8*payload.NumArgs)
	le := binary.LittleEndian
	le.PutUint64(params[payload.ParamMagic:], payload.Magic)
	le.PutUint64(params[payload.ParamMemSize:], top)
	le.PutUint64(params[payload.ParamDataBase:], pl.dataBase)
	le.PutUint64(params[payload.ParamDataSize:], pl.dataSize)
	le.PutUint64(params[payload.ParamNCPUs:], uint64(len(m.vcpus)))
	for i, a := range pl.args {
		le.PutUint64(params[payload.ParamArgs+8*i:], a)
	}
	if err := mem.Write(paramsAddr, params); err != nil {
		return err
	}

	tables, cr3, err := arch.IdentityPageTables(arch.IdentityMapSpec{TablesGPA: pageTablesAddr, MemSize: roundUp(top, mmu.RegionSize), User: true, Small: m.cfg.Payload.Guest4K})
	if err != nil {
		return err
	}
	if pageTablesAddr+uint64(len(tables)) > pageTablesEnd {
		return fmt.Errorf("page tables for %s of guest-physical space do not fit below %#x", option.FormatSize(top), pageTablesEnd)
	}
	if err := mem.Write(pageTablesAddr, tables); err != nil {
		return err
	}
	if err := mem.Write(payloadBase, pl.image); err != nil {
		return err
	}

	for _, v := range m.vcpus {
		s, err := v.cpu.Sregs()
		if err != nil {
			return err
		}
		s.CS = arch.CodeSegment64(arch.SelUserCode, 3)
		ds := arch.DataSegment(arch.SelUserData, 3)
		s.DS, s.ES, s.FS, s.GS, s.SS = ds, ds, ds, ds, ds
		s.TR = tss
		s.GDT = arch.DTable{Base: gdtAddr, Limit: uint16(len(gdtBytes) - 1)}
		s.IDT = arch.DTable{}
		s.CR0 = arch.CR0PE | arch.CR0MP | arch.CR0ET | arch.CR0NE | arch.CR0WP | arch.CR0PG
		s.CR4 = arch.CR4PAE | arch.CR4OSFXSR | arch.CR4OSXMMEXCPT
		s.CR3 = cr3
		s.EFER = arch.EFERLME | arch.EFERLMA | arch.EFERNXE
		if err := v.cpu.SetSregs(s); err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
		err = v.cpu.SetRegs(arch.Regs{
			RIP: payloadBase, RFLAGS: arch.RFLAGSReserved | 3<<12, // IOPL 3 (PVM drops it; the TSS I/O bitmap covers that)
			RSP: stackAreaTop - uint64(v.id)*stackSize - 16,
			RDI: uint64(v.id), RSI: paramsAddr,
		})
		if err != nil {
			return fmt.Errorf("vCPU %d: %w", v.id, err)
		}
	}
	return nil
}

func roundUp(x, to uint64) uint64 { return (x + to - 1) / to * to }

// IsLinux reports whether the machine runs a Linux guest (booted or
// restored), whose virtio devices read and write guest memory from the VMM.
func (m *Machine) IsLinux() bool { return m.linux != nil }

// DataRegions lists the guest-physical 2 MiB regions of the payload's data
// area, in ascending order; for a Linux guest, every 2 MiB region wholly in
// guest RAM (the kernel decides what lives where).
func (m *Machine) DataRegions() []uint64 {
	var out []uint64
	if m.linux != nil {
		for _, r := range m.mem.Regions() {
			for gpa := roundUp(r.GPA, mmu.RegionSize); gpa+mmu.RegionSize <= r.GPA+r.Size; gpa += mmu.RegionSize {
				out = append(out, gpa/mmu.RegionSize)
			}
		}
		return out
	}
	for gpa := m.payload.dataBase; gpa+mmu.RegionSize <= m.payload.dataBase+m.payload.dataSize; gpa += mmu.RegionSize {
		out = append(out, gpa/mmu.RegionSize)
	}
	return out
}
