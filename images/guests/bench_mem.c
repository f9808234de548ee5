// SPDX-License-Identifier: MIT
/*
 * Memory-bound workload for the monitoring-overhead benchmark: a strided
 * read-modify-write walk over 128 MiB (four times this machine's 32-MiB
 * LLC), with a stride of a page plus a line so neither caches nor the
 * prefetcher help; reported as work units per TSC interval.
 */
#include "bench.h"

#define INTERVAL	(1ULL << 28)	/* ~0.1 s */
#define BUF_BYTES	(128UL << 20)
#define STRIDE		(4096 + 64)
#define STEPS		1024

static uint64_t buf[BUF_BYTES / 8] __page_aligned;
static uint64_t pos;

static void chunk(void)
{
	uint64_t p = pos;
	int i;

	for (i = 0; i < STEPS; i++) {
		buf[p / 8]++;
		p += STRIDE;
		if (p >= BUF_BYTES)
			p -= BUF_BYTES;
	}
	pos = p;
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	(void)ncpus;
	(void)ram;
	return bench_work_loop(cpu, bd_base, "mem", chunk, INTERVAL);
}
