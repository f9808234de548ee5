// SPDX-License-Identifier: MIT
#include "lib.h"

static struct spinlock print_spinlock;
static unsigned int tests, failures;

void spin_lock(struct spinlock *lock)
{
	uint32_t ticket = __atomic_fetch_add(&lock->next, 1, __ATOMIC_RELAXED);

	while (__atomic_load_n(&lock->owner, __ATOMIC_ACQUIRE) != ticket)
		cpu_relax();
}

void spin_unlock(struct spinlock *lock)
{
	__atomic_store_n(&lock->owner, lock->owner + 1, __ATOMIC_RELEASE);
}

void print_lock(void)
{
	spin_lock(&print_spinlock);
}

void print_unlock(void)
{
	spin_unlock(&print_spinlock);
}

void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

void print_dec(uint64_t val)
{
	char buf[21];
	int i = sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = '0' + val % 10;
		val /= 10;
	} while (val);
	puts(&buf[i]);
}

void print_hex(uint64_t val)
{
	char buf[19];
	int i = sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = "0123456789abcdef"[val & 0xf];
		val >>= 4;
	} while (val);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(&buf[i]);
}

void poweroff(uint32_t status)
{
	outl(DEBUG_EXIT_PORT, status);
	spin_forever();
}

/* hlt and cli fault in ring 3, so idle vCPUs just pause in a loop. */
void spin_forever(void)
{
	for (;;)
		cpu_relax();
}

void report(bool cond, const char *name)
{
	print_lock();
	tests++;
	if (!cond)
		failures++;
	puts(cond ? "PASS: " : "FAIL: ");
	puts(name);
	putc('\n');
	print_unlock();
}

int report_summary(void)
{
	int ret;

	print_lock();
	puts("SUMMARY: ");
	print_dec(tests);
	puts(" tests, ");
	print_dec(failures);
	puts(" unexpected failures\n");
	ret = failures ? 1 : 0;
	print_unlock();
	return ret;
}

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n)
{
	unsigned char *d = dst;

	while (n--)
		*d++ = c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}
