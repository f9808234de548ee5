// SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause
/*
 * Portable guest-side helpers for the backdoor ABI (docs/abi.md).
 * No libc, no kernel headers: see backdoor_guest.h.
 */
#include "backdoor_guest.h"

/* Reflected CRC32C table for polynomial 0x82f63b78 (generated offline). */
static const bd_u32 bd_crc32c_table[256] = {
	0x00000000, 0xf26b8303, 0xe13b70f7, 0x1350f3f4,
	0xc79a971f, 0x35f1141c, 0x26a1e7e8, 0xd4ca64eb,
	0x8ad958cf, 0x78b2dbcc, 0x6be22838, 0x9989ab3b,
	0x4d43cfd0, 0xbf284cd3, 0xac78bf27, 0x5e133c24,
	0x105ec76f, 0xe235446c, 0xf165b798, 0x030e349b,
	0xd7c45070, 0x25afd373, 0x36ff2087, 0xc494a384,
	0x9a879fa0, 0x68ec1ca3, 0x7bbcef57, 0x89d76c54,
	0x5d1d08bf, 0xaf768bbc, 0xbc267848, 0x4e4dfb4b,
	0x20bd8ede, 0xd2d60ddd, 0xc186fe29, 0x33ed7d2a,
	0xe72719c1, 0x154c9ac2, 0x061c6936, 0xf477ea35,
	0xaa64d611, 0x580f5512, 0x4b5fa6e6, 0xb93425e5,
	0x6dfe410e, 0x9f95c20d, 0x8cc531f9, 0x7eaeb2fa,
	0x30e349b1, 0xc288cab2, 0xd1d83946, 0x23b3ba45,
	0xf779deae, 0x05125dad, 0x1642ae59, 0xe4292d5a,
	0xba3a117e, 0x4851927d, 0x5b016189, 0xa96ae28a,
	0x7da08661, 0x8fcb0562, 0x9c9bf696, 0x6ef07595,
	0x417b1dbc, 0xb3109ebf, 0xa0406d4b, 0x522bee48,
	0x86e18aa3, 0x748a09a0, 0x67dafa54, 0x95b17957,
	0xcba24573, 0x39c9c670, 0x2a993584, 0xd8f2b687,
	0x0c38d26c, 0xfe53516f, 0xed03a29b, 0x1f682198,
	0x5125dad3, 0xa34e59d0, 0xb01eaa24, 0x42752927,
	0x96bf4dcc, 0x64d4cecf, 0x77843d3b, 0x85efbe38,
	0xdbfc821c, 0x2997011f, 0x3ac7f2eb, 0xc8ac71e8,
	0x1c661503, 0xee0d9600, 0xfd5d65f4, 0x0f36e6f7,
	0x61c69362, 0x93ad1061, 0x80fde395, 0x72966096,
	0xa65c047d, 0x5437877e, 0x4767748a, 0xb50cf789,
	0xeb1fcbad, 0x197448ae, 0x0a24bb5a, 0xf84f3859,
	0x2c855cb2, 0xdeeedfb1, 0xcdbe2c45, 0x3fd5af46,
	0x7198540d, 0x83f3d70e, 0x90a324fa, 0x62c8a7f9,
	0xb602c312, 0x44694011, 0x5739b3e5, 0xa55230e6,
	0xfb410cc2, 0x092a8fc1, 0x1a7a7c35, 0xe811ff36,
	0x3cdb9bdd, 0xceb018de, 0xdde0eb2a, 0x2f8b6829,
	0x82f63b78, 0x709db87b, 0x63cd4b8f, 0x91a6c88c,
	0x456cac67, 0xb7072f64, 0xa457dc90, 0x563c5f93,
	0x082f63b7, 0xfa44e0b4, 0xe9141340, 0x1b7f9043,
	0xcfb5f4a8, 0x3dde77ab, 0x2e8e845f, 0xdce5075c,
	0x92a8fc17, 0x60c37f14, 0x73938ce0, 0x81f80fe3,
	0x55326b08, 0xa759e80b, 0xb4091bff, 0x466298fc,
	0x1871a4d8, 0xea1a27db, 0xf94ad42f, 0x0b21572c,
	0xdfeb33c7, 0x2d80b0c4, 0x3ed04330, 0xccbbc033,
	0xa24bb5a6, 0x502036a5, 0x4370c551, 0xb11b4652,
	0x65d122b9, 0x97baa1ba, 0x84ea524e, 0x7681d14d,
	0x2892ed69, 0xdaf96e6a, 0xc9a99d9e, 0x3bc21e9d,
	0xef087a76, 0x1d63f975, 0x0e330a81, 0xfc588982,
	0xb21572c9, 0x407ef1ca, 0x532e023e, 0xa145813d,
	0x758fe5d6, 0x87e466d5, 0x94b49521, 0x66df1622,
	0x38cc2a06, 0xcaa7a905, 0xd9f75af1, 0x2b9cd9f2,
	0xff56bd19, 0x0d3d3e1a, 0x1e6dcdee, 0xec064eed,
	0xc38d26c4, 0x31e6a5c7, 0x22b65633, 0xd0ddd530,
	0x0417b1db, 0xf67c32d8, 0xe52cc12c, 0x1747422f,
	0x49547e0b, 0xbb3ffd08, 0xa86f0efc, 0x5a048dff,
	0x8ecee914, 0x7ca56a17, 0x6ff599e3, 0x9d9e1ae0,
	0xd3d3e1ab, 0x21b862a8, 0x32e8915c, 0xc083125f,
	0x144976b4, 0xe622f5b7, 0xf5720643, 0x07198540,
	0x590ab964, 0xab613a67, 0xb831c993, 0x4a5a4a90,
	0x9e902e7b, 0x6cfbad78, 0x7fab5e8c, 0x8dc0dd8f,
	0xe330a81a, 0x115b2b19, 0x020bd8ed, 0xf0605bee,
	0x24aa3f05, 0xd6c1bc06, 0xc5914ff2, 0x37faccf1,
	0x69e9f0d5, 0x9b8273d6, 0x88d28022, 0x7ab90321,
	0xae7367ca, 0x5c18e4c9, 0x4f48173d, 0xbd23943e,
	0xf36e6f75, 0x0105ec76, 0x12551f82, 0xe03e9c81,
	0x34f4f86a, 0xc69f7b69, 0xd5cf889d, 0x27a40b9e,
	0x79b737ba, 0x8bdcb4b9, 0x988c474d, 0x6ae7c44e,
	0xbe2da0a5, 0x4c4623a6, 0x5f16d052, 0xad7d5351,
};

