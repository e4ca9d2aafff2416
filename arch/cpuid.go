package arch

// CPUID leaves and bits that Understudy adjusts.
const (
	cpuidLeafFeatures  = 0x1
	cpuidLeafTopology  = 0xb
	cpuidLeafTopology2 = 0x1f
	// KVMCPUIDSignature is the hypervisor leaf that announces KVM.
	KVMCPUIDSignature = 0x40000000
	// KVMCPUIDFeatures is KVM's paravirtual feature leaf.
	KVMCPUIDFeatures = 0x40000001
	// CPUIDHypervisorBit is CPUID.1:ECX[31].
	CPUIDHypervisorBit = 1 << 31
)

// CPUIDForVCPU returns a copy of the supported CPUID entries adjusted for
// vCPU id of ncpus: the initial APIC id in leaf 1 and the x2APIC id in the
// topology leaves, and the hypervisor bit.
func CPUIDForVCPU(supported []CPUIDEntry, id, ncpus int) []CPUIDEntry {
	out := append([]CPUIDEntry(nil), supported...)
	for i := range out {
		e := &out[i]
		switch e.Function {
		case cpuidLeafFeatures:
			e.EBX = e.EBX&0x0000ffff | uint32(ncpus&0xff)<<16 | uint32(id&0xff)<<24
			e.ECX |= CPUIDHypervisorBit
		case cpuidLeafTopology, cpuidLeafTopology2:
			e.EDX = uint32(id)
		}
	}
	return out
}
