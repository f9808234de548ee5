// SPDX-License-Identifier: MIT
/*
 * Nonintrusiveness: a million counter bumps must cost no exits.  The guest
 * prints how many device-register accesses it made in all, so a test can
 * check that the VMM's exit counters moved by exactly that (plus serial
 * output) and not at all while the guest bumps.
 */
#include "bd_test.h"

#define PAGE		BD_PAGE_SIZE
#define NCOUNTERS	4
#define BUMPS		1000000

static unsigned char box[2 * PAGE] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	static const char *const names[NCOUNTERS] = { "c0", "c1", "c2", "c3" };
	struct bd_counter *c[NCOUNTERS];
	unsigned long base = bd_base;
	bool ok = true;
	bd_u32 res;
	int i;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	bd_pbox_init(box, sizeof(box));
	for (i = 0; i < NCOUNTERS; i++) {
		c[i] = bd_counter_alloc(box, names[i], 1000,
					BD_LEVEL_APPLICATION, 0);
		ok = ok && c[i];
	}
	report(ok, "progress box with 4 counters");
	ok = ok && bd_dev_probe(base) == 0;
	report(ok, "device probe");
	if (!ok)
		return report_summary();
	bd_hook_desc_fill(&desc, bd_addr(box), sizeof(box),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "progress");
	res = bd_hook_register(base, &desc, NULL);
	expect_result(res, BD_OK, "register progress box");
	ok = res == BD_OK;
	res = bd_seal(base);
	expect_result(res, BD_OK, "seal");
	/* Fail fast rather than leave the test waiting for "done". */
	if (!ok || res != BD_OK)
		return report_summary();

	puts("bd-bump: start\n");
	for (i = 0; i < BUMPS; i++)
		bd_counter_bump(c[i % NCOUNTERS]);

	puts("bd-bump: done");
	for (i = 0; i < NCOUNTERS; i++) {
		putc(' ');
		print_dec(c[i]->value);
	}
	puts("\nbd-bump: mmio ");
	print_dec(bd_mmio_accesses);
	putc('\n');
	spin_forever();
}
