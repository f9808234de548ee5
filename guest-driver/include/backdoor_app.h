/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause */
/*
 * backdoor_app.h: progress counters, service continuations and the inbox
 * for C applications in a Linux guest running backdoor.ko
 * (docs/guest-driver.md; the example is examples/counter_and_service.c).
 *
 *	int fd = bd_app_open();			// /dev/backdoor
 *	struct bd_app_counter c;
 *	struct bd_app_service svc;
 *
 *	bd_app_counter_alloc(fd, "myapp", 1000, BD_LEVEL_APPLICATION, &c);
 *	bd_app_service_open(fd, "myapp", 8, 1, &svc);
 *	for (;;) {
 *		... one step of work on session 42 ...
 *		bd_app_slot_write(&svc, 0, 42, version, stage, buf, len);
 *		bd_app_bump(&c);		// one store: no syscall, no exit
 *	}
 *
 * A bump and a record write are stores into memory the driver mapped into
 * the process; only allocation and IDLE/ACTIVE changes are system calls.
 * Counters retire when the file is closed (the process exits); the
 * service's area stays, and a restarted instance that opens the same name
 * finds its records again (bd_app_slot_read).
 *
 * Every function returns 0 (or a count) on success and a negative errno on
 * failure, and sets nothing else.  Link lib/backdoor_guest.c (the record
 * writer and CRC32C); compile with -Iguest-driver/include and a POSIX
 * feature level (gnu99 or later, or _DEFAULT_SOURCE).
 */
#ifndef BACKDOOR_APP_H
#define BACKDOOR_APP_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backdoor_guest.h"
#include "backdoor_uapi.h"

/* What bd_app_slot_read and bd_app_inbox_read found (>= 0). */
#define BD_APP_RECORD	0	/* a complete record, CRC checked */
#define BD_APP_EMPTY	1	/* never written, or wiped */
#define BD_APP_TORN	2	/* mid-write on every try: a writer died */
#define BD_APP_CORRUPT	3	/* complete, but bad length or CRC */

/* How often a reader re-reads a slot that changes under it. */
#define BD_APP_READ_RETRIES	8

static inline long bd_app_page_size(void)
{
	long n = sysconf(_SC_PAGESIZE);

	return n > 0 ? n : BD_PAGE_SIZE;
}

/* Opens the driver's device at @path, close-on-exec; fd or -errno. */
static inline int bd_app_open_path(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : fd;
}

/* Opens /dev/backdoor; -ENOENT usually means backdoor.ko is not loaded. */
static inline int bd_app_open(void)
{
	return bd_app_open_path(BACKDOOR_DEVICE_PATH);
}

/* What the driver set up; -ENOTTY if @fd is not the backdoor driver. */
static inline int bd_app_info(int fd, struct bd_ioc_info *info)
{
	memset(info, 0, sizeof(*info));
	return ioctl(fd, BD_IOC_INFO, info) < 0 ? -errno : 0;
}

/* Copies @s NUL-padded into a @size-byte field; -EINVAL if it is too long. */
static inline int bd_app_name(char *field, size_t size, const char *s)
{
	size_t n = s ? strlen(s) : 0;

	if (!n || n > size)
		return -EINVAL;
	memset(field, 0, size);
	memcpy(field, s, n);
	return 0;
}

/* ---- progress counters --------------------------------------------------- */

struct bd_app_counter {
	struct bd_counter *c;	/* inside the mapped page */
	void *page;		/* the mapping, one page */
	__u32 id;		/* what monitors see */
};

/*
 * Allocates an ACTIVE counter, bumped at least every @deadline_ms while
 * active, at @level (BD_LEVEL_APPLICATION or BD_LEVEL_SESSION), owned by
 * this process, and maps it.  -ENOSPC: the progress box is full.
 */
static inline int bd_app_counter_alloc(int fd, const char *name,
				       __u32 deadline_ms, __u8 level,
				       struct bd_app_counter *out)
{
	struct bd_ioc_counter req;
	struct bd_ioc_counter_state st;
	long page = bd_app_page_size();
	void *map;
	int err;