bd_u32 bd_crc32c(bd_u32 crc, const void *buf, bd_u64 len)
{
	const bd_u8 *p = buf;

	/* Standard convention: invert in, invert out, so calls chain. */
	crc = ~crc;
	while (len--)
		crc = bd_crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static void bd_zero(void *mem, bd_u64 bytes)
{
	bd_u8 *p = mem;

	while (bytes--)
		*p++ = 0;
}

/*
 * Copies a printable-ASCII string NUL-padded into @dst.  Returns its length,
 * or -1 if it is empty, unprintable or longer than @size (dst untouched).
 */
static int bd_copy_name(char *dst, const char *src, unsigned int size)
{
	unsigned int n, i;

	if (!src)
		return -1;
	for (n = 0; src[n]; n++) {
		if (n == size)
			return -1;
		if ((unsigned char)src[n] < 0x20 || (unsigned char)src[n] > 0x7e)
			return -1;
	}
	if (!n)
		return -1;
	for (i = 0; i < size; i++)
		dst[i] = i < n ? src[i] : '\0';
	return n;
}

static void bd_copy(void *dst, const void *src, bd_u64 bytes)
{
	const bd_u8 *s = src;
	bd_u8 *d = dst;

	while (bytes--)
		*d++ = *s++;
}

static int bd_aligned8(const void *p)
{
	return !((unsigned long)p & 7);
}

/* ---- progress box ------------------------------------------------------ */

int bd_pbox_init(void *mem, bd_u64 bytes)
{
	struct bd_pbox_header *h = mem;
	bd_u64 cap;

	if (!mem || !bd_aligned8(mem) ||
	    bytes < BD_PBOX_HEADER_SIZE + BD_COUNTER_SIZE)
		return -1;
	cap = (bytes - BD_PBOX_HEADER_SIZE) / BD_COUNTER_SIZE;
	/* Keep the count representable both in the header and as an int. */
	if (cap > 0x7fffffff)
		cap = 0x7fffffff;

	bd_zero(mem, BD_PBOX_HEADER_SIZE + cap * BD_COUNTER_SIZE);
	h->version = BD_PBOX_VERSION;
	h->header_size = BD_PBOX_HEADER_SIZE;
	h->capacity = (bd_u32)cap;
	h->counter_size = BD_COUNTER_SIZE;
	h->magic = BD_PBOX_MAGIC;
	return (int)cap;
}

static struct bd_counter *bd_pbox_counters(void *box)
{
	return (struct bd_counter *)((bd_u8 *)box + BD_PBOX_HEADER_SIZE);
}

struct bd_counter *bd_counter_alloc(void *box, const char *name,
				    bd_u32 deadline_ms, bd_u8 level,
				    bd_u32 owner)
{
	struct bd_pbox_header *h = box;
	struct bd_counter *c;
	char tmp[BD_COUNTER_NAME_LEN];
	bd_u32 i;

	if (!box || h->magic != BD_PBOX_MAGIC)
		return (void *)0;
	if (level < BD_LEVEL_OS || level > BD_LEVEL_SESSION)
		return (void *)0;
	if (bd_copy_name(tmp, name, sizeof(tmp)) < 0)
		return (void *)0;

	c = bd_pbox_counters(box);
	for (i = 0; i < h->capacity; i++, c++) {
		if (c->state != BD_STATE_FREE)
			continue;
		c->value = 0;
		c->id = i + 1;
		c->deadline_ms = deadline_ms;
		c->level = level;
		c->reserved0 = 0;
		c->owner = owner;
		bd_copy(c->name, tmp, sizeof(c->name));
		c->reserved1 = 0;
		/* A monitor that sees ACTIVE must also see the fields above. */
		__atomic_thread_fence(__ATOMIC_RELEASE);
		BD_STORE_ONCE(c->state, BD_STATE_ACTIVE);
		return c;
	}
	return (void *)0;
}

static void bd_counter_set_state(struct bd_counter *c, bd_u8 state)
{
	__atomic_thread_fence(__ATOMIC_RELEASE);
	BD_STORE_ONCE(c->state, state);
}

/*
 * Going idle or active is not a bump: a monitor restarts its deadline clock
 * when it sees the state change, not the value.
 */
void bd_counter_idle(struct bd_counter *c)
{
	bd_counter_set_state(c, BD_STATE_IDLE);
}

void bd_counter_active(struct bd_counter *c)
{
	bd_counter_set_state(c, BD_STATE_ACTIVE);
}

/* Retired slots are never reused, so a monitor never mixes two owners. */
void bd_counter_retire(struct bd_counter *c)
{
	bd_counter_set_state(c, BD_STATE_RETIRED);
}

/* ---- state box --------------------------------------------------------- */

int bd_sbox_init(void *mem, bd_u64 bytes, bd_u32 slot_size)
{
	return bd_sbox_init_at(mem, bytes, slot_size, BD_SBOX_HEADER_SIZE);
}

int bd_sbox_init_at(void *mem, bd_u64 bytes, bd_u32 slot_size,
		    bd_u32 header_size)
{
	struct bd_sbox_header *h = mem;
	bd_u64 count;

	if (!mem || !bd_aligned8(mem))
		return -1;
	if (slot_size < BD_SBOX_MIN_SLOT_SIZE || (slot_size & (slot_size - 1)))
		return -1;
	if (header_size < BD_SBOX_HEADER_SIZE ||
	    header_size > BD_SBOX_MAX_HEADER_SIZE ||
	    header_size % BD_SBOX_HEADER_SIZE)
		return -1;
	if (bytes < header_size + (bd_u64)slot_size)
		return -1;
	count = (bytes - header_size) / slot_size;
	if (count > 0x7fffffff)
		count = 0x7fffffff;

	bd_zero(mem, header_size + count * slot_size);
	h->version = BD_SBOX_VERSION;
	h->header_size = (bd_u16)header_size;
	h->slot_count = (bd_u32)count;
	h->slot_size = slot_size;
	h->magic = BD_SBOX_MAGIC;
	return (int)count;
}

void *bd_sbox_slot(void *box, bd_u32 i)
{
	struct bd_sbox_header *h = box;

	/* Re-check slot_size: bd_record_write's bound relies on it. */
	if (!box || h->magic != BD_SBOX_MAGIC || i >= h->slot_count ||
	    h->slot_size < BD_SBOX_MIN_SLOT_SIZE ||
	    h->header_size < BD_SBOX_HEADER_SIZE)
		return (void *)0;
	return (bd_u8 *)box + h->header_size + (bd_u64)i * h->slot_size;
}

int bd_record_write(void *box, bd_u32 slot, const char *service,
		    bd_u64 session_id, bd_u64 version, bd_u32 stage,
		    const void *payload, bd_u32 len)
{
	struct bd_sbox_header *h = box;
	void *r;

	if (!box || h->magic != BD_SBOX_MAGIC)
		return BD_REC_EBOX;
	r = bd_sbox_slot(box, slot);
	if (!r)
		return BD_REC_ESLOT;
	return bd_slot_write(r, h->slot_size, service, session_id, version,
			     stage, payload, len);
}

int bd_slot_write(void *slot, bd_u32 slot_size, const char *service,
		  bd_u64 session_id, bd_u64 version, bd_u32 stage,
		  const void *payload, bd_u32 len)
{
	struct bd_record hdr, *r = slot;
	bd_u64 seq;

	if (!slot || !bd_aligned8(slot) || slot_size < BD_SBOX_MIN_SLOT_SIZE)
		return BD_REC_ESLOT;
	if (len > slot_size - BD_RECORD_HEADER_SIZE)
		return BD_REC_E2BIG;
	if (len && !payload)
		return BD_REC_EBOX;

	bd_zero(&hdr, sizeof(hdr));
	if (bd_copy_name(hdr.service, service, sizeof(hdr.service)) < 0)
		return BD_REC_ESERVICE;
	hdr.session_id = session_id;
	hdr.version = version;
	hdr.stage = stage;
	hdr.payload_len = len;
	/*
	 * The CRC (header bytes 8..48, then the payload) is computed before
	 * the write begins: it is the slow part, and every moment seq is odd
	 * is a moment a monitor cannot read the slot.
	 */
	hdr.crc32c = bd_crc32c(0, (bd_u8 *)&hdr + BD_RECORD_CRC_START,
			       BD_RECORD_CRC_END - BD_RECORD_CRC_START);
	hdr.crc32c = bd_crc32c(hdr.crc32c, payload, len);

	/*
	 * seq + 1 makes it odd.  If a previous writer died mid-write (seq
	 * already odd), step by 2 so it stays odd: the half-written record must
	 * never look complete.
	 */
	seq = BD_LOAD_ONCE(r->seq);
	seq += (seq & 1) ? 2 : 1;
	BD_STORE_ONCE(r->seq, seq);
	__atomic_thread_fence(__ATOMIC_RELEASE);

	/* Bytes 8..48 and 52..64, the payload, then crc32c last. */
	bd_copy((bd_u8 *)r + BD_RECORD_CRC_START,
		(bd_u8 *)&hdr + BD_RECORD_CRC_START,
		BD_RECORD_CRC_END - BD_RECORD_CRC_START);
	bd_copy(r->reserved, hdr.reserved, sizeof(r->reserved));
	bd_copy((bd_u8 *)r + BD_RECORD_HEADER_SIZE, payload, len);
	r->crc32c = hdr.crc32c;

	__atomic_thread_fence(__ATOMIC_RELEASE);
	BD_STORE_ONCE(r->seq, seq + 1);
	return 0;
}

/* ---- the device -------------------------------------------------------- */

bd_u64 bd_mmio_accesses;

#ifndef BD_GUEST_EXTERNAL_MMIO
/*
 * Identity-mapped guests reach the registers with single plain accesses.
 * The Linux driver defines BD_GUEST_EXTERNAL_MMIO and supplies these with
 * readl/writel on its ioremap()ed base.
 */
static bd_u32 bd_mmio_read32(unsigned long addr)
{
	return BD_LOAD_ONCE(*(bd_u32 *)addr);
}

static void bd_mmio_write32(unsigned long addr, bd_u32 v)
{
	BD_STORE_ONCE(*(bd_u32 *)addr, v);
}
#endif

bd_u32 bd_reg_read(unsigned long base, bd_u32 off)
{
	bd_u32 v;

	bd_mmio_accesses++;
	v = bd_mmio_read32(base + off);
	/* Later memory accesses must not move before the register read. */
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	return v;
}

void bd_reg_write(unsigned long base, bd_u32 off, bd_u32 v)
{
	bd_mmio_accesses++;
	/* The device reads the descriptor when COMMAND is written. */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	bd_mmio_write32(base + off, v);
}

int bd_dev_probe(unsigned long base)
{
	if (!base)
		return -1;
	if (bd_reg_read(base, BD_REG_MAGIC) != BD_DEV_MAGIC)
		return -2;
	if (bd_reg_read(base, BD_REG_VERSION) != BD_ABI_VERSION)
		return -3;
	return 0;
}

int bd_hook_desc_fill(struct bd_hook_desc *d, bd_u64 gpa, bd_u64 len,
		      bd_u32 kind, bd_u32 perms, const char *name)
{
	unsigned int i;

	bd_zero(d, sizeof(*d));
	d->gpa = gpa;
	d->len = len;
	d->kind = kind;
	d->perms = perms;
	if (!name)
		return 0;
	/* Copied as is, unprintable bytes included: tests send bad names. */
	for (i = 0; name[i]; i++) {
		if (i == sizeof(d->name))
			return -1;
		d->name[i] = name[i];
	}
	return 0;
}

bd_u32 bd_command(unsigned long base, bd_u32 cmd)
{
	bd_reg_write(base, BD_REG_COMMAND, cmd);
	return bd_reg_read(base, BD_REG_RESULT);
}

bd_u32 bd_desc_command(unsigned long base, bd_u32 cmd, bd_u64 desc_gpa)
{
	bd_reg_write(base, BD_REG_DESC_ADDR_LO, (bd_u32)desc_gpa);
	bd_reg_write(base, BD_REG_DESC_ADDR_HI, (bd_u32)(desc_gpa >> 32));
	return bd_command(base, cmd);
}

bd_u32 bd_hook_register(unsigned long base, struct bd_hook_desc *d,
			bd_u32 *id_out)
{
	bd_u32 res = bd_desc_command(base, BD_CMD_REGISTER, (unsigned long)d);

	if (id_out)
		*id_out = res == BD_OK ? bd_reg_read(base, BD_REG_HOOK_ID) : 0;
	return res;
}

bd_u32 bd_hook_unregister(unsigned long base, bd_u32 id)
{
	bd_reg_write(base, BD_REG_HOOK_ID, id);
	return bd_command(base, BD_CMD_UNREGISTER);
}

bd_u32 bd_hook_update(unsigned long base, struct bd_hook_desc *d)
{
	return bd_desc_command(base, BD_CMD_UPDATE, (unsigned long)d);
}

bd_u32 bd_seal(unsigned long base)
{
	return bd_command(base, BD_CMD_SEAL);
}
