// SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause
/*
 * /dev/backdoor: progress counters, service continuation areas and the
 * inbox for applications (include/backdoor_uapi.h is the contract).
 *
 * Everything an application writes often (a counter bump, a record) is a
 * store into memory it has mapped, so the hot paths never enter the
 * kernel.  Mappings are filled one page at a time by the fault handler,
 * which checks under bd_drv.lock that the file still owns the page: that
 * way SVC_DELETE can revoke an area's mappings (unmap_mapping_range) with
 * no window in which a new mapping of freed slots could appear.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/capability.h>
#include <linux/cred.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#include "backdoor_compat.h"
#include "backdoor_drv.h"

enum bd_window { BD_WIN_PBOX, BD_WIN_INBOX, BD_WIN_SBOX };

/*
 * Checks that @bf may map @npages pages from page offset @pgoff, writable
 * or not, and finds the first page's frame.  Called with bd_drv.lock held.
 * Returns 0, -EINVAL (no such range) or -EACCES (not this file's, or a
 * write to the read-only inbox).
 */
static int bd_resolve(struct bd_file *bf, unsigned long pgoff,
		      unsigned long npages, bool write, enum bd_window *win,
		      unsigned long *pfn)
{
	u64 start = (u64)pgoff << PAGE_SHIFT, base, len;
	unsigned long first, i;
	void *mem;

	if (!npages || pgoff >= (BD_MMAP_END >> PAGE_SHIFT) ||
	    npages > (BD_MMAP_END >> PAGE_SHIFT) - pgoff)
		return -EINVAL;
	if (start >= BD_MMAP_SBOX) {
		*win = BD_WIN_SBOX;
		base = BD_MMAP_SBOX;
		len = (u64)bd_drv.slot_count * PAGE_SIZE;
	} else if (start >= BD_MMAP_INBOX) {
		*win = BD_WIN_INBOX;
		base = BD_MMAP_INBOX;
		len = bd_drv.inbox ? bd_drv.inbox_len : 0;
	} else {
		*win = BD_WIN_PBOX;
		base = BD_MMAP_PBOX;
		len = bd_drv.pbox_len;
	}
	first = (start - base) >> PAGE_SHIFT;
	if (first >= len >> PAGE_SHIFT || npages > (len >> PAGE_SHIFT) - first)
		return -EINVAL;

	switch (*win) {
	case BD_WIN_PBOX:
		/* Only whole pages this file owns; page 0 is the driver's. */
		for (i = first; i < first + npages; i++)
			if (!bd_cpool_owns_page(&bd_drv.cpool, bf->token, i))
				return -EACCES;
		mem = (u8 *)bd_drv.pbox + first * PAGE_SIZE;
		break;
	case BD_WIN_INBOX:
		/* Remote monitors write it; applications only read. */
		if (write)
			return -EACCES;
		mem = (u8 *)bd_drv.inbox + first * PAGE_SIZE;
		break;
	default:
		if (!bf->area || first < bf->area->first ||
		    first + npages > (unsigned long)bf->area->first +
				     bf->area->count)
			return -EACCES;
		mem = bd_slot_at(first);
		break;
	}
	if (pfn)
		*pfn = page_to_pfn(virt_to_page(mem));
	return 0;
}

static vm_fault_t bd_vm_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct bd_file *bf = vma->vm_file->private_data;
	enum bd_window win;
	unsigned long pfn;
	vm_fault_t ret = VM_FAULT_SIGBUS;

	mutex_lock(&bd_drv.lock);
	/* Held across the insert: SVC_DELETE's unmap cannot slip between. */
	if (!bd_resolve(bf, vmf->pgoff, 1, vma->vm_flags & VM_WRITE, &win,
			&pfn))
		ret = vmf_insert_pfn(vma, vmf->address, pfn);
	mutex_unlock(&bd_drv.lock);
	return ret;
}

static const struct vm_operations_struct bd_vm_ops = {
	.fault = bd_vm_fault,
};

