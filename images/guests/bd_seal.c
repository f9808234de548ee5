// SPDX-License-Identifier: MIT
/*
 * Register three hooks, seal, then try six ways of changing the table:
 * every one must be refused with E_SEALED and counted as tampering.  The
 * guest then stays up so a test can compare the VMM's view of the table
 * (over its control socket) with what the guest registered.
 */
#include "bd_test.h"

#define PAGE	BD_PAGE_SIZE

static unsigned char progress[2 * PAGE] __page_aligned;
static unsigned char state[4 * PAGE] __page_aligned;
static unsigned char repair[PAGE] __page_aligned;
static unsigned char other[2 * PAGE] __page_aligned;
static unsigned char late[PAGE] __page_aligned;

static struct bd_hook_desc desc __attribute__((aligned(64)));

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	bd_u32 progress_id = 0, state_id = 0, repair_id = 0;
	unsigned long base = bd_base;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	report(bd_dev_probe(base) == 0, "device probe");
	puts("bd-seal: generation ");
	print_dec(bd_reg_read(base, BD_REG_GENERATION));
	putc('\n');

	bd_pbox_init(progress, sizeof(progress));
	bd_sbox_init(state, sizeof(state), 256);

	bd_hook_desc_fill(&desc, bd_addr(progress), sizeof(progress),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "progress");
	expect_result(bd_hook_register(base, &desc, &progress_id), BD_OK,
		      "register progress");
	bd_hook_desc_fill(&desc, bd_addr(state), sizeof(state),
			  BD_KIND_STATE_BOX, BD_PERM_READ, "state");
	expect_result(bd_hook_register(base, &desc, &state_id), BD_OK,
		      "register state");
	bd_hook_desc_fill(&desc, bd_addr(repair), sizeof(repair),
			  BD_KIND_REPAIR, BD_PERM_ALL, "repair");
	expect_result(bd_hook_register(base, &desc, &repair_id), BD_OK,
		      "register repair");

	expect_result(bd_seal(base), BD_OK, "seal");
	report(bd_reg_read(base, BD_REG_STATUS) & BD_STATUS_SEALED,
	       "STATUS sealed");

	/* Exactly six attempts: the test checks TAMPER_COUNT against them. */
	bd_hook_desc_fill(&desc, bd_addr(late), sizeof(late),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "late");
	expect_result(bd_hook_register(base, &desc, NULL), BD_E_SEALED,
		      "tamper: register late: E_SEALED");

	expect_result(bd_hook_unregister(base, progress_id), BD_E_SEALED,
		      "tamper: unregister progress: E_SEALED");

	bd_hook_desc_fill(&desc, bd_addr(state), PAGE,
			  BD_KIND_STATE_BOX, BD_PERM_READ, "state");
	desc.id = state_id;
	expect_result(bd_hook_update(base, &desc), BD_E_SEALED,
		      "tamper: shrink state: E_SEALED");

	bd_hook_desc_fill(&desc, bd_addr(other), sizeof(other),
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ, "progress");
	desc.id = progress_id;
	expect_result(bd_hook_update(base, &desc), BD_E_SEALED,
		      "tamper: remap progress: E_SEALED");

	bd_hook_desc_fill(&desc, bd_addr(repair), sizeof(repair),
			  BD_KIND_REPAIR, BD_PERM_READ, "repair");
	desc.id = repair_id;
	expect_result(bd_hook_update(base, &desc), BD_E_SEALED,
		      "tamper: repair read-only: E_SEALED");

	expect_result(bd_seal(base), BD_E_SEALED,
		      "tamper: seal again: E_SEALED");

	expect_reg(base, BD_REG_TAMPER_COUNT, 6, "TAMPER_COUNT is 6");
	expect_reg(base, BD_REG_HOOK_COUNT, 3, "HOOK_COUNT is 3");

	report_summary();
	puts("bd-seal: done\n");
	spin_forever();
}
