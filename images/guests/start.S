/*
 * Common entry point for bdvmm test guests.
 *
 * bdvmm starts every vCPU here in 64-bit mode with rdi = vCPU index,
 * rsi = vCPU count, rdx = RAM size, rcx = the backdoor device's MMIO base
 * (0 if none) and rsp = 0, so the first job is to give each vCPU a stack
 * of its own.  rdi/rsi/rdx/rcx are left untouched so they arrive as
 * main()'s four arguments.
 */

#define STACK_SHIFT	14		/* 16 KiB per vCPU */
#define MAX_CPUS	64

	.section .text.entry, "ax"
	.globl _start
	.type _start, @function
_start:
	/* Indexes past the table share the last stack rather than overflow. */
	mov	%rdi, %rax
	cmp	$(MAX_CPUS - 1), %rax
	jbe	1f
	mov	$(MAX_CPUS - 1), %eax
1:
	inc	%rax
	shl	$STACK_SHIFT, %rax
	lea	stacks(%rip), %rsp
	add	%rax, %rsp		/* top of this vCPU's stack, 16-byte aligned */
	xor	%ebp, %ebp		/* terminate frame-pointer chains */
	call	main

	/* main's return value is the VM's exit status: 0 = success. */
	outl	%eax, $0xf4
2:
	/* Ring 3 cannot hlt; in case the VMM ignores the write, just spin. */
	pause
	jmp	2b
	.size _start, . - _start

	.bss
	.balign 4096
	.type stacks, @object
stacks:
	.skip MAX_CPUS << STACK_SHIFT
	.size stacks, . - stacks

	.section .note.GNU-stack, "", @progbits
