/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause */
/*
 * /dev/backdoor: the interface between the backdoor.ko driver and guest
 * applications (docs/guest-driver.md).  Applications normally use it
 * through backdoor_app.h (C) or the backdoor-guest crate (Rust), which
 * mirrors this file; a test checks the two against each other.
 *
 * The model:
 *  - Progress counters.  COUNTER_ALLOC gives the calling file a counter in
 *    the progress box.  Each open file owns whole pages of the box, so
 *    mmap(fd, mmap_offset) maps the caller's own counters and nobody
 *    else's: a bump is then one store, with no syscall and no VM exit.
 *    When the file is released (the owner exited), its counters are
 *    RETIRED and its pages return to the pool.
 *  - Service continuations.  SVC_OPEN finds a service's area by name, or
 *    creates it.  The area (whole page-sized slots of the state box) is
 *    kept by the driver when the service exits or crashes, so a restarted
 *    instance that opens the same name finds its sessions again; only
 *    SVC_DELETE gives it back.  At most one open file holds a service at a
 *    time (EBUSY otherwise), so two instances never write the same slots.
 *  - The inbox: a REPAIR hook (named "inbox") that a repair monitor writes
 *    with `bdctl resume --hook inbox`: a u64 doorbell at offset 8 counting
 *    the records delivered, and records (docs/abi.md format) in slots of
 *    inbox_slot_size bytes from offset 64.  Applications map it read-only
 *    and adopt the sessions of their service: how sessions extracted from
 *    a hung guest reach a healthy one.
 *
 * All structures have explicit padding; reserved fields must be zero.
 */
#ifndef BACKDOOR_UAPI_H
#define BACKDOOR_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define BACKDOOR_DEVICE_PATH	"/dev/backdoor"
#define BD_IOC_MAGIC		0xbd

#define BD_NAME_LEN		32	/* counter names, as in struct bd_counter */
#define BD_SERVICE_LEN		16	/* service names, as in struct bd_record */

/* BD_IOC_INFO: what the driver set up at load time. */
struct bd_ioc_info {
	__u32 abi_version;	/* BD_ABI_VERSION of the device */
	__u32 generation;	/* the device's GENERATION */
	__u32 sealed;		/* 1 once the hooks are sealed */
	__u32 counters_total;	/* counter slots applications may use */
	__u32 counters_free;
	__u32 slots_total;	/* state-box slots */
	__u32 slots_free;	/* slots in no service's area */
	__u32 slot_size;	/* bytes per slot, a multiple of the page size */
	__u32 os_counter_id;	/* id of CPU 0's OS-level counter (CPU n: n + 1) */
	__u32 inbox_len;	/* bytes of the inbox; 0: none */
	__u64 inbox_mmap_offset; /* mmap inbox_len bytes here, read-only */
	__u32 inbox_slot_size;	/* bytes per inbox record slot */
	__u32 reserved[3];
};

/* BD_IOC_COUNTER_ALLOC */
struct bd_ioc_counter {
	char name[BD_NAME_LEN];	/* in: printable ASCII, NUL-padded */
	__u32 deadline_ms;	/* in: > 0 */
	__u8 level;		/* in: BD_LEVEL_APPLICATION or BD_LEVEL_SESSION */
	__u8 reserved0[3];
	__u32 owner;		/* in: 0 means the caller's tgid */
	__u32 id;		/* out: the id monitors see (slot index + 1) */
	__u64 mmap_offset;	/* out: mmap one page at this offset */
	__u32 offset_in_map;	/* out: where the counter is in that page */
	__u32 reserved1;
};

/* BD_IOC_COUNTER_STATE and BD_IOC_COUNTER_FREE */
struct bd_ioc_counter_state {
	__u32 id;		/* a counter this file allocated */
	__u32 state;		/* STATE: BD_STATE_ACTIVE or BD_STATE_IDLE */
};

/* BD_IOC_SVC_OPEN */
#define BD_SVC_CREATE		0x1U	/* create the area if missing */

struct bd_ioc_svc {
	char service[BD_SERVICE_LEN];	/* in: printable ASCII, NUL-padded */
	__u32 slots;		/* in: slots wanted when creating (> 0) */
	__u32 flags;		/* in: BD_SVC_* */
	__u32 slot_count;	/* out: slots in the area */
	__u32 slot_size;	/* out: bytes per slot */
	__u32 first_slot;	/* out: the area's first slot in the state box */
	__u32 created;		/* out: 1 if this call created the area */
	__u64 mmap_offset;	/* out: mmap slot_count * slot_size bytes here */
};

#define BD_IOC_INFO		_IOR(BD_IOC_MAGIC, 0, struct bd_ioc_info)
#define BD_IOC_COUNTER_ALLOC	_IOWR(BD_IOC_MAGIC, 1, struct bd_ioc_counter)
#define BD_IOC_COUNTER_STATE	_IOW(BD_IOC_MAGIC, 2, struct bd_ioc_counter_state)
#define BD_IOC_COUNTER_FREE	_IOW(BD_IOC_MAGIC, 3, struct bd_ioc_counter_state)
#define BD_IOC_SVC_OPEN		_IOWR(BD_IOC_MAGIC, 4, struct bd_ioc_svc)
/* Deletes the area of the service this file holds open (its sessions end). */
#define BD_IOC_SVC_DELETE	_IO(BD_IOC_MAGIC, 5)

#endif /* BACKDOOR_UAPI_H */