static int bd_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct bd_file *bf = file->private_data;
	enum bd_window win;
	int ret;

	/* A private mapping would copy on write: bumps would miss the box. */
	if (!(vma->vm_flags & VM_SHARED))
		return -EINVAL;
	mutex_lock(&bd_drv.lock);
	ret = bd_resolve(bf, vma->vm_pgoff, vma_pages(vma),
			 vma->vm_flags & VM_WRITE, &win, NULL);
	mutex_unlock(&bd_drv.lock);
	if (ret)
		return ret;
	bd_vm_flags_mod(vma, VM_IO | VM_PFNMAP | VM_DONTEXPAND | VM_DONTDUMP,
			win == BD_WIN_INBOX ? VM_MAYWRITE : 0);
	vma->vm_ops = &bd_vm_ops;
	return 0;
}

static int bd_open(struct inode *inode, struct file *file)
{
	struct bd_file *bf;

	bf = kzalloc(sizeof(*bf), GFP_KERNEL);
	if (!bf)
		return -ENOMEM;
	mutex_lock(&bd_drv.lock);
	if (!bd_drv.ready) {
		mutex_unlock(&bd_drv.lock);
		kfree(bf);
		return -ENODEV;
	}
	/* 64 bits: never wraps, so a token is never shared. */
	bf->token = ++bd_drv.next_token;
	mutex_unlock(&bd_drv.lock);
	file->private_data = bf;
	return 0;
}

/* Retires a counter unless it already is; called with bd_drv.lock held. */
static void bd_retire(struct bd_counter *c)
{
	u8 state = READ_ONCE(c->state);

	if (state == BD_STATE_ACTIVE || state == BD_STATE_IDLE)
		bd_counter_retire(c);
}

/*
 * The owner is gone (the last reference to the file, mappings included):
 * its counters retire and their pages go back to the pool; its service's
 * area stays for the next instance.
 */
static int bd_release(struct inode *inode, struct file *file)
{
	struct bd_file *bf = file->private_data;
	u32 first, k;
	int page;

	mutex_lock(&bd_drv.lock);
	for (page = bd_cpool_next_page(&bd_drv.cpool, bf->token, 1); page > 0;
	     page = bd_cpool_next_page(&bd_drv.cpool, bf->token, page + 1)) {
		first = bd_cpool_page_first(&bd_drv.cpool, page);
		for (k = 0; k < bd_drv.cpool.pages[page].used; k++)
			bd_retire(bd_counter_at(first + k));
		bd_cpool_put(&bd_drv.cpool, page);
	}
	if (bf->area)
		bf->area->holder = NULL;
	mutex_unlock(&bd_drv.lock);
	kfree(bf);
	return 0;
}

static long bd_ioc_info(void __user *argp)
{
	struct bd_ioc_info info;

	memset(&info, 0, sizeof(info));
	info.abi_version = bd_drv.abi_version;
	info.generation = bd_drv.generation;
	info.sealed = bd_drv.sealed;
	info.slots_total = bd_drv.slot_count;
	info.slot_size = PAGE_SIZE;
	info.os_counter_id = BD_OS_COUNTER_SLOT(0) + 1;	/* CPU 0's */
	if (bd_drv.inbox) {
		info.inbox_len = bd_drv.inbox_len;
		info.inbox_mmap_offset = BD_MMAP_INBOX;
		info.inbox_slot_size = bd_drv.inbox_slot_size;
	}
	mutex_lock(&bd_drv.lock);
	info.counters_total = bd_cpool_app_counters(&bd_drv.cpool);
	info.counters_free = bd_cpool_free_counters(&bd_drv.cpool);
	info.slots_free = bd_spool_free_count(&bd_drv.spool);
	mutex_unlock(&bd_drv.lock);
	/* Copies happen outside the lock: a fault in them takes mmap_lock,
	 * which bd_mmap holds when it takes bd_drv.lock.
	 */
	return copy_to_user(argp, &info, sizeof(info)) ? -EFAULT : 0;
}

