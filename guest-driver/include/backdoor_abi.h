/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause */
/*
 * The backdoor ABI, version 1: the contract in docs/abi.md.
 *
 * Shared by the guest (the Linux driver, freestanding test guests) and the
 * host side (the VMM's backdoor device, the agent, monitors), which is why
 * it uses only GCC's builtin type macros and the one header C11 and the
 * kernel both give for static_assert.  The Rust
 * crate backdoor-abi (backdoor-dev/abi/) mirrors it bit for bit, and a test
 * checks the two against each other.
 *
 * All multi-byte fields are little-endian.  Every structure has explicit
 * padding; reserved fields are written as zero and ignored by readers.
 */
#ifndef BACKDOOR_ABI_H
#define BACKDOOR_ABI_H

#ifdef __KERNEL__
#include <linux/build_bug.h>	/* static_assert */
#else
#include <assert.h>		/* static_assert (C11) */
#endif

/* Fixed-width types without a header (macros, not new typedefs). */
#define bd_u8	__UINT8_TYPE__
#define bd_u16	__UINT16_TYPE__
#define bd_u32	__UINT32_TYPE__
#define bd_u64	__UINT64_TYPE__

#define BD_ABI_VERSION		1
#define BD_PAGE_SIZE		4096

/* ---------------------------------------------------------------------
 * 1. The backdoor device: a 4-KiB block of 32-bit MMIO registers.
 *
 * Linux learns its address from the command line, the way virtio-mmio
 * devices are announced: "backdoor.dev=4K@0xb0000000:5" (size, base, irq).
 * Freestanding test guests receive the base in RCX at entry (0: no device).
 * Registers take aligned 32-bit loads and stores only; other accesses are
 * ignored and read as all ones.
 */
#define BD_CMDLINE_PARAM	"backdoor.dev"
#define BD_DEV_MMIO_SIZE	0x1000
#define BD_DEV_DEFAULT_BASE	0xb0000000UL	/* where bdvmm places it */
#define BD_DEV_DEFAULT_IRQ	5		/* reserved: never raised in v1 */

#define BD_REG_MAGIC		0x00	/* R  BD_DEV_MAGIC */
#define  BD_DEV_MAGIC		0x524f4442U	/* "BDOR" in memory order */
#define BD_REG_VERSION		0x04	/* R  BD_ABI_VERSION */
#define BD_REG_FEATURES		0x08	/* R  BD_FEATURE_* offered */
#define  BD_FEATURE_SEAL	0x1U
#define  BD_FEATURE_REPAIR	0x2U
#define BD_REG_STATUS		0x0c	/* R  BD_STATUS_* */
#define  BD_STATUS_SEALED	0x1U
#define BD_REG_GENERATION	0x10	/* R  new on every guest reset; never 0 */
#define BD_REG_TAMPER_COUNT	0x14	/* R  commands refused after the seal */
#define BD_REG_HOOK_COUNT	0x18	/* R  hooks registered */
#define BD_REG_MAX_HOOKS	0x1c	/* R  BD_MAX_HOOKS */
#define  BD_MAX_HOOKS		32
#define BD_REG_DESC_ADDR_LO	0x20	/* RW descriptor guest-physical address */
#define BD_REG_DESC_ADDR_HI	0x24	/* RW ... high half */
#define BD_REG_HOOK_ID		0x28	/* RW UNREGISTER argument; REGISTER result */
#define BD_REG_COMMAND		0x2c	/* W  writing a BD_CMD_* runs it */
#define  BD_CMD_REGISTER	1	/* add the hook at DESC_ADDR */
#define  BD_CMD_UNREGISTER	2	/* remove hook HOOK_ID */
#define  BD_CMD_UPDATE		3	/* change hook desc.id's range and perms */
#define  BD_CMD_SEAL		4	/* fix the table until the next reset */
#define BD_REG_RESULT		0x30	/* R  BD_OK or a BD_E_* of the last command */
#define BD_REG_MAX_HOOK_PAGES	0x34	/* R  BD_MAX_HOOK_PAGES */
#define  BD_MAX_HOOK_PAGES	262144	/* 1 GiB */

