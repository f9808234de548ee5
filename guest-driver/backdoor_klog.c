// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * The kernel's own evidence, published read-only to the backdoor at load
 * time (kernel_log=1, the default), so that a monitor can read the kernel
 * log of a hung guest with no guest CPU (bdctl dmesg, docs/guest-driver.md):
 *
 *   "vmcoreinfo"   the kernel's vmcoreinfo note (its pages): what a reader
 *                  needs to find and decode the printk ring buffer;
 *   "kva:<addr>"   the memory of that ring buffer: the prb pointer, the
 *                  ring's header, its descriptors, infos and text data,
 *                  as page-aligned runs named by their kernel virtual
 *                  address (runs that share a page are merged);
 *   "kinfo"        a page of text naming this module's code
 *                  ("module backdoor text=<addr> size=<bytes>"), so that
 *                  a vCPU stopped in it can be named.
 *
 * Every hook is BD_KIND_KERNEL and read-only. The addresses come from the
 * kernel's vmcoreinfo text, which this driver parses the way a dump tool
 * does (SYMBOL(prb), OFFSET(...), SIZE(...)); anything unexpected leaves
 * the log unpublished (a warning), never the module unloaded.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/crash_core.h>
#include <linux/elf.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/sort.h>
#include <linux/string.h>

#include "backdoor_compat.h"
#include "backdoor_drv.h"

struct bd_run {
	unsigned long start;
	unsigned long end;
};

/* The vmcoreinfo text inside its ELF note (name "VMCOREINFO", 12 bytes padded). */
static const char *bd_vmcoreinfo(size_t *len)
{
	const struct elf64_note *n;

	n = phys_to_virt(paddr_vmcoreinfo_note());
	if (n->n_namesz != 11 || n->n_descsz == 0 ||
	    n->n_descsz > VMCOREINFO_BYTES)
		return NULL;
	*len = n->n_descsz;
	return (const char *)n + sizeof(*n) + 12;
}

/* The value of "KEY=value" in @text, as a number in @base; 0 if found. */
static int bd_vmci(const char *text, size_t len, const char *key, int base,
		   unsigned long *val)
{
	size_t klen = strlen(key);
	const char *p = text, *end = text + len;
	char buf[32];

	while (p < end) {
		const char *nl = memchr(p, '\n', end - p);
		size_t l = nl ? (size_t)(nl - p) : (size_t)(end - p);

		if (l > klen && !memcmp(p, key, klen) && p[klen] == '=' &&
		    l - klen - 1 < sizeof(buf)) {
			memcpy(buf, p + klen + 1, l - klen - 1);
			buf[l - klen - 1] = '\0';
			return kstrtoul(buf, base, val);
		}
		p += l + 1;
	}
	return -ENOENT;
}

static int bd_run_cmp(const void *a, const void *b)
{
	const struct bd_run *x = a, *y = b;

	return x->start < y->start ? -1 : x->start > y->start;
}

/* Whether @start..@end is one physically contiguous directly mapped run. */
static bool bd_run_linear(unsigned long start, unsigned long end)
{
	return virt_addr_valid((void *)start) &&
	       virt_addr_valid((void *)(end - 1)) &&
	       virt_to_phys((void *)(end - 1)) - virt_to_phys((void *)start) ==
	       end - 1 - start;
}

