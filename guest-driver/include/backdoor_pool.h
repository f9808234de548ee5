/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause */
/*
 * The bookkeeping of backdoor.ko that involves no kernel API: which pages
 * of the progress box belong to which open file, which state-box slots
 * form which service's area, and the checks on names from user space.
 *
 * Freestanding like backdoor_guest.h (no libc, no kernel headers), so the
 * driver and the hosted unit tests (tests/tests/guest_driver.rs) compile
 * the very same code.  Nothing here locks: the driver serialises every
 * call with its mutex.  Callers provide all storage.
 */
#ifndef BACKDOOR_POOL_H
#define BACKDOOR_POOL_H

#include "backdoor_abi.h"

#define BD_POOL_OK	0
#define BD_POOL_EINVAL	(-1)	/* bad argument */
#define BD_POOL_EFULL	(-2)	/* no room */

/*
 * A field of @size bytes from user space: 1 to @size printable ASCII
 * characters, then NUL padding to the end.  Returns the length, or -1.
 */
int bd_name_check(const char *field, bd_u32 size);

/*
 * Fills the FREE or RETIRED counter @c and makes it ACTIVE last (release
 * order), so a monitor never sees an ACTIVE counter with stale fields.
 * @name is a BD_COUNTER_NAME_LEN field as bd_name_check accepts it.
 * Returns 0, or -1 (bad name, deadline 0, unknown level; @c untouched).
 */
int bd_counter_setup(struct bd_counter *c, bd_u32 id, const char *name,
		     bd_u32 deadline_ms, bd_u8 level, bd_u32 owner);

/* ---- counter pages ------------------------------------------------------ */

/*
 * The progress box is npages pages: the header and the first counters in
 * page 0, which the driver keeps for its own counters (owner
 * BD_CPOOL_DRIVER), then whole pages handed to open files, so a file can
 * map its counters and nobody else's.  Counter i starts at byte
 * BD_PBOX_HEADER_SIZE + i * BD_COUNTER_SIZE, so every page holds only
 * whole counters: page_size / 64 of them, one fewer in page 0.
 */
#define BD_CPOOL_FREE	0ULL
#define BD_CPOOL_DRIVER	(~0ULL)

struct bd_cpage {
	bd_u64 owner;		/* BD_CPOOL_FREE, BD_CPOOL_DRIVER or a file */
	bd_u64 released;	/* pool clock at the last release; 0: never */
	bd_u32 used;		/* counters handed out on this page */
	bd_u32 reserved;
};

struct bd_cpool {
	struct bd_cpage *pages;	/* npages entries */
	bd_u32 npages;
	bd_u32 page_size;
	bd_u64 clock;
};

/*
 * @pages has @npages entries (at least 2); @page_size is a multiple of
 * BD_COUNTER_SIZE, at least two counters.  Returns 0 or BD_POOL_EINVAL.
 */
int bd_cpool_init(struct bd_cpool *p, struct bd_cpage *pages, bd_u32 npages,
		  bd_u32 page_size);

/* The first counter slot on @page, and how many whole counters it holds. */
bd_u32 bd_cpool_page_first(const struct bd_cpool *p, bd_u32 page);
bd_u32 bd_cpool_page_counters(const struct bd_cpool *p, bd_u32 page);

/* The page holding counter @slot, or -1 if it is past the box. */
int bd_cpool_slot_page(const struct bd_cpool *p, bd_u32 slot);

/* Byte offset of counter @slot in the box. */
bd_u64 bd_cpool_slot_offset(bd_u32 slot);

/*
 * Hands @owner (not FREE, not DRIVER) its next counter slot: on a page it
 * already has, or on a newly claimed one, in which case *@claimed is 1
 * and the caller must zero that page before use (a reused page still
 * holds the counters its previous owner retired).  Pages never used go
 * first, then the one released longest ago, so a slot a monitor has just
 * seen retired is reused as late as possible.
 * Returns 0 and the slot in *@slot, BD_POOL_EFULL or BD_POOL_EINVAL.
 */
int bd_cpool_alloc(struct bd_cpool *p, bd_u64 owner, bd_u32 *slot,
		   int *claimed);

/* 1 if counter @slot was handed to @owner, else 0. */
int bd_cpool_owns_slot(const struct bd_cpool *p, bd_u64 owner, bd_u32 slot);

/* 1 if @page belongs to @owner, else 0. */
int bd_cpool_owns_page(const struct bd_cpool *p, bd_u64 owner, bd_u32 page);

/* The first page >= @from that @owner holds, or -1. */
int bd_cpool_next_page(const struct bd_cpool *p, bd_u64 owner, bd_u32 from);

/* Returns @page (not page 0) to the pool; BD_POOL_EINVAL if not held. */
int bd_cpool_put(struct bd_cpool *p, bd_u32 page);

/* Counters applications may have in all, and how many remain to hand out. */
bd_u32 bd_cpool_app_counters(const struct bd_cpool *p);
bd_u32 bd_cpool_free_counters(const struct bd_cpool *p);

/* ---- state-box slots ---------------------------------------------------- */

/*
 * A service's area is a run of consecutive slots.  used[i] is 1 while slot
 * i belongs to an area.
 */
struct bd_spool {
	bd_u8 *used;		/* nslots entries */
	bd_u32 nslots;
};

void bd_spool_init(struct bd_spool *s, bd_u8 *used, bd_u32 nslots);

/*
 * Finds @n (> 0) free slots in a row and marks them used: the smallest free
 * run that fits, the lowest first among equals, which keeps large runs
 * whole.  Returns 0 and the first slot in *@first, BD_POOL_EFULL or
 * BD_POOL_EINVAL.
 */
int bd_spool_alloc(struct bd_spool *s, bd_u32 n, bd_u32 *first);

/* Frees [first, first + n); BD_POOL_EINVAL (nothing freed) if any is not used. */
int bd_spool_free(struct bd_spool *s, bd_u32 first, bd_u32 n);

bd_u32 bd_spool_free_count(const struct bd_spool *s);

#endif /* BACKDOOR_POOL_H */
