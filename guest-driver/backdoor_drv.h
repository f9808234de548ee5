/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/*
 * backdoor.ko internals shared by its two parts: backdoor_main.c (the
 * device, the boxes, the hooks, the OS-level counter) and backdoor_cdev.c
 * (/dev/backdoor).  docs/guest-driver.md describes the whole driver.
 */
#ifndef BACKDOOR_DRV_H
#define BACKDOOR_DRV_H

#include <asm/page.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/types.h>
#include <linux/uidgid.h>

#include "backdoor_guest.h"
#include "backdoor_pool.h"
#include "backdoor_uapi.h"

/*
 * mmap offsets of /dev/backdoor: one window per box, far enough apart that
 * no box can grow into the next (each box is at most 4 MiB).  Counter page
 * p of the progress box is at BD_MMAP_PBOX + p * PAGE_SIZE, state-box slot
 * s at BD_MMAP_SBOX + s * PAGE_SIZE (the header page is never mapped).
 */
#define BD_MMAP_PBOX		0x00000000ULL
#define BD_MMAP_INBOX		0x10000000ULL
#define BD_MMAP_SBOX		0x20000000ULL
#define BD_MMAP_END		0x30000000ULL

/* A service's continuation area: kept until SVC_DELETE, across releases. */
struct bd_area {
	struct list_head node;
	char name[BD_SERVICE_LEN];
	u32 first;			/* first state-box slot */
	u32 count;			/* slots */
	struct bd_file *holder;		/* the open file holding it, or NULL */
	kuid_t owner;			/* its creator's fsuid: who may reopen it */
};

/* Per open file of /dev/backdoor. */
struct bd_file {
	u64 token;			/* owner of its counter pages */
	struct bd_area *area;		/* the service it holds, or NULL */
};

struct bd_drv {
	/* Serialises every allocation path and the fault handler; bumps,
	 * record writes and the OS-level tick never take it.
	 */
	struct mutex lock;
	bool ready;			/* open() refused until fully set up */
	bool sealed;
	u32 abi_version;
	u32 generation;

	void *pbox;			/* progress box */
	size_t pbox_len;
	struct bd_cpool cpool;
	struct bd_cpage *cpages;
	u64 next_token;

	void *sbox;			/* state box: a header page, then slots */
	size_t sbox_len;
	u32 slot_count;			/* slots of PAGE_SIZE bytes */
	struct bd_spool spool;
	u8 *slot_used;
	struct list_head areas;

	void *inbox;			/* REPAIR hook; NULL if none */
	size_t inbox_len;
	u32 inbox_slot_size;

	void *kinfo;			/* a page of text for the "kinfo" hook */
};

extern struct bd_drv bd_drv;

int bd_cdev_register(void);
void bd_cdev_unregister(void);

/* The printk ring buffer's memory: prb, its header, descs, infos, text. */
#define BD_KLOG_MAX_RUNS	5
/* progress, state, inbox; vmcoreinfo, the ring's runs and kinfo. */
#define BD_DRV_MAX_HOOKS	(3 + 1 + BD_KLOG_MAX_RUNS + 1)

/* Registers one hook over @len bytes of kernel memory at @mem. */
int bd_register(const char *name, void *mem, size_t len, u32 kind, u32 perms);
/* backdoor_klog.c: the kernel's vmcoreinfo and log as BD_KIND_KERNEL hooks. */
int bd_klog_register(void);

/* CPU @cpu's OS-level counter: slot @cpu, id @cpu + 1, in the driver's pages. */
#define BD_OS_COUNTER_SLOT(cpu)	(cpu)

/* Counter @slot of the progress box. */
static inline struct bd_counter *bd_counter_at(u32 slot)
{
	return (struct bd_counter *)((u8 *)bd_drv.pbox +
				     bd_cpool_slot_offset(slot));
}

/* The first byte of state-box slot @slot (its record header). */
static inline void *bd_slot_at(u32 slot)
{
	return (u8 *)bd_drv.sbox + PAGE_SIZE + (size_t)slot * PAGE_SIZE;
}

#endif /* BACKDOOR_DRV_H */