	memset(&req, 0, sizeof(req));
	memset(out, 0, sizeof(*out));
	if (bd_app_name(req.name, sizeof(req.name), name))
		return -EINVAL;
	req.deadline_ms = deadline_ms;
	req.level = level;
	if (ioctl(fd, BD_IOC_COUNTER_ALLOC, &req) < 0)
		return -errno;
	if (req.offset_in_map % BD_COUNTER_SIZE ||
	    req.offset_in_map + BD_COUNTER_SIZE > (__u64)page) {
		err = -EPROTO;
		goto fail;
	}
	map = mmap(NULL, (size_t)page, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
		   (off_t)req.mmap_offset);
	if (map == MAP_FAILED) {
		err = -errno;
		goto fail;
	}
	out->page = map;
	out->c = (struct bd_counter *)((char *)map + req.offset_in_map);
	out->id = req.id;
	return 0;
fail:
	st.id = req.id;
	st.state = 0;
	ioctl(fd, BD_IOC_COUNTER_FREE, &st);
	return err;
}

/* The hot path: one store into the mapped counter. */
static inline void bd_app_bump(struct bd_app_counter *c)
{
	bd_counter_bump(c->c);
}

static inline int bd_app_counter_state(int fd, struct bd_app_counter *c,
				       __u32 state)
{
	struct bd_ioc_counter_state st = { .id = c->id, .state = state };

	/* A bump first: the last value a monitor saw ACTIVE is fresh. */
	bd_counter_bump(c->c);
	return ioctl(fd, BD_IOC_COUNTER_STATE, &st) < 0 ? -errno : 0;
}

/* No work for now: monitors never call an IDLE counter hung. */
static inline int bd_app_counter_idle(int fd, struct bd_app_counter *c)
{
	return bd_app_counter_state(fd, c, BD_STATE_IDLE);
}

/* Work again: the deadline applies from now. */
static inline int bd_app_counter_active(int fd, struct bd_app_counter *c)
{
	return bd_app_counter_state(fd, c, BD_STATE_ACTIVE);
}

/* Retires the counter now (closing @fd retires every counter of it). */
static inline int bd_app_counter_free(int fd, struct bd_app_counter *c)
{
	struct bd_ioc_counter_state st = { .id = c->id, .state = 0 };
	int err = ioctl(fd, BD_IOC_COUNTER_FREE, &st) < 0 ? -errno : 0;

	if (c->page)
		munmap(c->page, (size_t)bd_app_page_size());
	memset(c, 0, sizeof(*c));
	return err;
}

/* ---- reading records ------------------------------------------------------ */

/*
 * Reads the record in the @slot_size-byte slot at @slot (8-byte aligned)
 * with the docs/abi.md seqlock protocol: the header into *@hdr and the
 * payload (hdr->payload_len bytes) into @payload, which holds @cap bytes.
 * Returns a BD_APP_* outcome, -ENOSPC if the payload exceeds @cap, or
 * -EINVAL on bad arguments.
 */
