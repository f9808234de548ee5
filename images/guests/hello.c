// SPDX-License-Identifier: MIT
/* Smallest useful guest: proves entry registers and serial output. */
#include "lib.h"

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	(void)bd_base;

	if (cpu != 0)
		spin_forever();

	puts("hello: ring ");
	print_dec(cpu_ring());
	puts(", vcpu ");
	print_dec(cpu);
	puts(" of ");
	print_dec(ncpus);
	puts(", ram ");
	print_dec(ram_bytes >> 20);
	puts(" MiB\n");
	return 0;
}