/* The page-aligned runs holding the printk ring buffer, merged. */
static int bd_ring_runs(const char *text, size_t len, struct bd_run *runs)
{
	unsigned long prb, rb, dr, tr, descs, infos, data, v[10];
	static const char * const keys[] = {
		"OFFSET(printk_ringbuffer.desc_ring)",
		"OFFSET(printk_ringbuffer.text_data_ring)",
		"OFFSET(prb_desc_ring.count_bits)",
		"OFFSET(prb_desc_ring.descs)",
		"OFFSET(prb_desc_ring.infos)",
		"OFFSET(prb_data_ring.size_bits)",
		"OFFSET(prb_data_ring.data)",
		"SIZE(printk_ringbuffer)",
		"SIZE(prb_desc)",
		"SIZE(printk_info)",
	};
	unsigned int count_bits, size_bits;
	int i, n = 0, m;

	if (bd_vmci(text, len, "SYMBOL(prb)", 16, &prb))
		return -ENOENT;
	for (i = 0; i < ARRAY_SIZE(keys); i++)
		if (bd_vmci(text, len, keys[i], 10, &v[i]))
			return -ENOENT;
	rb = *(unsigned long *)prb;
	dr = rb + v[0];
	tr = rb + v[1];
	count_bits = *(unsigned int *)(dr + v[2]);
	descs = *(unsigned long *)(dr + v[3]);
	infos = *(unsigned long *)(dr + v[4]);
	size_bits = *(unsigned int *)(tr + v[5]);
	data = *(unsigned long *)(tr + v[6]);
	if (count_bits > 24 || size_bits > 30)
		return -EINVAL;
	runs[n++] = (struct bd_run){ prb, prb + sizeof(long) };
	runs[n++] = (struct bd_run){ rb, rb + v[7] };
	runs[n++] = (struct bd_run){ descs, descs + (v[8] << count_bits) };
	runs[n++] = (struct bd_run){ infos, infos + (v[9] << count_bits) };
	runs[n++] = (struct bd_run){ data, data + (1UL << size_bits) };
	for (i = 0; i < n; i++) {
		runs[i].start = round_down(runs[i].start, PAGE_SIZE);
		runs[i].end = round_up(runs[i].end, PAGE_SIZE);
	}
	sort(runs, n, sizeof(*runs), bd_run_cmp, NULL);
	for (i = 1, m = 0; i < n; i++) {
		if (runs[i].start <= runs[m].end)
			runs[m].end = max(runs[m].end, runs[i].end);
		else
			runs[++m] = runs[i];
	}
	return m + 1;
}

int bd_klog_register(void)
{
	struct bd_run runs[BD_KLOG_MAX_RUNS];
	const char *text;
	char name[BD_NAME_LEN];
	size_t len;
	int i, n, ret;

	text = bd_vmcoreinfo(&len);
	if (!text) {
		pr_warn("the kernel has no vmcoreinfo: its log is not published\n");
		return 0;
	}
	n = bd_ring_runs(text, len, runs);
	if (n < 0) {
		pr_warn("vmcoreinfo does not describe the printk ring buffer: the log is not published\n");
		return 0;
	}
	for (i = 0; i < n; i++) {
		if (!bd_run_linear(runs[i].start, runs[i].end)) {
			pr_warn("the printk ring buffer is not in linear memory: the log is not published\n");
			return 0;
		}
	}
	ret = bd_register("vmcoreinfo",
			  phys_to_virt(paddr_vmcoreinfo_note()),
			  PAGE_ALIGN(VMCOREINFO_NOTE_SIZE), BD_KIND_KERNEL,
			  BD_PERM_READ);
	for (i = 0; !ret && i < n; i++) {
		snprintf(name, sizeof(name), "kva:%lx", runs[i].start);
		ret = bd_register(name, (void *)runs[i].start,
				  runs[i].end - runs[i].start, BD_KIND_KERNEL,
				  BD_PERM_READ);
	}
	if (!ret) {
		scnprintf(bd_drv.kinfo, PAGE_SIZE,
			  "module %s text=%lx size=%u\n", KBUILD_MODNAME,
			  (unsigned long)bd_module_text(THIS_MODULE),
			  bd_module_text_size(THIS_MODULE));
		ret = bd_register("kinfo", bd_drv.kinfo, PAGE_SIZE,
				  BD_KIND_KERNEL, BD_PERM_READ);
	}
	if (!ret)
		pr_info("kernel log published: vmcoreinfo and %d regions of the printk ring buffer\n",
			n);
	return ret;
}
