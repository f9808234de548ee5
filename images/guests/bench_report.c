// SPDX-License-Identifier: MIT
/*
 * Guest-side cost of one liveness report, three ways, timed with the TSC
 * in ring 3:
 *   bump      one store to a progress counter (the backdoor way)
 *   single    one bump at a time, each timed alone, while the host polls
 *             the counter's cache line over the backdoor: as the guest
 *             pays it, and with an mfence after it (until the store is
 *             visible, the line taken back from the monitor's core); and
 *             the timer's own cost, with and without the mfence
 *   pet       one write to the watchdog port (i6300esb-style; one exit)
 *   heartbeat one line "hb NNNNNN\n" to the serial console (an exit a byte)
 * Each phase starts with a marker line and a quiet gap, so the host can
 * snapshot bdvmm's exit counters between phases; the samples (TSC cycles
 * per report) are printed at the end.
 */
#include "bench.h"

#define WATCHDOG_PORT	0xf6
#define WATCHDOG_MS	60000		/* long enough never to fire here */
#define GAP		(1ULL << 29)	/* ~0.2 s of quiet around each phase */
#define BUMP_SAMPLES	1000
#define BUMPS_PER	10000
#define PET_SAMPLES	2000
#define HB_SAMPLES	500
#define SINGLE_SAMPLES	3000
/* ~10 µs between single bumps: the monitor's read of the line lands between. */
#define SINGLE_GAP	(1ULL << 15)

static unsigned char box[BD_PAGE_SIZE] __page_aligned;
static uint64_t bump[BUMP_SAMPLES], pet[PET_SAMPLES], hb[HB_SAMPLES];
static uint64_t single[SINGLE_SAMPLES], empty[SINGLE_SAMPLES];
static uint64_t fenced[SINGLE_SAMPLES], fence[SINGLE_SAMPLES];

static void heartbeat(unsigned int seq)
{
	char line[] = "hb 000000\n";
	int i;

	for (i = 8; i >= 3; i--, seq /= 10)
		line[i] = '0' + seq % 10;
	puts(line);
}

static void phase(const char *name)
{
	puts("bench-report: phase ");
	puts(name);
	putc('\n');
	spin_cycles(GAP);
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	struct bd_counter *c;
	uint64_t t;
	unsigned int i, j;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	c = bench_sealed_counter(bd_base, box, "liveness", 1000);
	if (!c)
		return report_summary();

	phase("bump");
	for (i = 0; i < BUMP_SAMPLES; i++) {
		t = rdtsc();
		for (j = 0; j < BUMPS_PER; j++)
			bd_counter_bump(c);
		bump[i] = rdtsc() - t;
	}
	spin_cycles(GAP);

	phase("single");
	for (i = 0; i < SINGLE_SAMPLES; i++) {
		t = rdtsc();
		bd_counter_bump(c);
		single[i] = rdtsc() - t;
		spin_cycles(SINGLE_GAP);
	}
	for (i = 0; i < SINGLE_SAMPLES; i++) {
		t = rdtsc();
		bd_counter_bump(c);
		asm volatile("mfence" : : : "memory");
		fenced[i] = rdtsc() - t;
		spin_cycles(SINGLE_GAP);
	}
	for (i = 0; i < SINGLE_SAMPLES; i++) {
		t = rdtsc();
		empty[i] = rdtsc() - t;
		spin_cycles(SINGLE_GAP);
	}
	for (i = 0; i < SINGLE_SAMPLES; i++) {
		t = rdtsc();
		asm volatile("mfence" : : : "memory");
		fence[i] = rdtsc() - t;
		spin_cycles(SINGLE_GAP);
	}
	spin_cycles(GAP);

	phase("pet");
	for (i = 0; i < PET_SAMPLES; i++) {
		t = rdtsc();
		outl(WATCHDOG_PORT, WATCHDOG_MS);
		pet[i] = rdtsc() - t;
	}
	spin_cycles(GAP);

	phase("heartbeat");
	for (i = 0; i < HB_SAMPLES; i++) {
		t = rdtsc();
		heartbeat(i);
		hb[i] = rdtsc() - t;
	}
	spin_cycles(GAP);

	phase("end");
	outl(WATCHDOG_PORT, 0);
	puts("bench-report: bumps-per-sample ");
	print_dec(BUMPS_PER);
	puts(" counter ");
	print_dec(c->value);
	putc('\n');
	print_samples("bench-report: samples bump", bump, BUMP_SAMPLES);
	print_samples("bench-report: samples pet", pet, PET_SAMPLES);
	print_samples("bench-report: samples heartbeat", hb, HB_SAMPLES);
	print_samples("bench-report: samples single", single, SINGLE_SAMPLES);
	print_samples("bench-report: samples empty", empty, SINGLE_SAMPLES);
	print_samples("bench-report: samples fenced", fenced, SINGLE_SAMPLES);
	print_samples("bench-report: samples fence", fence, SINGLE_SAMPLES);
	puts("bench-report: done\n");
	spin_forever();
}
