// SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause
/*
 * backdoor.ko's pure bookkeeping (see backdoor_pool.h): no libc, no kernel
 * headers, so the driver and the hosted unit tests share it.
 */
#include "backdoor_pool.h"

int bd_name_check(const char *field, bd_u32 size)
{
	bd_u32 n, i;

	if (!field || !size)
		return -1;
	for (n = 0; n < size && field[n]; n++)
		if ((unsigned char)field[n] < 0x20 ||
		    (unsigned char)field[n] > 0x7e)
			return -1;
	if (!n)
		return -1;
	/* NUL padding to the end: no hidden bytes after the name. */
	for (i = n; i < size; i++)
		if (field[i])
			return -1;
	return (int)n;
}

int bd_counter_setup(struct bd_counter *c, bd_u32 id, const char *name,
		     bd_u32 deadline_ms, bd_u8 level, bd_u32 owner)
{
	unsigned int i;

	if (!c || !id || !deadline_ms ||
	    bd_name_check(name, BD_COUNTER_NAME_LEN) < 0)
		return -1;
	if (level < BD_LEVEL_OS || level > BD_LEVEL_SESSION)
		return -1;
	/* Not counted until ACTIVE: hide it while the fields change. */
	__atomic_store_n(&c->state, BD_STATE_FREE, __ATOMIC_RELAXED);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	c->value = 0;
	c->id = id;
	c->deadline_ms = deadline_ms;
	c->level = level;
	c->reserved0 = 0;
	c->owner = owner;
	for (i = 0; i < BD_COUNTER_NAME_LEN; i++)
		c->name[i] = name[i];
	c->reserved1 = 0;
	__atomic_store_n(&c->state, BD_STATE_ACTIVE, __ATOMIC_RELEASE);
	return 0;
}

/* ---- counter pages ------------------------------------------------------ */

int bd_cpool_init(struct bd_cpool *p, struct bd_cpage *pages, bd_u32 npages,
		  bd_u32 page_size)
{
	bd_u32 i;

	if (!p || !pages || npages < 2 || page_size % BD_COUNTER_SIZE ||
	    page_size < 2 * BD_COUNTER_SIZE ||
	    page_size < BD_PBOX_HEADER_SIZE + BD_COUNTER_SIZE)
		return BD_POOL_EINVAL;
	p->pages = pages;
	p->npages = npages;
	p->page_size = page_size;
	p->clock = 0;
	for (i = 0; i < npages; i++) {
		pages[i].owner = BD_CPOOL_FREE;
		pages[i].released = 0;
		pages[i].used = 0;
		pages[i].reserved = 0;
	}
	pages[0].owner = BD_CPOOL_DRIVER;
	return BD_POOL_OK;
}

bd_u64 bd_cpool_slot_offset(bd_u32 slot)
{
	return BD_PBOX_HEADER_SIZE + (bd_u64)slot * BD_COUNTER_SIZE;
}

bd_u32 bd_cpool_page_first(const struct bd_cpool *p, bd_u32 page)
{
	bd_u64 start = (bd_u64)page * p->page_size;

	/* The header pushes every counter 64 bytes on. */
	if (!page)
		return 0;
	return (bd_u32)((start - BD_PBOX_HEADER_SIZE) / BD_COUNTER_SIZE);
}

bd_u32 bd_cpool_page_counters(const struct bd_cpool *p, bd_u32 page)
{
	bd_u32 per_page = p->page_size / BD_COUNTER_SIZE;

	if (page >= p->npages)
		return 0;
	return page ? per_page : per_page - 1;
}

int bd_cpool_slot_page(const struct bd_cpool *p, bd_u32 slot)
{
	bd_u64 page = bd_cpool_slot_offset(slot) / p->page_size;

	return page < p->npages ? (int)page : -1;
}

/* A page to claim: never used first, then the one released longest ago. */
static int bd_cpool_pick(const struct bd_cpool *p)
{
	int best = -1;
	bd_u32 i;

	for (i = 1; i < p->npages; i++) {
		const struct bd_cpage *pg = &p->pages[i];

		if (pg->owner != BD_CPOOL_FREE)
			continue;
		if (!pg->released)
			return (int)i;
		if (best < 0 || pg->released < p->pages[best].released)
			best = (int)i;
	}
	return best;
}