/* RESULT codes, in no particular order; see below for the check order. */
#define BD_OK			0
#define BD_E_SEALED		1	/* any command after SEAL; counted as tamper */
#define BD_E_ALIGN		2	/* gpa or len not 4-KiB aligned */
#define BD_E_RANGE		3	/* len 0, or not inside one guest RAM range */
#define BD_E_OVERLAP		4	/* overlaps another hook */
#define BD_E_TOO_MANY		5	/* already BD_MAX_HOOKS hooks */
#define BD_E_TOO_LARGE		6	/* more than BD_MAX_HOOK_PAGES pages */
#define BD_E_KIND		7	/* unknown kind */
#define BD_E_PERMS		8	/* perms not allowed for the kind, unknown bits */
#define BD_E_NAME		9	/* empty, unprintable, not NUL-padded, in use */
#define BD_E_DESC		10	/* desc misaligned, not in RAM, reserved/id != 0 */
#define BD_E_NO_HOOK		11	/* UNREGISTER/UPDATE of an unknown id */
#define BD_E_COMMAND		12	/* unknown command code */

/*
 * Hook descriptor, in guest RAM, 8-byte aligned.  The device reports the
 * first failure in this order: E_SEALED, E_DESC (address, then reserved and
 * id), [UPDATE: E_NO_HOOK], E_KIND, E_PERMS, E_NAME, E_ALIGN, E_TOO_LARGE,
 * E_RANGE, E_OVERLAP, E_TOO_MANY.  For UPDATE the hook being updated counts
 * neither as an overlap nor against the limit.
 */
#define BD_HOOK_DESC_SIZE	64
#define BD_HOOK_DESC_ALIGN	8
#define BD_HOOK_NAME_LEN	32

struct bd_hook_desc {
	bd_u64 gpa;			/* start, guest-physical, page aligned */
	bd_u64 len;			/* bytes, a non-zero multiple of a page */
	bd_u32 kind;			/* BD_KIND_* */
#define BD_KIND_PROGRESS_BOX	1
#define BD_KIND_STATE_BOX	2
#define BD_KIND_REPAIR		3
#define BD_KIND_KERNEL		4	/* read-only kernel memory for forensics */
	bd_u32 perms;			/* BD_PERM_*: what a remote may do */
#define BD_PERM_READ		0x1U
#define BD_PERM_WRITE		0x2U
#define BD_PERM_ATOMIC		0x4U
#define BD_PERM_ALL		(BD_PERM_READ | BD_PERM_WRITE | BD_PERM_ATOMIC)
	/* Boxes must be exactly READ; REPAIR needs READ, may add the rest. */
	bd_u32 id;			/* UPDATE: hook to change; REGISTER: 0 */
	bd_u32 reserved;		/* 0 */
	char name[BD_HOOK_NAME_LEN];	/* printable ASCII, NUL-padded, unique */
};

/* ---------------------------------------------------------------------
 * 2. Progress box (BD_KIND_PROGRESS_BOX): a header, then 64-byte counters.
 */
#define BD_PBOX_MAGIC		0x42504442U	/* "BDPB" */
#define BD_PBOX_VERSION		1
#define BD_PBOX_HEADER_SIZE	64
#define BD_COUNTER_SIZE		64
#define BD_COUNTER_NAME_LEN	32

struct bd_pbox_header {
	bd_u32 magic;			/* BD_PBOX_MAGIC */
	bd_u16 version;			/* BD_PBOX_VERSION */
	bd_u16 header_size;		/* BD_PBOX_HEADER_SIZE */
	bd_u32 capacity;		/* counter slots after the header */
	bd_u32 counter_size;		/* BD_COUNTER_SIZE */
	/*
	 * Slots 0..kernel_slots-1 live in memory only the kernel writes;
	 * only they may claim BD_LEVEL_OS.  0: the whole box is the kernel's.
	 */
	bd_u32 kernel_slots;
	bd_u8 reserved[44];
};

