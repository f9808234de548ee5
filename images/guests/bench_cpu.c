// SPDX-License-Identifier: MIT
/*
 * CPU-bound workload for the monitoring-overhead benchmark: integer
 * hashing in registers (no memory traffic), reported as work units per
 * TSC interval (see bench_work_loop in bench.h).
 */
#include "bench.h"

#define INTERVAL	(1ULL << 28)	/* ~0.1 s */
#define ROUNDS		4096

static volatile uint64_t sink;

static void chunk(void)
{
	uint64_t x = sink;
	int i;

	for (i = 0; i < ROUNDS; i++) {
		x ^= x >> 33;
		x *= 0xff51afd7ed558ccdULL;
		x ^= x >> 29;
		x += i;
	}
	sink = x;
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	(void)ncpus;
	(void)ram;
	return bench_work_loop(cpu, bd_base, "cpu", chunk, INTERVAL);
}
