# touch: vCPU 0 first writes every 4 KiB page of a working set of 2 MiB
# regions (phase mark 1 when done), then runs rounds of dependent reads: each
# read's address depends on the value the previous read returned. A read goes
# to a hot region with probability hot_permille/1000, otherwise to any region
# of the working set; the page inside the region is random, and so is the
# cache line among the first "lines" of the page. With lines=1 the data read
# fits in the caches and the cost of a read is dominated by address
# translation, which is what large pages change.
# Each round emits its round number as an output record. Other vCPUs park.
#
# args[0] regions      working set, in 2 MiB regions from the data base
# args[1] hot          number of hot regions (1..256)
# args[2] hot_permille share of reads that go to hot regions
# args[3] accesses     reads per round
# args[4] rounds       stop after this many rounds (0: run until stopped)
# args[5] seed         random seed (non-zero)
# args[6] hot_stride   hot region j is region (j*hot_stride) mod regions
# args[7] line_mask    reads use cache lines 0..line_mask of a page (lines-1)
	.include "abi.inc"
	VCPU0_ENTRY
	mov rbx, rsi                    # rbx = params
	mov r12, [rbx+P_DATABASE]       # r12 = data base
	mov r13, [rbx+P_ARGS+0]         # r13 = regions

	# Phase 0: touch every page so that reads hit real memory.
	mov rcx, r13
	shl rcx, 9                      # pages = regions * 512
	mov rax, r12
1:	mov [rax], rax
	add rax, 4096
	dec rcx
	jnz 1b
	mov eax, 1
	mov dx, PORT_MARK
	out dx, eax

	# Hot region base table on the stack: hot[j] = base + ((j*stride) mod regions) << 21.
	mov r14, [rbx+P_ARGS+8]         # r14 = hot
	mov rcx, r14
	shl rcx, 3
	sub rsp, rcx
	and rsp, -64
	mov rdi, rsp                    # rdi = table
	xor ecx, ecx
2:	cmp rcx, r14
	jae 3f
	mov rax, rcx
	imul rax, [rbx+P_ARGS+48]
	xor edx, edx
	div r13
	mov rax, rdx
	shl rax, 21
	add rax, r12
	mov [rdi+8*rcx], rax
	inc rcx
	jmp 2b
3:
	mov r15, [rbx+P_ARGS+16]        # r15 = hot_permille
	mov r11, [rbx+P_ARGS+40]        # r11 = rng state (lib.inc preserves r11)
	xor r9d, r9d                    # r9 = last read value (always 0)
	xor ebp, ebp                    # rbp = round

round:
	inc rbp
	mov rcx, [rbx+P_ARGS+24]        # rcx = reads left in this round
access:
	mov rax, r11                    # xorshift64
	shl rax, 13
	xor r11, rax
	mov rax, r11
	shr rax, 7
	xor r11, rax
	mov rax, r11
	shl rax, 17
	xor r11, rax
	mov rax, r11
	xor rax, r9                     # depend on the previous read
	movzx edx, ax
	imul edx, edx, 1000
	shr edx, 16                     # edx = 0..999
	mov rsi, rax
	shr rsi, 16
	mov esi, esi                    # rsi = 32 random bits
	cmp edx, r15d
	jb hotpick
	imul rsi, r13
	shr rsi, 32                     # region = rand * regions >> 32
	shl rsi, 21
	add rsi, r12
	jmp pick_page
hotpick:
	imul rsi, r14
	shr rsi, 32
	mov rsi, [rdi+8*rsi]
pick_page:
	mov rdx, rax
	shr rdx, 48
	and edx, 0x1ff                  # page in region
	shl edx, 12
	add rsi, rdx
	mov rdx, rax
	shr rdx, 40
	and rdx, [rbx+P_ARGS+56]        # cache line in page (line mask)
	shl edx, 6
	add rsi, rdx
	mov r9, [rsi]
	and r9, 0
	dec rcx
	jnz access

	mov rax, rbp
	call emit
	mov r10, [rbx+P_ARGS+32]
	test r10, r10
	jz round
	cmp rbp, r10
	jb round
	xor eax, eax
	jmp exit

	.include "lib.inc"