/*
 * Only the owner writes a counter, and bumps it with one aligned 8-byte
 * store, so a remote reader never needs a lock.  A monitor calls an ACTIVE
 * counter that has not moved for longer than deadline_ms hung.
 */
struct bd_counter {
	bd_u64 value;			/* liveness count; only increases */
	bd_u32 id;			/* slot index + 1; 0: never used */
	bd_u32 deadline_ms;		/* promised bump interval while ACTIVE */
	bd_u8 state;			/* BD_STATE_* */
#define BD_STATE_FREE		0	/* ignored */
#define BD_STATE_ACTIVE		1	/* judged against deadline_ms */
#define BD_STATE_IDLE		2	/* no work: never hung */
#define BD_STATE_RETIRED	3	/* ignored */
	bd_u8 level;			/* BD_LEVEL_* */
#define BD_LEVEL_OS		1
#define BD_LEVEL_APPLICATION	2
#define BD_LEVEL_SESSION	3
	bd_u16 reserved0;
	bd_u32 owner;			/* owner's id: a pid, a session number */
	char name[BD_COUNTER_NAME_LEN];	/* printable ASCII, NUL-padded */
	bd_u64 reserved1;
};

/* ---------------------------------------------------------------------
 * 3. State box (BD_KIND_STATE_BOX): a header, then slot_count slots of
 * slot_size bytes starting at offset header_size (a multiple of 64: the
 * 64-byte header, padded); each slot holds at most one record: a 64-byte
 * header, then payload_len bytes of payload.
 */
#define BD_SBOX_MAGIC		0x42534442U	/* "BDSB" */
#define BD_SBOX_VERSION		1
#define BD_SBOX_HEADER_SIZE	64		/* the smallest header_size */
#define BD_SBOX_MAX_HEADER_SIZE	0xffc0		/* header_size fits a u16 */
#define BD_SBOX_MIN_SLOT_SIZE	128		/* and a power of two */

struct bd_sbox_header {
	bd_u32 magic;			/* BD_SBOX_MAGIC */
	bd_u16 version;			/* BD_SBOX_VERSION */
	bd_u16 header_size;		/* where slot 0 starts; 64 * n, n >= 1 */
	bd_u32 slot_count;
	bd_u32 slot_size;		/* power of two, >= BD_SBOX_MIN_SLOT_SIZE */
	bd_u8 reserved[48];
};

/*
 * Writer (one per slot): seq += 1 (odd), release fence; write bytes 8..64
 * and the payload, crc32c last; release fence, seq += 1 (even).
 * Reader: seq (s1; 0 empty, odd busy), copy, acquire fence, seq again; a
 * copy with s1 != s2 is torn; a bad payload_len or CRC is corrupt.
 */
#define BD_RECORD_HEADER_SIZE	64
#define BD_RECORD_SERVICE_LEN	16
#define BD_RECORD_CRC_START	8	/* CRC covers record bytes 8..48, */
#define BD_RECORD_CRC_END	48	/* then the payload */
#define BD_CRC32C_POLY		0x82f63b78U	/* Castagnoli, reflected */

struct bd_record {
	bd_u64 seq;			/* seqlock; 0: never written */
	bd_u64 session_id;		/* the session this record continues */
	char service[BD_RECORD_SERVICE_LEN]; /* printable ASCII, NUL-padded */
	bd_u64 version;			/* newest complete version wins */
	bd_u32 stage;			/* service-defined step */
	bd_u32 payload_len;		/* <= slot_size - BD_RECORD_HEADER_SIZE */
	bd_u32 crc32c;			/* over bytes 8..48, then the payload */
	bd_u8 reserved[12];
	/* payload follows at offset BD_RECORD_HEADER_SIZE */
};

