// SPDX-License-Identifier: MIT
/*
 * "shop": a small session-oriented service, the star of the demo. Each
 * session advances in stages; its continuation (stage, running total) is
 * written to the state box after every step, alternating between two
 * slots so the previous version stays complete if the guest dies
 * mid-write. Progress counters: "kernel" (OS level, every loop), "shop"
 * (application, every step) and one per session.
 *
 * Started with one vCPU it serves sessions 1-3 (4 is idle: no client).
 * Started with two or more vCPUs it is a fresh instance that waits for
 * sessions handed to it through its inbox (the demo relies on this).
 *
 * The "control" REPAIR hook, written by a repair monitor:
 *   u64 @0   command: 1 hang spinning with interrupts off, 2 hang halted
 *            with interrupts off, 3 reset, 4 scribble over session 2's
 *            newest record (and stop advancing it), 5 die in the middle of
 *            writing session 1's next record (left with an odd seq; session
 *            1 stops), 6 triple-fault, 7 try to change the sealed backdoor
 *            (register, unregister, update, seal: each refused and counted),
 *            8 try 100,000 times (seal), 9 a wild write over the progress
 *            box's header (the service runs on), 10 reset into a mute boot
 *            that registers nothing (a marker outside the image says so)
 *   u64 @8   inbox doorbell: records delivered so far (rung last)
 *   u64 @16  inbox fence: the hand-over's fencing token (its claim)
 *   @24      the hand-over's source name, 32 bytes NUL-padded
 *   @64      inbox: up to 15 records of 256 bytes in the docs/abi.md format
 * A hand-over older than one already taken from its source is refused
 * whole (a monitor that lost its incident, delivering late); once taken
 * or refused, the doorbell and then the fence are cleared, so that the
 * inbox can take the next hand-over.
 * Runs in ring 0, where cli and hlt are allowed.
 */
#include "bd_test.h"

#define PAGE		BD_PAGE_SIZE
#define SLOT		256
#define MAX_SESSIONS	16
#define INBOX_SLOTS	15
#define PAYLOAD_LEN	32
/* Loop iterations between two session steps (~tens of ms when emulated). */
#define STEP		1500
/* Survives a reset (outside the image, which the VMM reloads): command 10. */
#define MUTE_ADDR	0x00f00000UL
#define MUTE_MAGIC	0x4244535643204d55ULL	/* "UM CVSDB" */

struct session {
	bd_u64 id;
	bd_u64 version;
	bd_u64 total;
	bd_u32 stage;
	bd_u32 pair;		/* uses slots 2*pair and 2*pair+1 */
	bool frozen;
	struct bd_counter *ctr;
};

static unsigned char pbox[2 * PAGE] __page_aligned;
static unsigned char sbox[4 * PAGE] __page_aligned;
static volatile bd_u64 control[PAGE / 8] __page_aligned;
static struct bd_hook_desc desc __attribute__((aligned(64)));
static struct session sessions[MAX_SESSIONS];
static unsigned int nsessions;
static struct bd_counter *shop;

static bool hook(unsigned long base, void *p, bd_u64 len, bd_u32 kind,
		 bd_u32 perms, const char *name)
{
	bd_hook_desc_fill(&desc, bd_addr(p), len, kind, perms, name);
	return bd_hook_register(base, &desc, NULL) == BD_OK;
}

static char *put_dec(char *p, bd_u64 v)
{
	char tmp[24];
	int n = 0;

	do {
		tmp[n++] = '0' + v % 10;
		v /= 10;
	} while (v);
	while (n)
		*p++ = tmp[--n];
	return p;
}

static void payload(const struct session *s, char out[PAYLOAD_LEN])
{
	char *p = out;
	int i;

	for (i = 0; i < PAYLOAD_LEN; i++)
		out[i] = 0;
	for (const char *t = "items="; *t; t++)
		*p++ = *t;
	p = put_dec(p, s->stage);
	for (const char *t = " total="; *t; t++)
		*p++ = *t;
	put_dec(p, s->total);
}