static inline int bd_app_read_slot(const void *slot, __u32 slot_size,
				   struct bd_record *hdr, void *payload,
				   __u32 cap)
{
	const bd_u64 *w = (const bd_u64 *)slot;
	bd_u64 s1, s2, word, *h = (bd_u64 *)hdr;
	unsigned int tries, i;
	__u32 len, crc;

	if (!slot || (uintptr_t)slot % 8 || slot_size % 8 ||
	    slot_size < BD_SBOX_MIN_SLOT_SIZE || !hdr || (cap && !payload))
		return -EINVAL;
	for (tries = 0; tries <= BD_APP_READ_RETRIES; tries++) {
		s1 = __atomic_load_n(&w[0], __ATOMIC_ACQUIRE);
		if (!s1)
			return BD_APP_EMPTY;
		if (s1 & 1)
			continue;
		/* Word by word: the writer may change bytes under us. */
		for (i = 0; i < BD_RECORD_HEADER_SIZE / 8; i++)
			h[i] = __atomic_load_n(&w[i], __ATOMIC_RELAXED);
		len = hdr->payload_len;
		if (len <= slot_size - BD_RECORD_HEADER_SIZE && len <= cap) {
			for (i = 0; i < len; i += 8) {
				word = __atomic_load_n(&w[8 + i / 8],
						       __ATOMIC_RELAXED);
				memcpy((char *)payload + i, &word,
				       len - i < 8 ? len - i : 8);
			}
		}
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		s2 = __atomic_load_n(&w[0], __ATOMIC_RELAXED);
		if (s1 != s2)
			continue;
		hdr->seq = s1;
		if (len > slot_size - BD_RECORD_HEADER_SIZE)
			return BD_APP_CORRUPT;
		if (len > cap)
			return -ENOSPC;
		crc = bd_crc32c(0, (const char *)hdr + BD_RECORD_CRC_START,
				BD_RECORD_CRC_END - BD_RECORD_CRC_START);
		crc = bd_crc32c(crc, payload, len);
		return crc == hdr->crc32c ? BD_APP_RECORD : BD_APP_CORRUPT;
	}
	return BD_APP_TORN;
}

/* ---- service continuations ------------------------------------------------ */

struct bd_app_service {
	unsigned char *base;	/* slot 0 of the area */
	size_t len;		/* slot_count * slot_size */
	__u32 slot_count;
	__u32 slot_size;	/* a multiple of the page size */
	__u32 first_slot;	/* where monitors see slot 0 in the state box */
	int created;		/* 1: new area, nothing to resume */
	char name[BD_SERVICE_LEN + 1];
};

/*
 * Opens service @name's area (1 to 16 printable characters); with @create,
 * makes one of @slots slots if there is none.  This file then holds the
 * service until it is closed: -EBUSY while another file holds it,
 * -ENOENT if it does not exist and @create is 0, -ENOSPC if no @slots
 * free slots lie in a row.  The area is mapped read-write.
 */
static inline int bd_app_service_open(int fd, const char *name, __u32 slots,
				      int create, struct bd_app_service *out)
{
	struct bd_ioc_svc req;
	void *map;

	memset(&req, 0, sizeof(req));
	memset(out, 0, sizeof(*out));
	if (bd_app_name(req.service, sizeof(req.service), name))
		return -EINVAL;
	req.slots = slots;
	req.flags = create ? BD_SVC_CREATE : 0;
	if (ioctl(fd, BD_IOC_SVC_OPEN, &req) < 0)
		return -errno;
	if (!req.slot_count || req.slot_size < BD_SBOX_MIN_SLOT_SIZE ||
	    req.slot_size % 8)
		return -EPROTO;
	out->len = (size_t)req.slot_count * req.slot_size;
	map = mmap(NULL, out->len, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
		   (off_t)req.mmap_offset);
	if (map == MAP_FAILED)
		return -errno;
	out->base = (unsigned char *)map;
	out->slot_count = req.slot_count;
	out->slot_size = req.slot_size;
	out->first_slot = req.first_slot;
	out->created = req.created != 0;
	memcpy(out->name, req.service, BD_SERVICE_LEN);
	return 0;
}

/* Slot @i of the area, or NULL. */
static inline void *bd_app_slot(const struct bd_app_service *s, __u32 i)
{
	return i < s->slot_count ? s->base + (size_t)i * s->slot_size : NULL;
}

/*
 * Writes a record of this service into slot @i (one writer per slot).  A
 * process that dies mid-write leaves the slot torn, so keep two slots per
 * session and alternate (version & 1).  -E2BIG: the payload does not fit.
 */
static inline int bd_app_slot_write(const struct bd_app_service *s, __u32 i,
				    __u64 session_id, __u64 version,
				    __u32 stage, const void *payload, __u32 len)
{
	void *slot = bd_app_slot(s, i);
	int r;

	if (!slot)
		return -ERANGE;
	r = bd_slot_write(slot, s->slot_size, s->name, session_id, version,
			  stage, payload, len);
	if (r == BD_REC_E2BIG)
		return -E2BIG;
	return r ? -EINVAL : 0;
}

