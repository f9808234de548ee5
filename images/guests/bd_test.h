/* SPDX-License-Identifier: MIT */
/*
 * Shared helpers for the backdoor test guests: checking device RESULT codes
 * with a readable diagnostic when they differ.
 */
#ifndef BDVMM_BD_TEST_H
#define BDVMM_BD_TEST_H

#include "lib.h"
#include "backdoor_guest.h"

#define __page_aligned __attribute__((aligned(4096)))

static inline const char *bd_result_name(bd_u32 r)
{
	static const char *const names[] = {
		"OK", "E_SEALED", "E_ALIGN", "E_RANGE", "E_OVERLAP",
		"E_TOO_MANY", "E_TOO_LARGE", "E_KIND", "E_PERMS", "E_NAME",
		"E_DESC", "E_NO_HOOK", "E_COMMAND",
	};

	return r < sizeof(names) / sizeof(names[0]) ? names[r] : "unknown";
}

/* report() whether @got is @want; on a mismatch say what came back. */
static inline void expect_result(bd_u32 got, bd_u32 want, const char *name)
{
	if (got != want) {
		print_lock();
		puts("  ");
		puts(name);
		puts(": got ");
		print_dec(got);
		puts(" (");
		puts(bd_result_name(got));
		puts("), want ");
		puts(bd_result_name(want));
		putc('\n');
		print_unlock();
	}
	report(got == want, name);
}

/* report() whether a register reads @want, with the value on a mismatch. */
static inline void expect_reg(unsigned long base, bd_u32 off, bd_u32 want,
			      const char *name)
{
	bd_u32 got = bd_reg_read(base, off);

	if (got != want) {
		print_lock();
		puts("  ");
		puts(name);
		puts(": read ");
		print_hex(got);
		puts(", want ");
		print_hex(want);
		putc('\n');
		print_unlock();
	}
	report(got == want, name);
}

static inline bd_u64 bd_addr(const void *p)
{
	return (unsigned long)p;	/* identity map: virtual == physical */
}

#endif /* BDVMM_BD_TEST_H */
