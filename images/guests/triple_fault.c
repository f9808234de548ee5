// SPDX-License-Identifier: MIT
/* With no IDT any exception escalates to a triple fault, in either ring. */
#include "lib.h"

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;

	if (cpu != 0)
		spin_forever();

	puts("triple-fault: about to fault\n");
	asm volatile("ud2");
	/* Not reached; a non-zero status flags a VMM that let us continue. */
	return 1;
}