static long bd_ioc_counter_alloc(struct bd_file *bf, void __user *argp)
{
	struct bd_ioc_counter req;
	u32 slot, owner;
	u64 off;
	int claimed, page, ret;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	if (memchr_inv(req.reserved0, 0, sizeof(req.reserved0)) ||
	    req.reserved1 || !req.deadline_ms ||
	    (req.level != BD_LEVEL_APPLICATION &&
	     req.level != BD_LEVEL_SESSION) ||
	    bd_name_check(req.name, BD_NAME_LEN) < 0)
		return -EINVAL;
	owner = req.owner ? req.owner : task_tgid_nr(current);

	mutex_lock(&bd_drv.lock);
	ret = bd_cpool_alloc(&bd_drv.cpool, bf->token, &slot, &claimed);
	if (ret) {
		mutex_unlock(&bd_drv.lock);
		return ret == BD_POOL_EFULL ? -ENOSPC : -EINVAL;
	}
	page = bd_cpool_slot_page(&bd_drv.cpool, slot);
	/* A reused page still shows its last owner's retired counters. */
	if (claimed)
		memset((u8 *)bd_drv.pbox + (size_t)page * PAGE_SIZE, 0,
		       PAGE_SIZE);
	bd_counter_setup(bd_counter_at(slot), slot + 1, req.name,
			 req.deadline_ms, req.level, owner);
	mutex_unlock(&bd_drv.lock);

	off = bd_cpool_slot_offset(slot);
	req.id = slot + 1;
	req.mmap_offset = BD_MMAP_PBOX + (u64)page * PAGE_SIZE;
	req.offset_in_map = off & (PAGE_SIZE - 1);
	if (copy_to_user(argp, &req, sizeof(req))) {
		/* The caller never learnt its id: take the counter back. */
		mutex_lock(&bd_drv.lock);
		bd_retire(bd_counter_at(slot));
		mutex_unlock(&bd_drv.lock);
		return -EFAULT;
	}
	return 0;
}

static long bd_ioc_counter_state(struct bd_file *bf, void __user *argp,
				 bool free)
{
	struct bd_ioc_counter_state req;
	struct bd_counter *c;
	u8 state;
	long ret = 0;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	if (!free && req.state != BD_STATE_ACTIVE && req.state != BD_STATE_IDLE)
		return -EINVAL;
	mutex_lock(&bd_drv.lock);
	if (!req.id ||
	    !bd_cpool_owns_slot(&bd_drv.cpool, bf->token, req.id - 1)) {
		ret = -ENOENT;
		goto out;
	}
	c = bd_counter_at(req.id - 1);
	state = READ_ONCE(c->state);
	if (state != BD_STATE_ACTIVE && state != BD_STATE_IDLE) {
		ret = -ENOENT;
		goto out;
	}
	if (free)
		bd_counter_retire(c);
	else if (req.state == BD_STATE_IDLE)
		bd_counter_idle(c);
	else
		bd_counter_active(c);
out:
	mutex_unlock(&bd_drv.lock);
	return ret;
}

static struct bd_area *bd_area_find(const char *name)
{
	struct bd_area *a;

	list_for_each_entry(a, &bd_drv.areas, node)
		if (!memcmp(a->name, name, BD_SERVICE_LEN))
			return a;
	return NULL;
}

static void bd_svc_fill(struct bd_ioc_svc *req, const struct bd_area *a,
			bool created)
{
	req->slot_count = a->count;
	req->slot_size = PAGE_SIZE;
	req->first_slot = a->first;
	req->created = created;
	req->mmap_offset = BD_MMAP_SBOX + (u64)a->first * PAGE_SIZE;
}

static long bd_ioc_svc_open(struct bd_file *bf, void __user *argp)
{
	struct bd_ioc_svc req;
	struct bd_area *a, *fresh = NULL;
	u32 first;
	long ret = 0;

	if (copy_from_user(&req, argp, sizeof(req)))
		return -EFAULT;
	if (bd_name_check(req.service, BD_SERVICE_LEN) < 0 ||
	    req.flags & ~BD_SVC_CREATE)
		return -EINVAL;
	if (req.flags & BD_SVC_CREATE) {
		fresh = kzalloc(sizeof(*fresh), GFP_KERNEL);
		if (!fresh)
			return -ENOMEM;
	}

	mutex_lock(&bd_drv.lock);
	if (bf->area) {
		/* Opening again what this file holds is harmless. */
		if (memcmp(bf->area->name, req.service, BD_SERVICE_LEN))
			ret = -EINVAL;
		else
			bd_svc_fill(&req, bf->area, false);
		goto out;
	}
	a = bd_area_find(req.service);
	if (a) {
		/*
		 * A service's sessions are its creator's: another user's
		 * process may not take them over by naming the service first.
		 */
		if (!uid_eq(a->owner, current_fsuid()) && !capable(CAP_SYS_ADMIN)) {
			ret = -EACCES;
			goto out;
		}
		if (a->holder) {
			ret = -EBUSY;
			goto out;
		}
		bd_svc_fill(&req, a, false);
	} else if (!fresh) {
		ret = -ENOENT;
		goto out;
	} else if (!req.slots) {
		ret = -EINVAL;
		goto out;
	} else {
		if (req.slots > bd_drv.slot_count ||
		    bd_spool_alloc(&bd_drv.spool, req.slots, &first)) {
			ret = -ENOSPC;
			goto out;
		}
		/* Free slots are always zero: SVC_DELETE wipes them. */
		a = fresh;
		fresh = NULL;
		memcpy(a->name, req.service, BD_SERVICE_LEN);
		a->owner = current_fsuid();
		a->first = first;
		a->count = req.slots;
		list_add_tail(&a->node, &bd_drv.areas);
		bd_svc_fill(&req, a, true);
	}
	a->holder = bf;
	bf->area = a;
out:
	mutex_unlock(&bd_drv.lock);
	kfree(fresh);
	if (ret)
		return ret;
	/* On a fault the hold stays; opening the name again returns it. */
	return copy_to_user(argp, &req, sizeof(req)) ? -EFAULT : 0;
}

