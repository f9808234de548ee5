// SPDX-License-Identifier: MIT
/*
 * Deterministic exit workload: a test compares the VMM's exit counters
 * against these exact numbers, then checks they stop moving while the
 * guest computes natively.
 */
#include "lib.h"

#define POST_OUTS	1000
#define POST_INS	300
#define MMIO_READS	200
#define MMIO_WRITES	100

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	/* From a C pointer: as a disp32 in asm, 0xd0000000 would sign-extend. */
	volatile uint32_t *mmio = (volatile uint32_t *)MMIO_HOLE;
	uint64_t x = 1;
	int i;

	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;

	if (cpu != 0)
		spin_forever();

	puts("exits: start\n");
	for (i = 0; i < POST_OUTS; i++)
		outb(POST_PORT, i);
	for (i = 0; i < POST_INS; i++)
		inb(POST_PORT);
	for (i = 0; i < MMIO_READS; i++)
		(void)*mmio;
	for (i = 0; i < MMIO_WRITES; i++)
		*mmio = i;
	puts("exits: done\n");

	/* Pure computation: no port I/O, no MMIO, no hlt, so no exits. */
	for (;;) {
		x = x * 6364136223846793005UL + 1442695040888963407UL;
		asm volatile("" : "+r"(x));
	}
}
