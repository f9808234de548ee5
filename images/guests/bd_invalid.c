// SPDX-License-Identifier: MIT
/*
 * Every bad descriptor and command gets the exact error code docs/abi.md
 * gives it, before any seal, and nothing here counts as tampering.  Each
 * case is valid except for the one thing it tests, so the check order of
 * the ABI decides which code comes back.
 */
#include "bd_test.h"

#define PAGE		BD_PAGE_SIZE
#define GIB		(1UL << 30)
#define MMIO_GAP_ADDR	0xd0000000UL
#define MMIO_GAP_START	0xb0000000UL

static struct bd_hook_desc desc __attribute__((aligned(64)));
/* Room for a descriptor at an address that is not 8-byte aligned. */
static unsigned char raw[2 * BD_HOOK_DESC_SIZE] __attribute__((aligned(64)));

static unsigned char page_a[PAGE] __page_aligned;
static unsigned char scratch[2 * PAGE] __page_aligned;
/* One page per hook, for filling the table and one past it. */
static unsigned char fill[(BD_MAX_HOOKS + 1) * PAGE] __page_aligned;

static unsigned long base;

/* A descriptor that would register, except for what the caller changes. */
static struct bd_hook_desc *good(const char *name)
{
	bd_hook_desc_fill(&desc, bd_addr(scratch), PAGE, BD_KIND_PROGRESS_BOX,
			  BD_PERM_READ, name);
	return &desc;
}

static void try_register(const char *what, bd_u32 want)
{
	expect_result(bd_hook_register(base, &desc, NULL), want, what);
}

static void fill_name(char *buf, unsigned int i)
{
	buf[0] = 'h';
	buf[1] = '0' + i / 10;
	buf[2] = '0' + i % 10;
	buf[3] = '\0';
}

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram,
	 unsigned long bd_base)
{
	volatile unsigned char *magic8;
	bd_u32 max, count, res, i;
	char name[4];
	bool ok;

	(void)ncpus;
	if (cpu != 0)
		spin_forever();

	base = bd_base;
	report(bd_dev_probe(base) == 0, "device probe");
	if (bd_dev_probe(base) != 0)
		return report_summary();

	good("gpa");
	desc.gpa += 8;
	try_register("unaligned gpa: E_ALIGN", BD_E_ALIGN);

	good("len");
	desc.len = PAGE + 512;
	try_register("unaligned len: E_ALIGN", BD_E_ALIGN);

	good("zero");
	desc.len = 0;
	try_register("len 0: E_RANGE", BD_E_RANGE);

	good("end");
	desc.gpa = ram;
	try_register("gpa at end of RAM: E_RANGE", BD_E_RANGE);

	good("cross");
	desc.gpa = ram - PAGE;
	desc.len = 2 * PAGE;
	try_register("range crossing end of RAM: E_RANGE", BD_E_RANGE);

	if (ram <= MMIO_GAP_START) {
		good("gap");
		desc.gpa = MMIO_GAP_ADDR;
		try_register("gpa in MMIO gap: E_RANGE", BD_E_RANGE);
	}

	good("huge");
	desc.len = GIB + PAGE;
	try_register("1 GiB + 4 KiB: E_TOO_LARGE", BD_E_TOO_LARGE);

	good("kind");
	desc.kind = 9;
	try_register("kind 9: E_KIND", BD_E_KIND);

	good("pw");
	desc.perms = BD_PERM_READ | BD_PERM_WRITE;
	try_register("progress box with WRITE: E_PERMS", BD_E_PERMS);

	good("rw");
	desc.kind = BD_KIND_REPAIR;
	desc.perms = BD_PERM_WRITE | BD_PERM_ATOMIC;
	try_register("repair without READ: E_PERMS", BD_E_PERMS);

	good("bit5");
	desc.kind = BD_KIND_REPAIR;
	desc.perms = BD_PERM_READ | (1U << 5);
	try_register("unknown perm bit: E_PERMS", BD_E_PERMS);

	good(NULL);
	try_register("empty name: E_NAME", BD_E_NAME);

	good("bad\tname");
	try_register("control char in name: E_NAME", BD_E_NAME);

	good("a");
	desc.gpa = bd_addr(page_a);
	try_register("register a: OK", BD_OK);

	good("a");
	try_register("duplicate name a: E_NAME", BD_E_NAME);

	good("b");
	desc.gpa = bd_addr(page_a);
	try_register("overlapping a: E_OVERLAP", BD_E_OVERLAP);

	good("odd");
	memcpy(raw + 4, &desc, sizeof(desc));
	expect_result(bd_desc_command(base, BD_CMD_REGISTER, bd_addr(raw + 4)),
		      BD_E_DESC, "descriptor not 8-aligned: E_DESC");

	expect_result(bd_desc_command(base, BD_CMD_REGISTER, ram), BD_E_DESC,
		      "descriptor beyond RAM: E_DESC");

	good("resv");
	desc.reserved = 1;
	try_register("reserved field set: E_DESC", BD_E_DESC);

	good("id");
	desc.id = 5;
	try_register("REGISTER with id: E_DESC", BD_E_DESC);

	expect_result(bd_hook_unregister(base, 999), BD_E_NO_HOOK,
		      "UNREGISTER 999: E_NO_HOOK");

	good("upd");
	desc.id = 999;
	expect_result(bd_hook_update(base, &desc), BD_E_NO_HOOK,
		      "UPDATE 999: E_NO_HOOK");

	expect_result(bd_command(base, 99), BD_E_COMMAND,
		      "command 99: E_COMMAND");

	/* Fill the table ("a" is already in it), then one more. */
	max = bd_reg_read(base, BD_REG_MAX_HOOKS);
	report(max == BD_MAX_HOOKS, "MAX_HOOKS is 32");
	if (max > BD_MAX_HOOKS)
		max = BD_MAX_HOOKS;	/* fill[] has room for no more */
	count = bd_reg_read(base, BD_REG_HOOK_COUNT);
	ok = count == 1;
	for (i = count; i < max; i++) {
		fill_name(name, i);
		good(name);
		desc.gpa = bd_addr(fill + i * PAGE);
		res = bd_hook_register(base, &desc, NULL);
		if (res != BD_OK) {
			expect_result(res, BD_OK, "fill table");
			ok = false;
		}
	}
	report(ok && bd_reg_read(base, BD_REG_HOOK_COUNT) == max,
	       "table filled to MAX_HOOKS");
	good("h99");
	desc.gpa = bd_addr(fill + max * PAGE);
	try_register("one hook past MAX_HOOKS: E_TOO_MANY", BD_E_TOO_MANY);

	/* Not a 32-bit access: ignored, and reads as all ones. */
	magic8 = (volatile unsigned char *)(base + BD_REG_MAGIC);
	bd_mmio_accesses++;
	report(*magic8 == 0xff, "8-bit read of MAGIC: 0xff");

	expect_reg(base, BD_REG_TAMPER_COUNT, 0, "TAMPER_COUNT still 0");
	report(!(bd_reg_read(base, BD_REG_STATUS) & BD_STATUS_SEALED),
	       "not sealed");

	return report_summary();
}
