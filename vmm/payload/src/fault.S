# fault: vCPU 0 writes to the first guest-physical address past RAM, which the
# identity map does not cover, so the guest takes a page fault and (having no
# IDT) a triple fault. Used to test how the VMM reports a faulting guest.
	.include "abi.inc"
	VCPU0_ENTRY
	mov rax, [rsi+P_MEMSIZE]
	mov qword ptr [rax], 1
	xor eax, eax
	jmp exit

	.include "lib.inc"
