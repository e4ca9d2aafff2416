# hello: vCPU 0 prints a greeting and exits with code 0; other vCPUs park.
	.include "abi.inc"
	VCPU0_ENTRY
	mov rbx, rsi
	lea rsi, [rip+greeting]
	call print
	mov rax, [rbx+P_NCPUS]
	call print_u64
	lea rsi, [rip+tail]
	call print
	xor eax, eax
	jmp exit

	.include "lib.inc"

greeting:
	.asciz "Hello from the Understudy payload guest! vCPUs: "
tail:
	.asciz "\n"