/* Reads slot @i of the area: see bd_app_read_slot. */
static inline int bd_app_slot_read(const struct bd_app_service *s, __u32 i,
				   struct bd_record *hdr, void *payload,
				   __u32 cap)
{
	void *slot = bd_app_slot(s, i);

	if (!slot)
		return -ERANGE;
	return bd_app_read_slot(slot, s->slot_size, hdr, payload, cap);
}

/* Empties slot @i: readers see it as never written. */
static inline int bd_app_slot_clear(const struct bd_app_service *s, __u32 i)
{
	bd_u64 *seq = (bd_u64 *)bd_app_slot(s, i);

	if (!seq)
		return -ERANGE;
	__atomic_store_n(seq, 0, __ATOMIC_RELEASE);
	return 0;
}

/* Unmaps the area; the file keeps holding the service until closed. */
static inline void bd_app_service_unmap(struct bd_app_service *s)
{
	if (s->base)
		munmap(s->base, s->len);
	s->base = NULL;
}

/* Gives the area back: its records are wiped, its sessions end for good. */
static inline int bd_app_service_delete(int fd, struct bd_app_service *s)
{
	int err = ioctl(fd, BD_IOC_SVC_DELETE) < 0 ? -errno : 0;

	bd_app_service_unmap(s);
	return err;
}

/* ---- the inbox ------------------------------------------------------------ */

/*
 * Sessions a repair monitor handed over with `bdctl resume --hook inbox
 * --slot-size <slot_size>`: a doorbell (records delivered) at offset 8,
 * records in slots of slot_size bytes from offset 64.  Read-only.
 */
struct bd_app_inbox {
	const unsigned char *base;
	size_t len;
	__u32 slot_size;
	__u32 capacity;		/* record slots */
};

/* Maps the inbox; -ENODEV if the driver has none. */
static inline int bd_app_inbox_map(int fd, struct bd_app_inbox *ib)
{
	struct bd_ioc_info info;
	void *map;
	int err;

	memset(ib, 0, sizeof(*ib));
	err = bd_app_info(fd, &info);
	if (err)
		return err;
	if (!info.inbox_len)
		return -ENODEV;
	if (info.inbox_slot_size < BD_SBOX_MIN_SLOT_SIZE ||
	    info.inbox_slot_size % 8 ||
	    info.inbox_len < 64 + info.inbox_slot_size)
		return -EPROTO;
	map = mmap(NULL, info.inbox_len, PROT_READ, MAP_SHARED, fd,
		   (off_t)info.inbox_mmap_offset);
	if (map == MAP_FAILED)
		return -errno;
	ib->base = (const unsigned char *)map;
	ib->len = info.inbox_len;
	ib->slot_size = info.inbox_slot_size;
	ib->capacity = (__u32)((info.inbox_len - 64) / info.inbox_slot_size);
	return 0;
}

/* Records delivered so far (the monitor rings the doorbell last). */
static inline __u32 bd_app_inbox_delivered(const struct bd_app_inbox *ib)
{
	bd_u64 n = __atomic_load_n((const bd_u64 *)(ib->base + 8),
				   __ATOMIC_ACQUIRE);

	return n < ib->capacity ? (__u32)n : ib->capacity;
}

/* Reads delivered record @k: see bd_app_read_slot. */
static inline int bd_app_inbox_read(const struct bd_app_inbox *ib, __u32 k,
				    struct bd_record *hdr, void *payload,
				    __u32 cap)
{
	if (k >= ib->capacity)
		return -ERANGE;
	return bd_app_read_slot(ib->base + 64 + (size_t)k * ib->slot_size,
				ib->slot_size, hdr, payload, cap);
}

static inline void bd_app_inbox_unmap(struct bd_app_inbox *ib)
{
	if (ib->base)
		munmap((void *)ib->base, ib->len);
	ib->base = NULL;
}

#endif /* BACKDOOR_APP_H */
