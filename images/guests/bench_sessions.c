// SPDX-License-Identifier: MIT
/*
 * Extraction benchmark guest: a 1-MiB state box (4096 slots of 256 bytes)
 * holding SESSIONS session records, every fourth slot, and a 64-MiB heap
 * of pseudo-random bytes standing for the rest of a busy guest's memory.
 * It then spins; the host extracts the sessions over the backdoor and,
 * as the baseline, dumps all guest RAM and scans it for records.
 *
 * Console commands make it a live guest: 'c' starts rewriting every
 * session over and over (each pass raises every version by one), 's'
 * stops and prints "bench-sessions: still <version>", the version every
 * session then holds.  The host extracts while it churns.
 */
#include "bench.h"

#define SLOT_SIZE	256
#define SLOTS		4096
#define SESSIONS	1024
#define HEAP_BYTES	(64UL << 20)
/* About a millisecond between looks at the console while idle. */
#define IDLE_CYCLES	(1UL << 21)

/* Header and slots, rounded up to whole pages for the hook. */
static unsigned char sbox[SLOTS * SLOT_SIZE + BD_PAGE_SIZE] __page_aligned;
static uint64_t heap[HEAP_BYTES / 8] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));
static char payload[48] = "session-0000: cart=00 items, stage checkout";

static bool write_sessions(uint64_t version)
{
	unsigned long i;

	for (i = 0; i < SESSIONS; i++) {
		payload[8] = '0' + i / 1000 % 10;
		payload[9] = '0' + i / 100 % 10;
		payload[10] = '0' + i / 10 % 10;
		payload[11] = '0' + i % 10;
		payload[19] = '0' + (i + version) % 7;
		if (bd_record_write(sbox, i * (SLOTS / SESSIONS), "shop", i + 1,
				    version, 3, payload, sizeof(payload)))
			return false;
	}
	return true;
}

/* Serves console commands forever; one exit (the LSR read) per look. */
static void __attribute__((noreturn)) serve(void)
{
	uint64_t version = 1;
	bool churn = false;

	for (;;) {
		if (churn)
			write_sessions(++version);
		else
			spin_cycles(IDLE_CYCLES);
		if (!console_has_input())
			continue;
		switch (inb(COM1_PORT)) {
		case 'c':
			churn = true;
			puts("bench-sessions: churning\n");
			break;
		case 's':
			churn = false;
			puts("bench-sessions: still ");
			print_dec(version);
			putc('\n');
			break;
		}
	}
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
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
	ok = ok && write_sessions(1);
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
	serve();
}
