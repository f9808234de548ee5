// SPDX-License-Identifier: MIT
/* The i8042 reset command must reach the VMM as a reset request. */
#include "lib.h"

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;

	if (cpu == 0) {
		puts("reset: requesting i8042 reset\n");
		outb(I8042_CMD_PORT, I8042_RESET);
	}
	spin_forever();
}
