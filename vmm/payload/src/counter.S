# counter: vCPU 0 runs iterations; each one writes its sequence number into
# every hot page, every cold_every-th iteration also into the next cold page
# (round robin), then emits the sequence number as an output record.
# Other vCPUs park.
#
# args[0] pages      counter pages (4 KiB each) from the data base
# args[1] hot        pages 0..hot-1 are hot, the rest are cold
# args[2] cold_every write one cold page every this many iterations (0: never)
# args[3] iterations stop after this many (0: run until stopped)
# args[4] spin       busy-loop count per iteration (slows the guest down)
# args[5] report     print progress every this many iterations (0: never)
#
# Each written page holds, at offset 0, 8 and 16: seq, page index, ~seq.
	.include "abi.inc"
	VCPU0_ENTRY
	mov rbx, rsi                    # rbx = params
	mov r12, [rbx+P_DATABASE]       # r12 = data base
	mov r13, [rbx+P_ARGS+0]         # r13 = pages
	mov r14, [rbx+P_ARGS+8]         # r14 = hot
	xor ebp, ebp                    # rbp = seq
	xor r15d, r15d                  # r15 = iterations since last cold write
	xor r11d, r11d                  # r11 = next cold index
	mov eax, 1
	mov dx, PORT_MARK
	out dx, eax

iter:
	inc rbp
	xor ecx, ecx
hot:
	cmp rcx, r14
	jae cold
	mov r9, rcx
	call write_page
	inc rcx
	jmp hot

cold:
	mov r10, [rbx+P_ARGS+16]
	test r10, r10
	jz spin
	mov r9, r13
	sub r9, r14                     # r9 = number of cold pages
	jz spin
	inc r15
	cmp r15, r10
	jb spin
	xor r15d, r15d
	cmp r11, r9
	jb 1f
	xor r11d, r11d
1:	mov r9, r11
	add r9, r14
	call write_page
	inc r11

spin:
	mov rcx, [rbx+P_ARGS+32]
	test rcx, rcx
	jz record
1:	dec rcx
	jnz 1b

record:
	mov rax, rbp
	call emit

	mov r10, [rbx+P_ARGS+40]        # progress report
	test r10, r10
	jz done_check
	mov rax, rbp
	xor edx, edx
	div r10
	test rdx, rdx
	jnz done_check
	lea rsi, [rip+msg_progress]
	call print
	mov rax, rbp
	call print_u64
	lea rsi, [rip+msg_nl]
	call print

done_check:
	mov r10, [rbx+P_ARGS+24]
	test r10, r10
	jz iter
	cmp rbp, r10
	jb iter

	lea rsi, [rip+msg_done]
	call print
	mov rax, rbp
	call print_u64
	lea rsi, [rip+msg_nl]
	call print
	xor eax, eax
	jmp exit

# write_page: write the counter record for page r9 (clobbers rax, rdx).
write_page:
	mov rax, r9
	shl rax, 12
	add rax, r12
	mov [rax], rbp
	mov [rax+8], r9
	mov rdx, rbp
	not rdx
	mov [rax+16], rdx
	ret

	.include "lib.inc"

msg_progress:
	.asciz "counter: iteration "
msg_done:
	.asciz "counter: done after "
msg_nl:
	.asciz "\n"