#define BD_ABI_OFFSET_CHECK(type, field, off) \
	static_assert(__builtin_offsetof(struct type, field) == (off), \
		       #type "." #field " is at offset " #off)

static_assert(sizeof(struct bd_hook_desc) == BD_HOOK_DESC_SIZE,
	      "bd_hook_desc is 64 bytes");
BD_ABI_OFFSET_CHECK(bd_hook_desc, gpa, 0);
BD_ABI_OFFSET_CHECK(bd_hook_desc, len, 8);
BD_ABI_OFFSET_CHECK(bd_hook_desc, kind, 16);
BD_ABI_OFFSET_CHECK(bd_hook_desc, perms, 20);
BD_ABI_OFFSET_CHECK(bd_hook_desc, id, 24);
BD_ABI_OFFSET_CHECK(bd_hook_desc, reserved, 28);
BD_ABI_OFFSET_CHECK(bd_hook_desc, name, 32);

static_assert(sizeof(struct bd_pbox_header) == BD_PBOX_HEADER_SIZE,
	      "bd_pbox_header is 64 bytes");
BD_ABI_OFFSET_CHECK(bd_pbox_header, magic, 0);
BD_ABI_OFFSET_CHECK(bd_pbox_header, version, 4);
BD_ABI_OFFSET_CHECK(bd_pbox_header, header_size, 6);
BD_ABI_OFFSET_CHECK(bd_pbox_header, capacity, 8);
BD_ABI_OFFSET_CHECK(bd_pbox_header, counter_size, 12);
BD_ABI_OFFSET_CHECK(bd_pbox_header, kernel_slots, 16);
BD_ABI_OFFSET_CHECK(bd_pbox_header, reserved, 20);

static_assert(sizeof(struct bd_counter) == BD_COUNTER_SIZE,
	      "bd_counter is 64 bytes");
BD_ABI_OFFSET_CHECK(bd_counter, value, 0);
BD_ABI_OFFSET_CHECK(bd_counter, id, 8);
BD_ABI_OFFSET_CHECK(bd_counter, deadline_ms, 12);
BD_ABI_OFFSET_CHECK(bd_counter, state, 16);
BD_ABI_OFFSET_CHECK(bd_counter, level, 17);
BD_ABI_OFFSET_CHECK(bd_counter, reserved0, 18);
BD_ABI_OFFSET_CHECK(bd_counter, owner, 20);
BD_ABI_OFFSET_CHECK(bd_counter, name, 24);
BD_ABI_OFFSET_CHECK(bd_counter, reserved1, 56);

static_assert(sizeof(struct bd_sbox_header) == BD_SBOX_HEADER_SIZE,
	      "bd_sbox_header is 64 bytes");
BD_ABI_OFFSET_CHECK(bd_sbox_header, magic, 0);
BD_ABI_OFFSET_CHECK(bd_sbox_header, version, 4);
BD_ABI_OFFSET_CHECK(bd_sbox_header, header_size, 6);
BD_ABI_OFFSET_CHECK(bd_sbox_header, slot_count, 8);
BD_ABI_OFFSET_CHECK(bd_sbox_header, slot_size, 12);
BD_ABI_OFFSET_CHECK(bd_sbox_header, reserved, 16);

static_assert(sizeof(struct bd_record) == BD_RECORD_HEADER_SIZE,
	      "bd_record header is 64 bytes");
BD_ABI_OFFSET_CHECK(bd_record, seq, 0);
BD_ABI_OFFSET_CHECK(bd_record, session_id, 8);
BD_ABI_OFFSET_CHECK(bd_record, service, 16);
BD_ABI_OFFSET_CHECK(bd_record, version, 32);
BD_ABI_OFFSET_CHECK(bd_record, stage, 40);
BD_ABI_OFFSET_CHECK(bd_record, payload_len, 44);
BD_ABI_OFFSET_CHECK(bd_record, crc32c, 48);
BD_ABI_OFFSET_CHECK(bd_record, reserved, 52);

#endif /* BACKDOOR_ABI_H */
