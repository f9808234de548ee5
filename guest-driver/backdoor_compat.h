/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * The kernel APIs backdoor.ko uses that changed between 5.10 and today.
 * An out-of-tree module builds against every one of those kernels, so
 * (unlike in-tree code) it has to ask what the one it is built against
 * offers: Kbuild looks in its headers and defines BD_HAVE_* (not version
 * numbers: distributions backport).
 */
#ifndef BACKDOOR_COMPAT_H
#define BACKDOOR_COMPAT_H

#include <linux/mm.h>
#include <linux/module.h>
#include <linux/timer.h>

/* 6.9 moved vmcoreinfo (paddr_vmcoreinfo_note, ...) out of crash_core.h. */
#ifdef BD_HAVE_VMCORE_INFO_H
#include <linux/vmcore_info.h>
#endif

/* 6.2 renamed del_timer_sync(); later kernels dropped the old name. */
static inline void bd_timer_delete_sync(struct timer_list *t)
{
#ifdef BD_HAVE_TIMER_DELETE_SYNC
	timer_delete_sync(t);
#else
	del_timer_sync(t);
#endif
}

/* 6.3 made vma->vm_flags read-only behind accessors. */
static inline void bd_vm_flags_mod(struct vm_area_struct *vma,
				   vm_flags_t set, vm_flags_t clear)
{
#ifdef BD_HAVE_VM_FLAGS_MOD
	vm_flags_mod(vma, set, clear);
#else
	vma->vm_flags = (vma->vm_flags | set) & ~clear;
#endif
}

/* 6.4 split a module's memory into mem[] by type. */
static inline void *bd_module_text(struct module *m)
{
#ifdef BD_HAVE_MODULE_MEM
	return m->mem[MOD_TEXT].base;
#else
	return m->core_layout.base;
#endif
}

static inline unsigned int bd_module_text_size(struct module *m)
{
#ifdef BD_HAVE_MODULE_MEM
	return m->mem[MOD_TEXT].size;
#else
	return m->core_layout.text_size;
#endif
}

#endif /* BACKDOOR_COMPAT_H */
