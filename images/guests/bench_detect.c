// SPDX-License-Identifier: MIT
/*
 * Detection benchmark guest: one application-level progress counter,
 * bumped about every millisecond, and console commands from the host:
 *   h        stop bumping (a hang: the guest spins on, the counter still)
 *   r        bump again
 *   dNNN\n   set the counter's deadline to NNN ms
 * The console is looked at once per bump (one exit), so the last bump
 * before a hang is within about a millisecond of the host's 'h'.
 */
#include "bench.h"

/* About a millisecond at the TSC rates of the machines we run on. */
#define BUMP_CYCLES	(1UL << 21)

static unsigned char box[BD_PAGE_SIZE] __page_aligned;

static uint32_t read_number(void)
{
	uint32_t n = 0;
	char c;

	while ((c = console_getc()) >= '0' && c <= '9')
		n = n * 10 + (uint32_t)(c - '0');
	return n;
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	struct bd_counter *c;
	bool bumping = true;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	c = bench_sealed_counter(bd_base, box, "service", 100);
	if (!c)
		return report_summary();
	puts("bench-detect: ready\n");
	for (;;) {
		if (bumping)
			bd_counter_bump(c);
		spin_cycles(BUMP_CYCLES);
		if (!console_has_input())
			continue;
		switch (inb(COM1_PORT)) {
		case 'h':
			bumping = false;
			break;
		case 'r':
			bumping = true;
			break;
		case 'd':
			BD_STORE_ONCE(c->deadline_ms, read_number());
			break;
		}
	}
}
