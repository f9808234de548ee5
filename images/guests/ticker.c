// SPDX-License-Identifier: MIT
/* Steady serial output, for tests that pause, resume and stop a guest. */
#include "lib.h"

/*
 * One iteration is about one cycle natively (ring 3), so 3*10^7 is about
 * 10 ms at 3 GHz.  Ring 0 is emulated at 1-2 us per instruction, so there
 * far fewer iterations give a similar period.
 */
#define RING3_LOOPS	30000000UL
#define RING0_LOOPS	5000UL

static void delay(unsigned long loops)
{
	unsigned long i;

	/* The empty asm keeps the compiler from deleting the loop. */
	for (i = 0; i < loops; i++)
		asm volatile("" : "+r"(i));
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	unsigned long loops = cpu_ring() == 0 ? RING0_LOOPS : RING3_LOOPS;
	unsigned long tick;

	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;

	if (cpu != 0)
		spin_forever();

	for (tick = 0;; tick++) {
		puts("tick ");
		print_dec(tick);
		putc('\n');
		delay(loops);
	}
}
