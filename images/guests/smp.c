// SPDX-License-Identifier: MIT
/* Every vCPU must run and see the same memory as vCPU 0. */
#include "lib.h"

/* About 2^32 pauses: minutes in ring 3, far beyond any sane start-up. */
#define WAIT_LIMIT	(1UL << 32)

static unsigned long reported;

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	unsigned long spins;

	(void)ram_bytes;
	(void)bd_base;

	print_lock();
	puts("smp: vcpu ");
	print_dec(cpu);
	puts(" reporting\n");
	print_unlock();
	__atomic_fetch_add(&reported, 1, __ATOMIC_SEQ_CST);

	if (cpu != 0)
		spin_forever();

	for (spins = 0; __atomic_load_n(&reported, __ATOMIC_ACQUIRE) != ncpus;
	     spins++) {
		if (spins >= WAIT_LIMIT) {
			print_lock();
			puts("smp: timed out, ");
			print_dec(__atomic_load_n(&reported, __ATOMIC_ACQUIRE));
			puts(" of ");
			print_dec(ncpus);
			puts(" vcpus reported\n");
			print_unlock();
			return 1;
		}
		cpu_relax();
	}

	print_lock();
	puts("smp: all ");
	print_dec(ncpus);
	puts(" vcpus reported\n");
	print_unlock();
	return 0;
}
