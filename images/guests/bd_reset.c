// SPDX-License-Identifier: MIT
/*
 * A guest reset must give a new GENERATION and an empty, unsealed table.
 * Boot 1 seals a table and resets through the i8042; boot 2 checks the
 * device.  The VMM reloads the ELF (zeroing .bss) on reset but keeps RAM,
 * so the only state carried across is a marker outside the image.
 */
#include "bd_test.h"

#define PAGE		BD_PAGE_SIZE
#define MARKER_ADDR	0x00f00000UL
#define MARKER_MAGIC	0x4244524553455431ULL	/* "BDRESET1" */

static unsigned char box[PAGE] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));

/* Boot 1's checks print only on failure: boot 2 owns the summary. */
static int boot1(unsigned long base, volatile bd_u64 *marker)
{
	bd_u32 gen;
	bool ok = true;

	bd_pbox_init(box, sizeof(box));
	bd_hook_desc_fill(&desc, bd_addr(box), sizeof(box),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "boot1");
	if (bd_hook_register(base, &desc, NULL) != BD_OK) {
		report(false, "boot 1: register boot1");
		ok = false;
	}
	if (bd_seal(base) != BD_OK ||
	    !(bd_reg_read(base, BD_REG_STATUS) & BD_STATUS_SEALED)) {
		report(false, "boot 1: seal");
		ok = false;
	}
	gen = bd_reg_read(base, BD_REG_GENERATION);
	if (!gen) {
		report(false, "boot 1: generation is not 0");
		ok = false;
	}
	if (!ok)
		return report_summary();

	/* The generation first: boot 2 trusts it once it sees the magic. */
	marker[1] = gen;
	marker[0] = MARKER_MAGIC;

	puts("bd-reset: boot 1 generation ");
	print_dec(gen);
	puts(" sealed\n");
	outb(I8042_CMD_PORT, I8042_RESET);
	spin_forever();
}

static int boot2(unsigned long base, volatile bd_u64 *marker)
{
	bd_u32 g1 = marker[1];
	bd_u32 g2 = bd_reg_read(base, BD_REG_GENERATION);

	report(g2 != g1, "generation changed");
	report(!(bd_reg_read(base, BD_REG_STATUS) & BD_STATUS_SEALED),
	       "not sealed after reset");
	expect_reg(base, BD_REG_HOOK_COUNT, 0, "HOOK_COUNT 0 after reset");

	bd_pbox_init(box, sizeof(box));
	bd_hook_desc_fill(&desc, bd_addr(box), sizeof(box),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "boot2");
	expect_result(bd_hook_register(base, &desc, NULL), BD_OK,
		      "register boot2 after reset");

	puts("bd-reset: boot 2 generation ");
	print_dec(g2);
	puts(" (was ");
	print_dec(g1);
	puts(")\n");

	marker[0] = 0;
	marker[1] = 0;
	return report_summary();
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	volatile bd_u64 *marker = (volatile bd_u64 *)MARKER_ADDR;

	(void)ncpus;
	if (cpu != 0)
		spin_forever();

	/* Silent when fine: the summary of boot 2 counts only its checks. */
	if (ram < MARKER_ADDR + PAGE) {
		report(false, "RAM holds the marker");
		return report_summary();
	}
	if (bd_dev_probe(bd_base) != 0) {
		report(false, "device probe");
		return report_summary();
	}

	if (marker[0] != MARKER_MAGIC)
		return boot1(bd_base, marker);
	return boot2(bd_base, marker);
}