/* Empties a slot for readers first (seq 0: never written), then wipes it. */
static void bd_slot_wipe(u32 slot)
{
	struct bd_record *r = bd_slot_at(slot);

	WRITE_ONCE(r->seq, 0);
	/* A reader that saw the old seq must see it change before the data. */
	smp_wmb();
	memset((u8 *)r + sizeof(r->seq), 0, PAGE_SIZE - sizeof(r->seq));
}

static long bd_ioc_svc_delete(struct file *file, struct bd_file *bf)
{
	struct bd_area *a;
	u32 i;

	mutex_lock(&bd_drv.lock);
	a = bf->area;
	if (!a) {
		mutex_unlock(&bd_drv.lock);
		return -EINVAL;
	}
	bf->area = NULL;
	list_del(&a->node);
	/*
	 * Only this file can have mapped the area; its faults take the lock
	 * and now find nothing, so once the pages are gone from its mappings
	 * the slots are nobody's.
	 */
	unmap_mapping_range(file->f_mapping,
			    BD_MMAP_SBOX + (u64)a->first * PAGE_SIZE,
			    (u64)a->count * PAGE_SIZE, 1);
	for (i = a->first; i < a->first + a->count; i++)
		bd_slot_wipe(i);
	bd_spool_free(&bd_drv.spool, a->first, a->count);
	mutex_unlock(&bd_drv.lock);
	kfree(a);
	return 0;
}

static long bd_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct bd_file *bf = file->private_data;
	void __user *argp = (void __user *)arg;

	if (_IOC_TYPE(cmd) != BD_IOC_MAGIC)
		return -ENOTTY;
	/* Everything but INFO changes what the file owns. */
	if (cmd != BD_IOC_INFO && !(file->f_mode & FMODE_WRITE))
		return -EBADF;
	switch (cmd) {
	case BD_IOC_INFO:
		return bd_ioc_info(argp);
	case BD_IOC_COUNTER_ALLOC:
		return bd_ioc_counter_alloc(bf, argp);
	case BD_IOC_COUNTER_STATE:
		return bd_ioc_counter_state(bf, argp, false);
	case BD_IOC_COUNTER_FREE:
		return bd_ioc_counter_state(bf, argp, true);
	case BD_IOC_SVC_OPEN:
		return bd_ioc_svc_open(bf, argp);
	case BD_IOC_SVC_DELETE:
		return bd_ioc_svc_delete(file, bf);
	default:
		return -ENOTTY;
	}
}

static const struct file_operations bd_fops = {
	.owner = THIS_MODULE,
	.open = bd_open,
	.release = bd_release,
	.unlocked_ioctl = bd_ioctl,
	/* Every structure has the same layout for 32-bit processes. */
	.compat_ioctl = compat_ptr_ioctl,
	.mmap = bd_mmap,
};

static struct miscdevice bd_misc = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "backdoor",
	.fops = &bd_fops,
	.mode = 0600,
};

int bd_cdev_register(void)
{
	int ret = misc_register(&bd_misc);

	if (ret)
		pr_err("cannot create /dev/backdoor: %d\n", ret);
	return ret;
}

void bd_cdev_unregister(void)
{
	misc_deregister(&bd_misc);
}
