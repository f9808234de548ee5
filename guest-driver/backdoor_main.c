// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * backdoor.ko: the Linux guest driver of the backdoor device (docs/abi.md,
 * docs/guest-driver.md).
 *
 * At load it finds the device from the "dev" parameter (the kernel command
 * line's backdoor.dev=SIZE@BASE[:IRQ]), lays out a progress box, a state
 * box and an inbox in physically contiguous kernel memory, registers them
 * as hooks and seals the device, so a remote monitor can read them with no
 * help from this kernel.  Each online CPU has an OS-level counter
 * "kernel" (its owner is the CPU's number), bumped by a timer pinned to
 * that CPU: when one stops, that CPU is stuck, whatever the others and
 * applications do.
 * /dev/backdoor (backdoor_cdev.c) hands the rest out to applications.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/cpuhotplug.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/jiffies.h>
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/percpu.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/string.h>
#include <linux/timer.h>

#include "backdoor_compat.h"
#include "backdoor_drv.h"

/* Each box is one physically contiguous allocation of at most 4 MiB, which
 * every x86 kernel's page allocator can serve (MAX_ORDER covers it).
 */
#define BD_MAX_BOX_PAGES	1024
#define BD_MAX_PBOX_PAGES	256

static char *dev;
module_param(dev, charp, 0444);
MODULE_PARM_DESC(dev, "the device: SIZE@BASE[:IRQ], e.g. 4K@0xb0000000:5 (what bdvmm puts on the command line as backdoor.dev=)");

static bool seal = true;
module_param(seal, bool, 0444);
MODULE_PARM_DESC(seal, "seal the hooks after registering them (default 1)");

static unsigned int pbox_pages = 64;
module_param(pbox_pages, uint, 0444);
MODULE_PARM_DESC(pbox_pages, "pages of the progress box; page 0 is the driver's, the others go whole to open files (2-256, default 64)");

static unsigned int sbox_slots = 256;
module_param(sbox_slots, uint, 0444);
MODULE_PARM_DESC(sbox_slots, "page-sized slots of the state box (1-1023, default 256)");

static unsigned int inbox_pages = 64;
module_param(inbox_pages, uint, 0444);
MODULE_PARM_DESC(inbox_pages, "pages of the inbox REPAIR hook, 0 for none (0-1024, default 64)");

static unsigned int inbox_slot_size = 4096;
module_param(inbox_slot_size, uint, 0444);
MODULE_PARM_DESC(inbox_slot_size, "bytes per inbox record slot: bdctl resume --slot-size (multiple of 64, >= 128, default 4096: a whole state-box slot always fits)");

static unsigned int os_tick_ms = 100;
module_param(os_tick_ms, uint, 0444);
MODULE_PARM_DESC(os_tick_ms, "period of the per-CPU timers that bump the OS-level counters, ms (1-60000, default 100)");

static unsigned int os_deadline_ms = 1000;
module_param(os_deadline_ms, uint, 0444);
MODULE_PARM_DESC(os_deadline_ms, "deadline of the OS-level counters, ms (more than os_tick_ms, default 1000)");

static bool kernel_log = true;
module_param(kernel_log, bool, 0444);
MODULE_PARM_DESC(kernel_log, "Publish the kernel's vmcoreinfo and printk ring buffer, read-only (default 1)");

static bool allow_hang;
module_param(allow_hang, bool, 0444);
MODULE_PARM_DESC(allow_hang, "TEST ONLY: let hang_trigger hang the kernel (default 0)");

struct bd_drv bd_drv = {
	.lock = __MUTEX_INITIALIZER(bd_drv.lock),
	.areas = LIST_HEAD_INIT(bd_drv.areas),
};

static struct {
	phys_addr_t base;
	resource_size_t size;
	void __iomem *regs;
	struct bd_hook_desc *desc;	/* kmalloc'ed: has a physical address */
	u32 hook_ids[BD_DRV_MAX_HOOKS];
	unsigned int nhooks;
	unsigned long tick;		/* os_tick_ms in jiffies */
	int cpuhp_state;		/* > 0 while the CPU callbacks are set */
} bd;

static const char bd_kernel_name[BD_COUNTER_NAME_LEN] = "kernel";

/* A CPU's OS-level counter and the timer, pinned to that CPU, that bumps it. */
struct bd_cpu_tick {
	struct timer_list timer;
	struct bd_counter *counter;
	bool on;			/* the timer may re-arm itself */
};

static DEFINE_PER_CPU(struct bd_cpu_tick, bd_cpu_ticks);

/*
 * The portable register helpers (lib/backdoor_guest.c) call these: the
 * base they are given is the ioremap()ed address, as an unsigned long.
 */
u32 bd_mmio_read32(unsigned long addr)
{
	return readl((const void __iomem *)addr);
}

void bd_mmio_write32(unsigned long addr, u32 v)
{
	writel(v, (void __iomem *)addr);
}

static unsigned long bd_base(void)
{
	return (unsigned long)bd.regs;
}

static const char *bd_result_name(u32 res)
{
	static const char * const names[] = {
		[BD_OK] = "OK",
		[BD_E_SEALED] = "E_SEALED (the device is sealed)",
		[BD_E_ALIGN] = "E_ALIGN (not page aligned)",
		[BD_E_RANGE] = "E_RANGE (not inside one guest RAM range)",
		[BD_E_OVERLAP] = "E_OVERLAP (overlaps another hook)",
		[BD_E_TOO_MANY] = "E_TOO_MANY (hook table full)",
		[BD_E_TOO_LARGE] = "E_TOO_LARGE (hook too large)",
		[BD_E_KIND] = "E_KIND (unknown kind)",
		[BD_E_PERMS] = "E_PERMS (permissions not allowed)",
		[BD_E_NAME] = "E_NAME (bad or duplicate hook name)",
		[BD_E_DESC] = "E_DESC (bad descriptor)",
		[BD_E_NO_HOOK] = "E_NO_HOOK (no such hook)",
		[BD_E_COMMAND] = "E_COMMAND (unknown command)",
	};

	return res < ARRAY_SIZE(names) ? names[res] : "unknown result";
}

/* Parses SIZE@BASE[:IRQ]; the IRQ is reserved in ABI v1 and not used. */
static int bd_parse_dev(const char *s)
{
	unsigned long long size, base;
	unsigned int irq;
	char *end;

	if (!s || !*s) {
		pr_err("no device given: load with dev=SIZE@BASE[:IRQ] (bdvmm passes backdoor.dev=%s@%#lx:%d on the kernel command line; modprobe forwards it, insmod needs it spelled out)\n",
		       "4K", BD_DEV_DEFAULT_BASE, BD_DEV_DEFAULT_IRQ);
		return -ENODEV;
	}
	size = memparse(s, &end);
	if (end == s || *end != '@')
		goto bad;
	s = end + 1;
	base = memparse(s, &end);
	if (end == s)
		goto bad;
	if (*end == ':') {
		if (kstrtouint(end + 1, 0, &irq))
			goto bad;
	} else if (*end && *end != '\n') {
		goto bad;
	}
	if (size < BD_DEV_MMIO_SIZE) {
		pr_err("dev=%s: the device needs %#x bytes of registers\n", dev,
		       BD_DEV_MMIO_SIZE);
		return -EINVAL;
	}
	if (!base || base & (PAGE_SIZE - 1) || base + size < base) {
		pr_err("dev=%s: base must be a non-zero, page-aligned physical address\n",
		       dev);
		return -EINVAL;
	}
	bd.base = base;
	bd.size = BD_DEV_MMIO_SIZE;
	return 0;
bad:
	pr_err("dev=%s: expected SIZE@BASE[:IRQ], e.g. 4K@0xb0000000:5\n", dev);
	return -EINVAL;
}

static int bd_check_params(void)
{
	/* bdctl reads a progress box in one request of at most 1 MiB. */
	if (pbox_pages < 2 || pbox_pages > BD_MAX_PBOX_PAGES) {
		pr_err("pbox_pages=%u: must be 2 to %u\n", pbox_pages,
		       BD_MAX_PBOX_PAGES);
		return -EINVAL;
	}
	if (sbox_slots < 1 || sbox_slots > BD_MAX_BOX_PAGES - 1) {
		pr_err("sbox_slots=%u: must be 1 to %u\n", sbox_slots,
		       BD_MAX_BOX_PAGES - 1);
		return -EINVAL;
	}
	if (inbox_pages > BD_MAX_BOX_PAGES) {
		pr_err("inbox_pages=%u: must be 0 to %u\n", inbox_pages,
		       BD_MAX_BOX_PAGES);
		return -EINVAL;
	}
	/* The doorbell page-offset 8, records from offset 64: bdctl resume. */
	if (inbox_pages &&
	    (inbox_slot_size < BD_SBOX_MIN_SLOT_SIZE || inbox_slot_size % 64 ||
	     inbox_slot_size > inbox_pages * PAGE_SIZE - 64)) {
		pr_err("inbox_slot_size=%u: must be a multiple of 64, at least %u, and leave room for one slot after the inbox's 64-byte head\n",
		       inbox_slot_size, BD_SBOX_MIN_SLOT_SIZE);
		return -EINVAL;
	}
	if (os_tick_ms < 1 || os_tick_ms > 60000 ||
	    os_deadline_ms <= os_tick_ms) {
		pr_err("os_tick_ms=%u os_deadline_ms=%u: the tick must be 1 to 60000 ms and shorter than the deadline\n",
		       os_tick_ms, os_deadline_ms);
		return -EINVAL;
	}
	return 0;
}

static void *bd_alloc_box(size_t len, const char *what)
{
	/* Zeroed, page aligned, physically contiguous, never moved. */
	void *p = alloc_pages_exact(len, GFP_KERNEL | __GFP_ZERO | __GFP_NOWARN);

	if (!p)
		pr_err("cannot allocate the %s (%zu KiB of contiguous memory)\n",
		       what, len >> 10);
	return p;
}

static void bd_free_boxes(void)
{
	free_page((unsigned long)bd_drv.kinfo);
	bd_drv.kinfo = NULL;
	if (bd_drv.inbox)
		free_pages_exact(bd_drv.inbox, bd_drv.inbox_len);
	if (bd_drv.sbox)
		free_pages_exact(bd_drv.sbox, bd_drv.sbox_len);
	if (bd_drv.pbox)
		free_pages_exact(bd_drv.pbox, bd_drv.pbox_len);
	kfree(bd_drv.slot_used);
	kfree(bd_drv.cpages);
	bd_drv.inbox = NULL;
	bd_drv.sbox = NULL;
	bd_drv.pbox = NULL;
	bd_drv.slot_used = NULL;
	bd_drv.cpages = NULL;
}

static int bd_setup_boxes(void)
{
	const unsigned int per_page = PAGE_SIZE / BD_COUNTER_SIZE;
	/* Slot n is CPU n's counter, so the driver keeps nr_cpu_ids slots. */
	unsigned int kpages = DIV_ROUND_UP(nr_cpu_ids + 1, per_page);
	unsigned int cpu, i;
	int n;

	if (kpages >= pbox_pages) {
		pr_err("pbox_pages=%u leaves no page for applications: the counters of %u CPUs take %u\n",
		       pbox_pages, nr_cpu_ids, kpages);
		return -EINVAL;
	}

	bd_drv.pbox_len = (size_t)pbox_pages * PAGE_SIZE;
	bd_drv.sbox_len = (size_t)(sbox_slots + 1) * PAGE_SIZE;
	bd_drv.inbox_len = (size_t)inbox_pages * PAGE_SIZE;
	bd_drv.slot_count = sbox_slots;
	bd_drv.inbox_slot_size = inbox_pages ? inbox_slot_size : 0;

	bd_drv.cpages = kcalloc(pbox_pages, sizeof(*bd_drv.cpages), GFP_KERNEL);
	bd_drv.slot_used = kzalloc(sbox_slots, GFP_KERNEL);
	if (!bd_drv.cpages || !bd_drv.slot_used)
		goto nomem;
	bd_drv.pbox = bd_alloc_box(bd_drv.pbox_len, "progress box");
	bd_drv.sbox = bd_alloc_box(bd_drv.sbox_len, "state box");
	bd_drv.kinfo = (void *)get_zeroed_page(GFP_KERNEL);
	if (!bd_drv.pbox || !bd_drv.sbox || !bd_drv.kinfo)
		goto nomem;
	if (inbox_pages) {
		bd_drv.inbox = bd_alloc_box(bd_drv.inbox_len, "inbox");
		if (!bd_drv.inbox)
			goto nomem;
	}

	n = bd_pbox_init(bd_drv.pbox, bd_drv.pbox_len);
	if (n < 0 || bd_cpool_init(&bd_drv.cpool, bd_drv.cpages, pbox_pages,
				   PAGE_SIZE))
		goto layout;
	/*
	 * The pages after the driver's go whole to applications, which could
	 * write any level into their counters: only the driver's slots may
	 * claim OS.
	 */
	((struct bd_pbox_header *)bd_drv.pbox)->kernel_slots =
		kpages * per_page - 1;
	for (i = 0; i < kpages; i++)
		bd_drv.cpool.pages[i].owner = BD_CPOOL_DRIVER;
	/* A page-sized header puts every slot on a page of its own. */
	n = bd_sbox_init_at(bd_drv.sbox, bd_drv.sbox_len, PAGE_SIZE, PAGE_SIZE);
	if (n != (int)sbox_slots)
		goto layout;
	bd_spool_init(&bd_drv.spool, bd_drv.slot_used, sbox_slots);

	/* Set up when each CPU comes online (bd_cpu_online). */
	for_each_possible_cpu(cpu)
		per_cpu_ptr(&bd_cpu_ticks, cpu)->counter =
			bd_counter_at(BD_OS_COUNTER_SLOT(cpu));
	return 0;
nomem:
	bd_free_boxes();
	return -ENOMEM;
layout:
	pr_err("internal error laying out the boxes\n");
	bd_free_boxes();
	return -EINVAL;
}

static void bd_os_tick(struct timer_list *t)
{
	struct bd_cpu_tick *ct = container_of(t, struct bd_cpu_tick, timer);

	bd_counter_bump(ct->counter);
	/*
	 * A pinned timer re-arms on this CPU, never on a healthy one, so a
	 * CPU stuck with interrupts off stops its own counter.
	 */
	if (READ_ONCE(ct->on))
		mod_timer(&ct->timer, jiffies + bd.tick);
}

/* CPU hotplug: runs on @cpu as it comes online (and at load). */
static int bd_cpu_online(unsigned int cpu)
{
	struct bd_cpu_tick *ct = per_cpu_ptr(&bd_cpu_ticks, cpu);

	if (bd_counter_setup(ct->counter, BD_OS_COUNTER_SLOT(cpu) + 1,
			     bd_kernel_name, os_deadline_ms, BD_LEVEL_OS, cpu))
		return -EINVAL;
	WRITE_ONCE(ct->on, true);
	timer_setup(&ct->timer, bd_os_tick, TIMER_PINNED);
	ct->timer.expires = jiffies + bd.tick;
	add_timer_on(&ct->timer, cpu);
	return 0;
}

/* CPU hotplug: runs on @cpu as it goes offline (and at unload). */
static int bd_cpu_offline(unsigned int cpu)
{
	struct bd_cpu_tick *ct = per_cpu_ptr(&bd_cpu_ticks, cpu);

	WRITE_ONCE(ct->on, false);
	bd_timer_delete_sync(&ct->timer);
	/* An offline CPU is not a stuck one: its counter leaves the box. */
	bd_counter_retire(ct->counter);
	return 0;
}

/* Starts every online CPU's counter, and each CPU's that comes online. */
static int bd_os_ticks_start(void)
{
	int ret = cpuhp_setup_state(CPUHP_AP_ONLINE_DYN, "misc/backdoor:online",
				    bd_cpu_online, bd_cpu_offline);

	if (ret < 0) {
		pr_err("cannot start the per-CPU OS-level counters (%d)\n", ret);
		return ret;
	}
	bd.cpuhp_state = ret;
	return 0;
}

/* Stops and retires every CPU's counter. */
static void bd_os_ticks_stop(void)
{
	if (bd.cpuhp_state > 0)
		cpuhp_remove_state(bd.cpuhp_state);
	bd.cpuhp_state = 0;
}

int bd_register(const char *name, void *mem, size_t len, u32 kind, u32 perms)
{
	phys_addr_t gpa = virt_to_phys(mem);
	u32 res;

	if (bd.nhooks >= ARRAY_SIZE(bd.hook_ids)) {
		pr_err("hook \"%s\": the driver already holds %zu hooks\n",
		       name, ARRAY_SIZE(bd.hook_ids));
		return -ENOSPC;
	}
	bd_hook_desc_fill(bd.desc, gpa, len, kind, perms, name);
	/* The device reads the descriptor by its guest-physical address. */
	res = bd_desc_command(bd_base(), BD_CMD_REGISTER, virt_to_phys(bd.desc));
	if (res != BD_OK) {
		pr_err("registering hook \"%s\" (%zu KiB at %pa) failed: %s\n",
		       name, len >> 10, &gpa, bd_result_name(res));
		return res == BD_E_NAME ? -EEXIST : -EIO;
	}
	bd.hook_ids[bd.nhooks++] = bd_reg_read(bd_base(), BD_REG_HOOK_ID);
	return 0;
}

/* Returns 0 if every hook is gone, so the memory behind them may be freed. */
static int bd_unregister_all(void)
{
	int ret = 0;
	u32 res;

	while (bd.nhooks) {
		res = bd_hook_unregister(bd_base(), bd.hook_ids[bd.nhooks - 1]);
		if (res != BD_OK) {
			pr_err("unregistering hook %u failed: %s\n",
			       bd.hook_ids[bd.nhooks - 1], bd_result_name(res));
			ret = -EIO;
		}
		bd.nhooks--;
	}
	return ret;
}

static int bd_register_all(u32 features)
{
	int ret;

	ret = bd_register("progress", bd_drv.pbox, bd_drv.pbox_len,
			  BD_KIND_PROGRESS_BOX, BD_PERM_READ);
	if (!ret)
		ret = bd_register("state", bd_drv.sbox, bd_drv.sbox_len,
				  BD_KIND_STATE_BOX, BD_PERM_READ);
	if (!ret && bd_drv.inbox) {
		if (features & BD_FEATURE_REPAIR) {
			/* ATOMIC: a monitor claims the inbox by CAS of its fence word. */
			ret = bd_register("inbox", bd_drv.inbox,
					  bd_drv.inbox_len, BD_KIND_REPAIR,
					  BD_PERM_ALL);
		} else {
			pr_notice("the device offers no REPAIR hooks: no inbox\n");
			free_pages_exact(bd_drv.inbox, bd_drv.inbox_len);
			bd_drv.inbox = NULL;
			bd_drv.inbox_len = 0;
			bd_drv.inbox_slot_size = 0;
		}
	}
	if (!ret && kernel_log)
		ret = bd_klog_register();
	return ret;
}

static int bd_probe(u32 *features)
{
	int ret = bd_dev_probe(bd_base());

	if (ret) {
		pr_err("no backdoor device at %pa (%s)\n", &bd.base,
		       ret == -2 ? "bad magic" : "unsupported ABI version");
		return -ENODEV;
	}
	*features = bd_reg_read(bd_base(), BD_REG_FEATURES);
	if (bd_reg_read(bd_base(), BD_REG_STATUS) & BD_STATUS_SEALED) {
		pr_err("the device is already sealed: its hooks cannot change until the guest resets\n");
		return -EBUSY;
	}
	if (seal && !(*features & BD_FEATURE_SEAL)) {
		pr_err("the device cannot seal; load with seal=0 to run unsealed\n");
		return -EOPNOTSUPP;
	}
	bd_drv.abi_version = bd_reg_read(bd_base(), BD_REG_VERSION);
	bd_drv.generation = bd_reg_read(bd_base(), BD_REG_GENERATION);
	return 0;
}

static int __init bd_init(void)
{
	u32 features, res;
	int ret;

	BUILD_BUG_ON(sizeof(struct bd_ioc_info) != 64);
	BUILD_BUG_ON(sizeof(struct bd_ioc_counter) != 64);
	BUILD_BUG_ON(sizeof(struct bd_ioc_counter_state) != 8);
	BUILD_BUG_ON(sizeof(struct bd_ioc_svc) != 48);
	BUILD_BUG_ON(BD_NAME_LEN != BD_COUNTER_NAME_LEN);
	BUILD_BUG_ON(BD_SERVICE_LEN != BD_RECORD_SERVICE_LEN);
	BUILD_BUG_ON(PAGE_SIZE % BD_PAGE_SIZE);

	ret = bd_check_params();
	if (ret)
		return ret;
	ret = bd_parse_dev(dev);
	if (ret)
		return ret;
	if (!request_mem_region(bd.base, bd.size, KBUILD_MODNAME)) {
		pr_err("registers at %pa are claimed by another driver\n",
		       &bd.base);
		return -EBUSY;
	}
	bd.regs = ioremap(bd.base, bd.size);
	if (!bd.regs) {
		ret = -ENOMEM;
		goto out_region;
	}
	bd.desc = kzalloc(sizeof(*bd.desc), GFP_KERNEL);
	if (!bd.desc) {
		ret = -ENOMEM;
		goto out_unmap;
	}
	ret = bd_probe(&features);
	if (ret)
		goto out_desc;
	ret = bd_setup_boxes();
	if (ret)
		goto out_desc;

	/* Moving before any monitor can see them. */
	bd.tick = max(1UL, msecs_to_jiffies(os_tick_ms));
	ret = bd_os_ticks_start();
	if (ret)
		goto out_boxes;

	ret = bd_register_all(features);
	if (ret)
		goto out_hooks;
	/* Before the seal: a failure after it could not take the hooks back. */
	ret = bd_cdev_register();
	if (ret)
		goto out_hooks;
	if (seal) {
		res = bd_seal(bd_base());
		if (res != BD_OK) {
			pr_err("sealing failed: %s\n", bd_result_name(res));
			ret = -EIO;
			goto out_cdev;
		}
		/*
		 * The device now exposes these pages until the guest resets,
		 * the inbox even to remote writes: they must never be freed,
		 * so the module can no longer be unloaded.
		 */
		__module_get(THIS_MODULE);
		bd_drv.sealed = true;
	}
	mutex_lock(&bd_drv.lock);
	bd_drv.ready = true;
	mutex_unlock(&bd_drv.lock);

	pr_info("device at %pa, generation %u: progress box %zu KiB, state box %u slots, inbox %zu KiB (slots of %u bytes), %s\n",
		&bd.base, bd_drv.generation, bd_drv.pbox_len >> 10,
		bd_drv.slot_count, bd_drv.inbox_len >> 10,
		bd_drv.inbox_slot_size, bd_drv.sealed ? "sealed" : "NOT sealed");
	if (allow_hang)
		pr_warn("allow_hang=1: hang_trigger can hang this kernel (test only)\n");
	return 0;

out_cdev:
	bd_cdev_unregister();
out_hooks:
	bd_os_ticks_stop();
	if (bd_unregister_all()) {
		/* The device may still expose them: never give them back. */
		pr_err("leaking the boxes: the device may still expose them\n");
		kfree(bd_drv.cpages);
		kfree(bd_drv.slot_used);
	} else {
		bd_free_boxes();
	}
	goto out_desc;
out_boxes:
	bd_free_boxes();
out_desc:
	kfree(bd.desc);
out_unmap:
	iounmap(bd.regs);
out_region:
	release_mem_region(bd.base, bd.size);
	return ret;
}

static void __exit bd_exit(void)
{
	/* Only reached unsealed (a sealed module holds a reference to itself),
	 * or by a forced unload.
	 */
	bd_cdev_unregister();
	bd_os_ticks_stop();
	if (bd_drv.sealed || bd_unregister_all())
		pr_warn("leaving the boxes allocated: the device still exposes them\n");
	else
		bd_free_boxes();
	kfree(bd.desc);
	iounmap(bd.regs);
	release_mem_region(bd.base, bd.size);
}

/* ---- the test-only hang trigger ---------------------------------------- */

/* Never returns: this CPU stops taking interrupts and spins. */
static void bd_hang_cpu(void *unused)
{
	local_irq_disable();
	for (;;)
		cpu_relax();
}

/* Whether the test-only trigger @what may hang this kernel now. */
static int bd_hang_allowed(const char *what)
{
	if (!allow_hang) {
		pr_err("%s refused: load the module with allow_hang=1 (test only)\n",
		       what);
		return -EPERM;
	}
	if (!READ_ONCE(bd_drv.ready)) {
		pr_err("%s works only once the module is loaded\n", what);
		return -EINVAL;
	}
	return 0;
}

/*
 * Writing 1 to /sys/module/backdoor/parameters/hang_trigger stops every
 * CPU with interrupts off, the way a kernel deadlock does: the OS-level
 * counter stops and a monitor must report the guest hung.  The guest never
 * recovers.  It exists for the end-to-end tests, and only works if the
 * module was loaded with allow_hang=1.
 */
static int bd_hang_set(const char *val, const struct kernel_param *kp)
{
	int v, ret;

	ret = kstrtoint(val, 0, &v);
	if (ret || v != 1) {
		pr_err("hang_trigger: write 1 to hang the kernel\n");
		return -EINVAL;
	}
	ret = bd_hang_allowed("hang_trigger");
	if (ret)
		return ret;
	pr_emerg("test-only hang trigger: stopping every CPU with interrupts off\n");
	preempt_disable();
	smp_call_function(bd_hang_cpu, NULL, 0);
	bd_hang_cpu(NULL);
	preempt_enable();
	return 0;
}

static const struct kernel_param_ops bd_hang_ops = {
	.set = bd_hang_set,
};

module_param_cb(hang_trigger, &bd_hang_ops, NULL, 0200);
MODULE_PARM_DESC(hang_trigger, "TEST ONLY: write 1 to hang every CPU with interrupts off (needs allow_hang=1)");

/*
 * Writing N to /sys/module/backdoor/parameters/hang_cpu stops CPU N alone
 * with interrupts off, the way a deadlock on some CPUs does: that CPU's
 * OS-level counter stops while the others keep going.  Test only, as
 * hang_trigger.
 */
static int bd_hang_cpu_set(const char *val, const struct kernel_param *kp)
{
	unsigned int cpu;
	int ret;

	ret = kstrtouint(val, 0, &cpu);
	if (ret || cpu >= nr_cpu_ids || !cpu_online(cpu)) {
		pr_err("hang_cpu: write the number of an online CPU\n");
		return -EINVAL;
	}
	ret = bd_hang_allowed("hang_cpu");
	if (ret)
		return ret;
	pr_emerg("test-only hang trigger: stopping CPU %u with interrupts off\n",
		 cpu);
	/* Does not wait: the writer returns unless it runs on @cpu itself. */
	return smp_call_function_single(cpu, bd_hang_cpu, NULL, 0);
}

static const struct kernel_param_ops bd_hang_cpu_ops = {
	.set = bd_hang_cpu_set,
};

module_param_cb(hang_cpu, &bd_hang_cpu_ops, NULL, 0200);
MODULE_PARM_DESC(hang_cpu, "TEST ONLY: write N to hang CPU N alone with interrupts off (needs allow_hang=1)");

module_init(bd_init);
module_exit(bd_exit);

MODULE_DESCRIPTION("backdoor-vmm guest driver: progress counters and service continuations behind a sealed backdoor");
MODULE_AUTHOR("backdoor-vmm");
MODULE_LICENSE("Dual BSD/GPL");
