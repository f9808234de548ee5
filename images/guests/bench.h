/* SPDX-License-Identifier: MIT */
/*
 * Helpers for the benchmark guests (bench_*.c): TSC reads and busy waits
 * that cost no exits in ring 3, and printing a list of samples.
 */
#ifndef BDVMM_BENCH_H
#define BDVMM_BENCH_H

#include "bd_test.h"

/* lfence keeps earlier instructions from drifting past the read. */
static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	asm volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((uint64_t)hi << 32) | lo;
}

/* Spins for @cycles TSC cycles: native in ring 3, no exits. */
static inline void spin_cycles(uint64_t cycles)
{
	uint64_t end = rdtsc() + cycles;

	while (rdtsc() < end)
		cpu_relax();
}

/* "<prefix> v0 v1 ...\n" */
static inline void print_samples(const char *prefix, const uint64_t *v,
				 unsigned int n)
{
	unsigned int i;

	puts(prefix);
	for (i = 0; i < n; i++) {
		putc(' ');
		print_dec(v[i]);
	}
	putc('\n');
}

/*
 * Registers @box (one page) as the guest's progress box, holding one
 * application-level counter @name with @deadline_ms, and seals the
 * backdoor; reports the outcome.  The counter, or NULL on failure.
 */
static inline struct bd_counter *bench_sealed_counter(unsigned long bd_base,
						      void *box,
						      const char *name,
						      uint32_t deadline_ms)
{
	static struct bd_hook_desc desc __attribute__((aligned(64)));
	struct bd_counter *c;
	bool ok;

	bd_pbox_init(box, BD_PAGE_SIZE);
	c = bd_counter_alloc(box, name, deadline_ms, BD_LEVEL_APPLICATION, 0);
	ok = c && bd_dev_probe(bd_base) == 0;
	bd_hook_desc_fill(&desc, bd_addr(box), BD_PAGE_SIZE,
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "progress");
	ok = ok && bd_hook_register(bd_base, &desc, NULL) == BD_OK;
	ok = ok && bd_seal(bd_base) == BD_OK;
	report(ok, "progress box registered and sealed");
	return ok ? c : NULL;
}

/*
 * The workload guests' main loop (vCPU 0; the others idle): register a progress box with one
 * counter and seal it, then forever run @chunk (bumping the counter after
 * each, as a real service would) and, every @interval TSC cycles, print
 * "bench-work: units U cycles C" (work done in that interval).
 */
static inline int bench_work_loop(unsigned long cpu, unsigned long bd_base,
				  const char *name, void (*chunk)(void),
				  uint64_t interval)
{
	static unsigned char box[BD_PAGE_SIZE] __page_aligned;
	struct bd_counter *c;
	uint64_t t0, now, units;

	if (cpu != 0)
		spin_forever();
	c = bench_sealed_counter(bd_base, box, name, 1000);
	if (!c)
		return report_summary();
	puts("bench-work: ready\n");
	for (;;) {
		units = 0;
		t0 = rdtsc();
		do {
			chunk();
			bd_counter_bump(c);
			units++;
			now = rdtsc();
		} while (now - t0 < interval);
		/* Printing is outside the timed window. */
		puts("bench-work: units ");
		print_dec(units);
		puts(" cycles ");
		print_dec(now - t0);
		putc('\n');
	}
}

#endif /* BDVMM_BENCH_H */
