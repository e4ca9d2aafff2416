package arch

import "encoding/binary"

// Local APIC register offsets in LAPICState.Regs (the APIC page layout).
const (
	LAPICRegID    = 0x20
	LAPICRegLINT0 = 0x350
	LAPICRegLINT1 = 0x360
)

// LAPIC local vector table delivery modes (bits 8-10 of an LVT entry).
const (
	LVTDeliveryFixed  = 0
	LVTDeliveryNMI    = 4
	LVTDeliveryExtINT = 7
	lvtDeliveryShift  = 8
	lvtDeliveryMask   = 7 << lvtDeliveryShift
)

// Reg returns the 32-bit local APIC register at offset off.
func (l *LAPICState) Reg(off int) uint32 { return binary.LittleEndian.Uint32(l.Regs[off:]) }

// SetReg sets the 32-bit local APIC register at offset off.
func (l *LAPICState) SetReg(off int, v uint32) { binary.LittleEndian.PutUint32(l.Regs[off:], v) }

// SetDeliveryMode sets the delivery mode of the LVT entry at offset off,
// keeping its other bits.
func (l *LAPICState) SetDeliveryMode(off int, mode uint32) {
	l.SetReg(off, l.Reg(off)&^lvtDeliveryMask|mode<<lvtDeliveryShift)
}

// DeliveryMode returns the delivery mode of the LVT entry at offset off.
func (l *LAPICState) DeliveryMode(off int) uint32 {
	return (l.Reg(off) & lvtDeliveryMask) >> lvtDeliveryShift
}
