// SPDX-License-Identifier: Apache-2.0
/*
 * backdoor_app.h is all static inline; these give the tests symbols for
 * the parts that run without the driver (the slot reader and writer).
 */
#include "backdoor_app.h"

int bd_test_app_read_slot(const void *slot, __u32 slot_size,
			  struct bd_record *hdr, void *payload, __u32 cap)
{
	return bd_app_read_slot(slot, slot_size, hdr, payload, cap);
}

/* bd_app_slot_write on an area of @count slots at @base. */
int bd_test_app_slot_write(void *base, __u32 count, __u32 slot_size,
			   const char *service, __u32 i, __u64 session_id,
			   __u64 version, __u32 stage, const void *payload,
			   __u32 len)
{
	struct bd_app_service s;

	memset(&s, 0, sizeof(s));
	s.base = base;
	s.slot_count = count;
	s.slot_size = slot_size;
	s.len = (size_t)count * slot_size;
	strncpy(s.name, service, BD_SERVICE_LEN);
	return bd_app_slot_write(&s, i, session_id, version, stage, payload,
				 len);
}

/* bd_app_open_path + bd_app_info: what an application sees without the driver. */
int bd_test_app_info(const char *path, struct bd_ioc_info *info)
{
	int fd = bd_app_open_path(path), r;

	if (fd < 0)
		return fd;
	r = bd_app_info(fd, info);
	close(fd);
	return r;
}
