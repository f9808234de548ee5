// SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-2-Clause
/*
 * A service that resumes its own sessions after a crash, in a Linux guest
 * running backdoor.ko (guest-driver/include/backdoor_app.h).
 *
 * Build it from the repository's root with this example, the portable
 * guest library and the include directory:
 *   cc -O2 -Iguest-driver/include -o counter_and_service \
 *      guest-driver/examples/<this file> guest-driver/lib/backdoor_guest.c
 *   ./counter_and_service [STEPS]     (default 50; BACKDOOR_DEV=PATH overrides
 *                                      /dev/backdoor)
 *
 * It keeps one session ("session 7", a running total) in the state box,
 * two slots per session so the previous version survives a crash in the
 * middle of a write, bumps an application counter every step, and goes
 * IDLE before it exits.  Kill it and start it again: it finds the newest
 * record of its session and carries on from there.  It also lists the
 * sessions a repair monitor handed to this guest through the inbox.
 */
#define _DEFAULT_SOURCE

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backdoor_app.h"

#define SERVICE		"example"
#define SESSION		7
#define PAYLOAD_MAX	256

static void fail(const char *what, int err)
{
	fprintf(stderr, "counter_and_service: %s: %s\n", what, strerror(-err));
	exit(1);
}

/* The newest complete version of our session in slots 0 and 1, or 0. */
static __u64 resume(const struct bd_app_service *svc, __u32 *stage,
		    unsigned long long *total)
{
	char payload[PAYLOAD_MAX + 1];
	struct bd_record hdr;
	__u64 best = 0;
	__u32 i;
	int r;

	for (i = 0; i < 2; i++) {
		memset(payload, 0, sizeof(payload));
		r = bd_app_slot_read(svc, i, &hdr, payload, PAYLOAD_MAX);
		if (r == BD_APP_TORN || r == BD_APP_CORRUPT)
			printf("slot %u: unusable (%s), skipped\n", i,
			       r == BD_APP_TORN ? "torn" : "corrupt");
		if (r != BD_APP_RECORD || hdr.session_id != SESSION ||
		    hdr.version <= best)
			continue;
		if (sscanf(payload, "total=%llu", total) != 1)
			continue;
		best = hdr.version;
		*stage = hdr.stage;
	}
	return best;
}

static void list_inbox(int fd)
{
	char payload[BD_PAGE_SIZE];
	struct bd_app_inbox ib;
	struct bd_record hdr;
	__u32 k, n;
	int r;

	r = bd_app_inbox_map(fd, &ib);
	if (r == -ENODEV)
		return;
	if (r)
		fail("mapping the inbox", r);
	n = bd_app_inbox_delivered(&ib);
	printf("inbox: %u of %u slots delivered (slot size %u)\n", n,
	       ib.capacity, ib.slot_size);
	for (k = 0; k < n; k++) {
		r = bd_app_inbox_read(&ib, k, &hdr, payload, sizeof(payload));
		if (r == BD_APP_RECORD)
			printf("inbox %u: service %.16s session %llu version %llu stage %u\n",
			       k, hdr.service,
			       (unsigned long long)hdr.session_id,
			       (unsigned long long)hdr.version, hdr.stage);
		else
			printf("inbox %u: no usable record (%d)\n", k, r);
	}
	bd_app_inbox_unmap(&ib);
}

int main(int argc, char **argv)
{
	const char *path = getenv("BACKDOOR_DEV");
	struct timespec step = { 0, 100 * 1000 * 1000 };
	unsigned long long total = 0;
	struct bd_app_service svc;
	struct bd_app_counter ctr;
	struct bd_ioc_info info;
	char payload[PAYLOAD_MAX];
	long steps = argc > 1 ? strtol(argv[1], NULL, 10) : 50;
	__u64 version;
	__u32 stage = 0;
	int fd, r, len;

	if (steps < 0) {
		fprintf(stderr, "usage: counter_and_service [STEPS]\n");
		return 2;
	}
	if (!path)
		path = BACKDOOR_DEVICE_PATH;
	fd = bd_app_open_path(path);
	if (fd < 0) {
		fprintf(stderr, "%s: cannot open %s: %s (is backdoor.ko loaded?)\n",
			argv[0], path, strerror(-fd));
		return 1;
	}
	r = bd_app_info(fd, &info);
	if (r == -ENOTTY) {
		fprintf(stderr, "counter_and_service: %s is not the backdoor driver\n",
			path);
		return 1;
	}
	if (r)
		fail("BD_IOC_INFO", r);
	printf("backdoor: generation %u, %s, %u of %u counters free, %u of %u slots free\n",
	       info.generation, info.sealed ? "sealed" : "not sealed",
	       info.counters_free, info.counters_total, info.slots_free,
	       info.slots_total);

	r = bd_app_counter_alloc(fd, SERVICE, 1000, BD_LEVEL_APPLICATION, &ctr);
	if (r)
		fail("allocating a counter", r);
	r = bd_app_service_open(fd, SERVICE, 4, 1, &svc);
	if (r)
		fail("opening the service area", r);

	version = svc.created ? 0 : resume(&svc, &stage, &total);
	if (version)
		printf("resumed session %d at stage %u (total %llu, version %llu)\n",
		       SESSION, stage, total, (unsigned long long)version);
	else
		printf("new session %d\n", SESSION);

	for (; steps > 0; steps--) {
		stage++;
		total += stage;
		version++;
		len = snprintf(payload, sizeof(payload), "total=%llu", total);
		/* Alternate slots: the other one keeps the previous version. */
		r = bd_app_slot_write(&svc, version & 1, SESSION, version,
				      stage, payload, (__u32)len);
		if (r)
			fail("writing the session", r);
		bd_app_bump(&ctr);
		nanosleep(&step, NULL);
	}
	printf("session %d at stage %u, total %llu\n", SESSION, stage, total);

	list_inbox(fd);
	/* Nothing more to do: IDLE is never "hung". */
	r = bd_app_counter_idle(fd, &ctr);
	if (r)
		fail("going idle", r);
	/* Closing retires the counter; the area stays for the next run. */
	bd_app_service_unmap(&svc);
	close(fd);
	return 0;
}
