// SPDX-License-Identifier: MIT
/*
 * A guest with a backdoor worth reading: a progress box with known
 * counters (one kept live), a state box with three session records, and a
 * repair region whose first word is a command a repair monitor may write:
 *   0 keep running, 1 hang spinning with interrupts off, 2 halt with
 *   interrupts off (both only in ring 0, where cli/hlt are allowed).
 * The agent tests read all of it while the guest runs, hangs or halts.
 */
#include "bd_test.h"

#define PAGE		BD_PAGE_SIZE
#define FIXED_VALUE	12345
#define SLOT_SIZE	256

static unsigned char pbox[2 * PAGE] __page_aligned;
static unsigned char sbox[4 * PAGE] __page_aligned;
static volatile bd_u64 repair[PAGE / 8] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));

static bool hook(unsigned long base, void *p, bd_u64 len, bd_u32 kind,
		 bd_u32 perms, const char *name)
{
	bd_hook_desc_fill(&desc, bd_addr(p), len, kind, perms, name);
	return bd_hook_register(base, &desc, NULL) == BD_OK;
}

static void hang(bd_u64 how)
{
	/* The ways a kernel dies: interrupts off and spinning, or halted. */
	asm volatile("cli");
	for (;;) {
		if (how == 2)
			asm volatile("hlt");
		else
			asm volatile("pause");
	}
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	static const char payload[3][24] = {
		"session-1: cart=3 items", "session-2: cart=0 items",
		"session-3: checkout    " };
	struct bd_counter *live, *fixed, *idle;
	bd_u64 cmd;
	bool ok;
	int i;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	bd_pbox_init(pbox, sizeof(pbox));
	live = bd_counter_alloc(pbox, "live", 100, BD_LEVEL_APPLICATION, 1);
	fixed = bd_counter_alloc(pbox, "fixed", 1000, BD_LEVEL_OS, 2);
	idle = bd_counter_alloc(pbox, "idle", 50, BD_LEVEL_SESSION, 3);
	ok = live && fixed && idle;
	for (i = 0; ok && i < FIXED_VALUE; i++)
		bd_counter_bump(fixed);
	if (ok)
		bd_counter_idle(idle);
	ok = ok && bd_sbox_init(sbox, sizeof(sbox), SLOT_SIZE) > 0;
	for (i = 0; ok && i < 3; i++)
		ok = bd_record_write(sbox, i, "kv", i + 1, 1, 2, payload[i],
				     sizeof(payload[i])) == 0;
	for (i = 1; i < PAGE / 8; i++)
		repair[i] = 0x5245504149520000ULL + i;	/* "REPAIR" + index */
	repair[0] = 0;
	ok = ok && bd_dev_probe(bd_base) == 0;
	ok = ok && hook(bd_base, pbox, sizeof(pbox), BD_KIND_PROGRESS_BOX,
			BD_PERM_READ, "progress");
	ok = ok && hook(bd_base, sbox, sizeof(sbox), BD_KIND_STATE_BOX,
			BD_PERM_READ, "state");
	ok = ok && hook(bd_base, (void *)repair, PAGE, BD_KIND_REPAIR,
			BD_PERM_ALL, "repair");
	ok = ok && bd_seal(bd_base) == BD_OK;
	report(ok, "backdoor set up and sealed");
	if (!ok)
		return report_summary();
	puts("bd-serve: ready\n");

	for (;;) {
		bd_counter_bump(live);
		cmd = repair[0];
		if (cmd == 1 || cmd == 2) {
			puts(cmd == 1 ? "bd-serve: hanging with interrupts off\n"
				      : "bd-serve: halting with interrupts off\n");
			hang(cmd);
		}
	}
}