static void save(struct session *s)
{
	char text[PAYLOAD_LEN];

	payload(s, text);
	bd_record_write(sbox, 2 * s->pair + (s->version & 1), "shop", s->id,
			s->version, s->stage, text, PAYLOAD_LEN);
}

static void say_session(const char *what, const struct session *s)
{
	puts(what);
	print_dec(s->id);
	puts(what[5] == 'r' ? " at stage " : " stage ");
	print_dec(s->stage);
	puts(" total ");
	print_dec(s->total);
	putc('\n');
}

static struct session *add_session(bd_u64 id)
{
	char name[24] = "session-";
	struct session *s;

	if (nsessions == MAX_SESSIONS)
		return NULL;
	s = &sessions[nsessions];
	put_dec(name + 8, id);
	s->ctr = bd_counter_alloc(pbox, name, 2000, BD_LEVEL_SESSION, id);
	if (!s->ctr)
		return NULL;
	s->id = id;
	s->pair = nsessions++;
	return s;
}

static void step(struct session *s)
{
	s->stage++;
	s->total += s->id * s->stage;
	s->version++;
	save(s);
	bd_counter_bump(s->ctr);
	bd_counter_bump(shop);
	if (s->stage % 5 == 0)
		say_session("svc: session ", s);
}

static bool parse_num(const char **p, const char *prefix, bd_u64 *v)
{
	for (; *prefix; prefix++, (*p)++)
		if (**p != *prefix)
			return false;
	if (**p < '0' || **p > '9')
		return false;
	for (*v = 0; **p >= '0' && **p <= '9'; (*p)++)
		*v = *v * 10 + (**p - '0');
	return true;
}

#define SOURCE_LEN	32
#define MAX_SOURCES	8

/* The newest fencing token taken from each source (docs/abi.md). */
static struct {
	char name[SOURCE_LEN];
	bd_u64 token;
} fences[MAX_SOURCES];
static unsigned int nfences;

static bool same_source(const char *a, const volatile char *b)
{
	unsigned int i;

	for (i = 0; i < SOURCE_LEN; i++)
		if (a[i] != b[i])
			return false;
	return true;
}

/*
 * Whether to take the hand-over from source (32 bytes) under token; books
 * it when taken. *took is the newer token that refused it. A table full
 * of sources takes the hand-over unbooked (the ABI's rule still holds
 * for the sources it keeps).
 */
static bool fence_admit(const volatile char *source, bd_u64 token,
			bd_u64 *took)
{
	unsigned int i;

	for (i = 0; i < nfences; i++) {
		if (!same_source(fences[i].name, source))
			continue;
		if (token < fences[i].token) {
			*took = fences[i].token;
			return false;
		}
		fences[i].token = token;
		return true;
	}
	if (nfences < MAX_SOURCES) {
		for (i = 0; i < SOURCE_LEN; i++)
			fences[nfences].name[i] = source[i];
		fences[nfences++].token = token;
	}
	return true;
}

static void put_source(const volatile char *source)
{
	unsigned int i;

	for (i = 0; i < SOURCE_LEN && source[i]; i++)
		putc(source[i]);
}

/* Adopts hand-off record k from the inbox, or says why not. */
static void adopt(unsigned int k)
{
	const unsigned char *r = (const unsigned char *)control + 64 + k * SLOT;
	const struct bd_record *h = (const void *)r;
	const char *why = NULL, *p = (const char *)r + BD_RECORD_HEADER_SIZE;
	bd_u64 stage, total;
	bd_u32 crc;
	struct session *s;

	if (h->seq == 0 || (h->seq & 1))
		why = "not a complete record";
	else if (h->payload_len > SLOT - BD_RECORD_HEADER_SIZE)
		why = "payload too long";
	if (!why) {
		crc = bd_crc32c(0, r + BD_RECORD_CRC_START,
				BD_RECORD_CRC_END - BD_RECORD_CRC_START);
		crc = bd_crc32c(crc, p, h->payload_len);
		if (crc != h->crc32c)
			why = "CRC mismatch";
	}
	if (!why && (h->service[0] != 's' || h->service[1] != 'h' ||
		     h->service[2] != 'o' || h->service[3] != 'p' ||
		     h->service[4] != 0))
		why = "not a shop session";
	if (!why && (!parse_num(&p, "items=", &stage) ||
		     !parse_num(&p, " total=", &total)))
		why = "unreadable payload";
	if (!why && (stage != h->stage ||
		     total != h->session_id * stage * (stage + 1) / 2))
		why = "inconsistent totals";
	if (!why && !(s = add_session(h->session_id)))
		why = "no room";
	if (why) {
		puts("svc: rejected hand-off record ");
		print_dec(k);
		puts(": ");
		puts(why);
		putc('\n');
		return;
	}
	s->stage = stage;
	s->total = total;
	s->version = h->version;
	save(s);
	say_session("svc: resumed session ", s);
}

