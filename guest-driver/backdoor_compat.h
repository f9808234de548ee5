/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The kernel APIs backdoor.ko uses that changed between 5.10 and today.
 * An out-of-tree module builds against every one of those kernels, so
 * (unlike in-tree code) it has to ask which one it is built against.
 */
#ifndef BACKDOOR_COMPAT_H
#define BACKDOOR_COMPAT_H

#include <linux/mm.h>
#include <linux/module.h>
#include <linux/timer.h>
#include <linux/version.h>

/* 6.9 moved vmcoreinfo (paddr_vmcoreinfo_note, ...) out of crash_core.h. */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 9, 0)
#include <linux/vmcore_info.h>
#endif

/* 6.2 renamed del_timer_sync(); later kernels dropped the old name. */
static inline void bd_timer_delete_sync(struct timer_list *t)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 2, 0)
	timer_delete_sync(t);
#else
	del_timer_sync(t);
#endif
}

/* 6.3 made vma->vm_flags read-only behind accessors. */
static inline void bd_vm_flags_mod(struct vm_area_struct *vma,
				   vm_flags_t set, vm_flags_t clear)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

/* 6.4 split a module's memory into mem[] by type. */
static inline void *bd_module_text(struct module *m)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	return m->mem[MOD_TEXT].base;
#else
	return m->core_layout.base;
#endif
}

static inline unsigned int bd_module_text_size(struct module *m)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 4, 0)
	return m->mem[MOD_TEXT].size;
#else
	return m->core_layout.text_size;
#endif
}

#endif /* BACKDOOR_COMPAT_H */
