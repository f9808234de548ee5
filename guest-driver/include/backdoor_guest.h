/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause */
/*
 * Portable guest-side helpers for the backdoor ABI (docs/abi.md): CRC32C,
 * progress and state boxes, and the device's register protocol.
 *
 * Needs no libc and no kernel headers, so the same code serves freestanding
 * test guests, the Linux driver and hosted unit tests.  The compiler may
 * still emit calls to memset/memcpy, which every one of those provides.
 */
#ifndef BACKDOOR_GUEST_H
#define BACKDOOR_GUEST_H

#include "backdoor_abi.h"

/*
 * One untorn access that the compiler may neither merge, split nor drop:
 * what READ_ONCE/WRITE_ONCE give in the kernel, from GCC's relaxed
 * atomics, which need no header and cost a plain load or store.
 */
#define BD_LOAD_ONCE(x)		__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define BD_STORE_ONCE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)

/* CRC32C (Castagnoli); start with crc = 0 and chain calls to extend. */
bd_u32 bd_crc32c(bd_u32 crc, const void *buf, bd_u64 len);

/* ---- progress box ------------------------------------------------------ */

/*
 * Lays out a progress box in @mem (8-byte aligned): header, then zeroed
 * counters.  Returns the capacity, or a negative value if @bytes cannot
 * hold the header and one counter.
 */
int bd_pbox_init(void *mem, bd_u64 bytes);

/*
 * Claims the first FREE counter and makes it ACTIVE.  Not safe against a
 * concurrent alloc on the same box: callers serialise.  NULL if the box is
 * full or an argument is bad (name empty, too long or unprintable; unknown
 * level).
 */
struct bd_counter *bd_counter_alloc(void *box, const char *name,
				    bd_u32 deadline_ms, bd_u8 level,
				    bd_u32 owner);

/*
 * The hot path: one aligned 8-byte store, no exit, no atomic RMW.  Only the
 * owner writes value, so read-increment-store cannot lose an update, and a
 * remote reader sees either the old or the new value.
 */
static inline void bd_counter_bump(struct bd_counter *c)
{
	BD_STORE_ONCE(c->value, BD_LOAD_ONCE(c->value) + 1);
}

void bd_counter_idle(struct bd_counter *c);
void bd_counter_active(struct bd_counter *c);
void bd_counter_retire(struct bd_counter *c);

/* ---- state box --------------------------------------------------------- */

/*
 * Lays out a state box in @mem (8-byte aligned): header, then zeroed slots
 * of @slot_size bytes (a power of two, at least 128).  Returns the slot
 * count, or a negative value on bad arguments or too little room.
 */
int bd_sbox_init(void *mem, bd_u64 bytes, bd_u32 slot_size);

/*
 * The same, with the slots starting at @header_size (a multiple of 64, at
 * most BD_SBOX_MAX_HEADER_SIZE) instead of 64.  A header of one page and
 * slots of whole pages let a driver map one service's slots, and nothing
 * else, into that service's address space.
 */
int bd_sbox_init_at(void *mem, bd_u64 bytes, bd_u32 slot_size,
		    bd_u32 header_size);

/* Slot @i of the box (its record header), or NULL if out of range. */
void *bd_sbox_slot(void *box, bd_u32 i);

#define BD_REC_EBOX	(-1)	/* not a state box, or no payload buffer */
#define BD_REC_ESLOT	(-2)	/* slot out of range */
#define BD_REC_E2BIG	(-3)	/* payload larger than the slot allows */
#define BD_REC_ESERVICE	(-4)	/* service empty, too long or unprintable */

/*
 * Writes one record into @slot with the seqlock protocol.  One writer per
 * slot.  Returns 0 or a BD_REC_E* value (the slot is untouched then).
 */
int bd_record_write(void *box, bd_u32 slot, const char *service,
		    bd_u64 session_id, bd_u64 version, bd_u32 stage,
		    const void *payload, bd_u32 len);

/*
 * The same, into one slot of @slot_size bytes that the caller has mapped
 * without the box around it (an application's service area).
 */
int bd_slot_write(void *slot, bd_u32 slot_size, const char *service,
		  bd_u64 session_id, bd_u64 version, bd_u32 stage,
		  const void *payload, bd_u32 len);

/* ---- the device -------------------------------------------------------- */

/*
 * Every register access is a VM exit; tests compare this count of the
 * accesses made through the helpers below with the VMM's exit counters.
 */
extern bd_u64 bd_mmio_accesses;

bd_u32 bd_reg_read(unsigned long base, bd_u32 off);
void bd_reg_write(unsigned long base, bd_u32 off, bd_u32 v);

#ifdef BD_GUEST_EXTERNAL_MMIO
/*
 * Built with BD_GUEST_EXTERNAL_MMIO, the code above leaves the 32-bit
 * register accesses to its host environment (the Linux driver: readl and
 * writel); otherwise it loads and stores base + off once (BD_LOAD_ONCE).
 */
bd_u32 bd_mmio_read32(unsigned long addr);
void bd_mmio_write32(unsigned long addr, bd_u32 v);
#endif

/* 0 if a version-1 backdoor device answers at @base, else negative. */
int bd_dev_probe(unsigned long base);

/*
 * Zeroes @d and fills it in; @name is copied NUL-padded (NULL leaves it
 * empty).  Returns 0, or -1 if @name is longer than BD_HOOK_NAME_LEN (it is
 * truncated).
 */
int bd_hook_desc_fill(struct bd_hook_desc *d, bd_u64 gpa, bd_u64 len,
		      bd_u32 kind, bd_u32 perms, const char *name);

/*
 * Runs @cmd on the descriptor at guest-physical @desc_gpa; returns RESULT.
 * The building block for callers whose descriptors are not identity mapped.
 */
bd_u32 bd_desc_command(unsigned long base, bd_u32 cmd, bd_u64 desc_gpa);

/* Runs a command that takes no descriptor; returns RESULT. */
bd_u32 bd_command(unsigned long base, bd_u32 cmd);

/*
 * The helpers below pass a descriptor's pointer value as its guest-physical
 * address, which holds for identity-mapped guests only.  They return RESULT
 * (BD_OK or BD_E_*).  On success bd_hook_register stores the new hook's id
 * in *@id_out (if not NULL); on failure it stores 0.
 */
bd_u32 bd_hook_register(unsigned long base, struct bd_hook_desc *d,
			bd_u32 *id_out);
bd_u32 bd_hook_unregister(unsigned long base, bd_u32 id);
bd_u32 bd_hook_update(unsigned long base, struct bd_hook_desc *d);
bd_u32 bd_seal(unsigned long base);

#endif /* BACKDOOR_GUEST_H */