int bd_cpool_alloc(struct bd_cpool *p, bd_u64 owner, bd_u32 *slot,
		   int *claimed)
{
	bd_u32 i, per_page;
	int page;

	if (!p || !slot || !claimed || owner == BD_CPOOL_FREE ||
	    owner == BD_CPOOL_DRIVER)
		return BD_POOL_EINVAL;
	per_page = p->page_size / BD_COUNTER_SIZE;
	*claimed = 0;
	for (i = 1; i < p->npages; i++) {
		struct bd_cpage *pg = &p->pages[i];

		if (pg->owner == owner && pg->used < per_page) {
			*slot = bd_cpool_page_first(p, i) + pg->used++;
			return BD_POOL_OK;
		}
	}
	page = bd_cpool_pick(p);
	if (page < 0)
		return BD_POOL_EFULL;
	p->pages[page].owner = owner;
	p->pages[page].used = 1;
	*claimed = 1;
	*slot = bd_cpool_page_first(p, (bd_u32)page);
	return BD_POOL_OK;
}

int bd_cpool_owns_page(const struct bd_cpool *p, bd_u64 owner, bd_u32 page)
{
	return page > 0 && page < p->npages && owner != BD_CPOOL_FREE &&
	       p->pages[page].owner == owner;
}

int bd_cpool_owns_slot(const struct bd_cpool *p, bd_u64 owner, bd_u32 slot)
{
	int page = bd_cpool_slot_page(p, slot);

	if (page < 0 || !bd_cpool_owns_page(p, owner, (bd_u32)page))
		return 0;
	return slot - bd_cpool_page_first(p, (bd_u32)page) <
	       p->pages[page].used;
}

int bd_cpool_next_page(const struct bd_cpool *p, bd_u64 owner, bd_u32 from)
{
	bd_u32 i;

	for (i = from ? from : 1; i < p->npages; i++)
		if (bd_cpool_owns_page(p, owner, i))
			return (int)i;
	return -1;
}

int bd_cpool_put(struct bd_cpool *p, bd_u32 page)
{
	struct bd_cpage *pg;

	if (!page || page >= p->npages)
		return BD_POOL_EINVAL;
	pg = &p->pages[page];
	if (pg->owner == BD_CPOOL_FREE || pg->owner == BD_CPOOL_DRIVER)
		return BD_POOL_EINVAL;
	pg->owner = BD_CPOOL_FREE;
	pg->used = 0;
	pg->released = ++p->clock;
	return BD_POOL_OK;
}

bd_u32 bd_cpool_app_counters(const struct bd_cpool *p)
{
	return (p->npages - 1) * (p->page_size / BD_COUNTER_SIZE);
}

bd_u32 bd_cpool_free_counters(const struct bd_cpool *p)
{
	bd_u32 per_page = p->page_size / BD_COUNTER_SIZE, n = 0, i;

	for (i = 1; i < p->npages; i++)
		n += per_page - p->pages[i].used;
	return n;
}

/* ---- state-box slots ---------------------------------------------------- */

void bd_spool_init(struct bd_spool *s, bd_u8 *used, bd_u32 nslots)
{
	bd_u32 i;

	s->used = used;
	s->nslots = nslots;
	for (i = 0; i < nslots; i++)
		used[i] = 0;
}

int bd_spool_alloc(struct bd_spool *s, bd_u32 n, bd_u32 *first)
{
	bd_u32 i = 0, start, len, best_len = 0, best = 0;

	if (!s || !first || !n)
		return BD_POOL_EINVAL;
	while (i < s->nslots) {
		if (s->used[i]) {
			i++;
			continue;
		}
		start = i;
		while (i < s->nslots && !s->used[i])
			i++;
		len = i - start;
		if (len >= n && (!best_len || len < best_len)) {
			best = start;
			best_len = len;
		}
	}
	if (!best_len)
		return BD_POOL_EFULL;
	for (i = best; i < best + n; i++)
		s->used[i] = 1;
	*first = best;
	return BD_POOL_OK;
}

int bd_spool_free(struct bd_spool *s, bd_u32 first, bd_u32 n)
{
	bd_u32 i;

	if (!s || !n || first >= s->nslots || n > s->nslots - first)
		return BD_POOL_EINVAL;
	for (i = first; i < first + n; i++)
		if (!s->used[i])
			return BD_POOL_EINVAL;
	for (i = first; i < first + n; i++)
		s->used[i] = 0;
	return BD_POOL_OK;
}

bd_u32 bd_spool_free_count(const struct bd_spool *s)
{
	bd_u32 i, n = 0;

	for (i = 0; i < s->nslots; i++)
		n += !s->used[i];
	return n;
}
