/*
 * Start-up benchmark guest.  Its very first instruction writes the boot
 * timer port, so bdvmm logs the moment the guest began to run; then it
 * prints one line and polls COM1 until a byte arrives on the console,
 * when it writes the debug-exit port (the benchmark times key → reaped).
 * It is self-contained (no start.S): nothing may run before the OUT.
 */

#define COM1_PORT	0x3f8
#define COM1_LSR	0x3fd
#define DEBUG_EXIT_PORT	0xf4
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
	jz	3f
	outb	%al, %dx
	jmp	1b
	/* Ring 3 cannot hlt: poll the line status for received data. */
3:
	pause
	mov	$COM1_LSR, %dx
	inb	%dx, %al
	test	$1, %al
	jz	3b
	xor	%eax, %eax
	outb	%al, $DEBUG_EXIT_PORT
2:
	pause
	jmp	2b
	.size _start, . - _start

	.section .rodata
msg:
	.asciz "first-insn: booted\n"

	.section .note.GNU-stack, "", @progbits
