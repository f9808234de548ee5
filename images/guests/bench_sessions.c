// SPDX-License-Identifier: MIT
/*
 * Extraction benchmark guest: a 1-MiB state box (4096 slots of 256 bytes)
 * holding SESSIONS session records, every fourth slot, and a 64-MiB heap
 * of pseudo-random bytes standing for the rest of a busy guest's memory.
 * It then spins; the host extracts the sessions over the backdoor and,
 * as the baseline, dumps all guest RAM and scans it for records.
 */
#include "bench.h"

#define SLOT_SIZE	256
#define SLOTS		4096
#define SESSIONS	1024
#define HEAP_BYTES	(64UL << 20)

/* Header and slots, rounded up to whole pages for the hook. */
static unsigned char sbox[SLOTS * SLOT_SIZE + BD_PAGE_SIZE] __page_aligned;
static uint64_t heap[HEAP_BYTES / 8] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	char payload[48] = "session-0000: cart=00 items, stage checkout";
	uint64_t x = 0x9e3779b97f4a7c15ULL;
	unsigned long i;
	bool ok;

	(void)ncpus;
	(void)ram;
	if (cpu != 0)
		spin_forever();

	for (i = 0; i < HEAP_BYTES / 8; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		heap[i] = x;
	}
	/*
	 * Nothing in the guest reads the heap, so without this the compiler
	 * drops every store above: the host's dump is its only reader.
	 */
	asm volatile("" : : "r"(heap) : "memory");
	ok = bd_sbox_init(sbox, 64 + SLOTS * SLOT_SIZE, SLOT_SIZE) == SLOTS;
	for (i = 0; ok && i < SESSIONS; i++) {
		payload[8] = '0' + i / 1000 % 10;
		payload[9] = '0' + i / 100 % 10;
		payload[10] = '0' + i / 10 % 10;
		payload[11] = '0' + i % 10;
		payload[19] = '0' + i % 7;
		ok = bd_record_write(sbox, i * (SLOTS / SESSIONS), "shop", i + 1,
				     1, 3, payload, sizeof(payload)) == 0;
	}
	ok = ok && bd_dev_probe(bd_base) == 0;
	bd_hook_desc_fill(&desc, bd_addr(sbox), sizeof(sbox),
			  BD_KIND_STATE_BOX, BD_PERM_READ, "state");
	ok = ok && bd_hook_register(bd_base, &desc, NULL) == BD_OK;
	ok = ok && bd_seal(bd_base) == BD_OK;
	report(ok, "state box with sessions registered and sealed");
	if (!ok)
		return report_summary();
	puts("bench-sessions: ready ");
	print_dec(SESSIONS);
	putc('\n');
	spin_forever();
}
