/*
 * Start-up benchmark guest.  Its very first instruction writes the boot
 * timer port, so bdvmm logs the moment the guest began to run; then it
 * prints one line and idles until the benchmark stops the VM.
 * It is self-contained (no start.S): nothing may run before the OUT.
 */

#define COM1_PORT	0x3f8
#define BOOT_TIMER_PORT	0xf5

	.section .text.entry, "ax"
	.globl _start
	.type _start, @function
_start:
	outb	%al, $BOOT_TIMER_PORT
	/* Only vCPU 0 (rdi = 0) prints; the others idle straight away. */
	test	%rdi, %rdi
	jnz	2f
	cld			/* lodsb walks forward */
	lea	msg(%rip), %rsi
	mov	$COM1_PORT, %dx
1:
	lodsb
	test	%al, %al
	jz	2f
	outb	%al, %dx
	jmp	1b
2:
	/* Ring 3 cannot hlt; spin until the VMM stops us. */
	pause
	jmp	2b
	.size _start, . - _start

	.section .rodata
msg:
	.asciz "first-insn: booted\n"

	.section .note.GNU-stack, "", @progbits
