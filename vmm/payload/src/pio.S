# pio: vCPU 0 emits args[0] output records numbered 1..args[0], one VM exit
# each, then exits 0. Used to measure the exit round trip. Other vCPUs park.
	.include "abi.inc"
	VCPU0_ENTRY
	mov rcx, [rsi+P_ARGS+0]
	mov dx, PORT_REC_LO
	xor eax, eax
	test rcx, rcx
	jz 2f
1:	inc eax
	out dx, eax
	dec rcx
	jnz 1b
2:	xor eax, eax
	jmp exit

	.include "lib.inc"