static void scribble(void)
{
	unsigned int i;

	for (i = 0; i < nsessions; i++) {
		struct session *s = &sessions[i];
		unsigned char *r;

		if (s->id != 2)
			continue;
		/* Damage the newest version behind the writer's back (a wild
		 * write): its CRC no longer matches. The older one stays good. */
		r = bd_sbox_slot(sbox, 2 * s->pair + (s->version & 1));
		r[BD_RECORD_HEADER_SIZE + 3] ^= 0x5a;
		s->frozen = true;
		puts("svc: scribbled over session 2's newest record\n");
	}
}

/* A writer that dies mid-write: seq odd, half the next version written. */
static void tear(void)
{
	unsigned int i;

	for (i = 0; i < nsessions; i++) {
		struct session *s = &sessions[i];
		struct bd_record *r;

		if (s->id != 1 || s->frozen)
			continue;
		/* The slot the next version goes to; the other keeps the current. */
		r = bd_sbox_slot(sbox, 2 * s->pair + ((s->version + 1) & 1));
		*(volatile bd_u64 *)&r->seq = r->seq | 1;
		__atomic_thread_fence(__ATOMIC_RELEASE);
		r->version = s->version + 1;
		r->stage = s->stage + 1;
		s->frozen = true;
		puts("svc: died writing session 1's next record\n");
	}
}

/* Every command after the seal: each must be refused and counted. */
static void tamper(unsigned long bd_base)
{
	unsigned int refused = 0;

	bd_hook_desc_fill(&desc, bd_addr(sbox), PAGE, BD_KIND_REPAIR,
			  BD_PERM_ALL, "backdoor-in");
	refused += bd_hook_register(bd_base, &desc, NULL) == BD_E_SEALED;
	refused += bd_hook_unregister(bd_base, 1) == BD_E_SEALED;
	desc.id = 2;
	refused += bd_hook_update(bd_base, &desc) == BD_E_SEALED;
	refused += bd_seal(bd_base) == BD_E_SEALED;
	puts("svc: tamper attempts refused: ");
	print_dec(refused);
	puts(" of 4\n");
}

/*
 * A flood of commands after the seal, as a hostile guest would send them:
 * each is refused and counted, and the host logs a bounded summary.
 */
#define TAMPER_FLOOD 100000

static void tamper_flood(unsigned long bd_base)
{
	unsigned int refused = 0, i;

	for (i = 0; i < TAMPER_FLOOD; i++)
		refused += bd_seal(bd_base) == BD_E_SEALED;
	puts("svc: tamper flood refused: ");
	print_dec(refused);
	puts("\n");
}

static void __attribute__((noreturn)) hang(bd_u64 how)
{
	puts(how == 1 ? "svc: hanging with interrupts off (spinning)\n"
		      : "svc: hanging with interrupts off (halted)\n");
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
	struct bd_counter *kernel, *idle;
	unsigned int next = 0, i;
	unsigned long tick = 0;
	bd_u64 cmd, bell, token, took;
	bool ok;

	(void)ram;
	if (cpu != 0)
		spin_forever();
	if (*(volatile bd_u64 *)MUTE_ADDR == MUTE_MAGIC) {
		/* A guest that rebooted and hung before its driver loaded. */
		*(volatile bd_u64 *)MUTE_ADDR = 0;
		puts("svc: mute boot: registering nothing\n");
		spin_forever();
	}

	ok = bd_pbox_init(pbox, sizeof(pbox)) > 0 &&
	     bd_sbox_init(sbox, sizeof(sbox), SLOT) > 0;
	kernel = ok ? bd_counter_alloc(pbox, "kernel", 500, BD_LEVEL_OS, 0) : NULL;
	shop = ok ? bd_counter_alloc(pbox, "shop", 1000, BD_LEVEL_APPLICATION, 1) : NULL;
	ok = kernel && shop;
	ok = ok && bd_dev_probe(bd_base) == 0;
	ok = ok && hook(bd_base, pbox, sizeof(pbox), BD_KIND_PROGRESS_BOX,
			BD_PERM_READ, "progress");
	ok = ok && hook(bd_base, sbox, sizeof(sbox), BD_KIND_STATE_BOX,
			BD_PERM_READ, "sessions");
	ok = ok && hook(bd_base, (void *)control, PAGE, BD_KIND_REPAIR,
			BD_PERM_ALL, "control");
	ok = ok && bd_seal(bd_base) == BD_OK;
	/*
	 * ncpus (main's 2nd argument) picks the role: 1 vCPU serves sessions
	 * 1-3, 2 or more is a fresh instance (demo.sh starts shop2 with
	 * --vcpus 2 to get one).
	 */
	if (ok && ncpus < 2) {
		for (i = 1; ok && i <= 3; i++) {
			struct session *s = add_session(i);

			ok = s != NULL;
			if (ok) {
				s->version = 1;
				save(s);
			}
		}
		idle = ok ? bd_counter_alloc(pbox, "session-4", 2000,
					     BD_LEVEL_SESSION, 4) : NULL;
		ok = idle != NULL;
		if (ok)
			bd_counter_idle(idle);
	}
	report(ok, "shop backdoor set up and sealed");
	if (!ok)
		return report_summary();
	puts(ncpus < 2 ? "svc: serving sessions 1 2 3 (4 idle)\n"
		       : "svc: fresh instance, waiting for sessions\n");

	for (;;) {
		bd_counter_bump(kernel);
		cmd = control[0];
		if (cmd == 1 || cmd == 2)
			hang(cmd);
		if (cmd == 3) {
			puts("svc: resetting\n");
			outb(0x64, 0xfe);
			spin_forever();
		}
		if (cmd == 4) {
			control[0] = 0;
			scribble();
		}
		if (cmd == 5) {
			control[0] = 0;
			tear();
		}
		if (cmd == 6) {
			puts("svc: triple-faulting\n");
			asm volatile("ud2"); /* no IDT: a triple fault */
		}
		if (cmd == 7) {
			control[0] = 0;
			tamper(bd_base);
		}
		if (cmd == 8) {
			control[0] = 0;
			tamper_flood(bd_base);
		}
		if (cmd == 9) {
			control[0] = 0;
			((volatile bd_u32 *)pbox)[0] = 0; /* the header's magic */
			puts("svc: scribbled over the progress box header\n");
		}
		if (cmd == 10) {
			*(volatile bd_u64 *)MUTE_ADDR = MUTE_MAGIC;
			puts("svc: resetting into a mute boot\n");
			outb(0x64, 0xfe);
			spin_forever();
		}
		bell = control[1];
		/* The monitor writes records, then the doorbell: read in order. */
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		if (bell) {
			const volatile char *source =
				(const volatile char *)&control[3];

			token = control[2];
			if (fence_admit(source, token, &took)) {
				for (i = 0; i < bell && i < INBOX_SLOTS; i++)
					adopt(i);
				puts("svc: took the hand-over from ");
				put_source(source);
				puts(" under fencing token ");
				print_dec(token);
				putc('\n');
			} else {
				puts("svc: refused the hand-over from ");
				put_source(source);
				puts(": fencing token ");
				print_dec(token);
				puts(" is older than ");
				print_dec(took);
				putc('\n');
			}
			/* Free the inbox: the doorbell first, then the claim. */
			control[1] = 0;
			__atomic_thread_fence(__ATOMIC_RELEASE);
			control[2] = 0;
		}
		if (++tick % STEP == 0 && nsessions) {
			struct session *s = &sessions[next++ % nsessions];

			if (!s->frozen)
				step(s);
		}
	}
}
