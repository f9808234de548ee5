/*
 * as-user UID CMD [ARGS...]: runs CMD as user and group UID, with no
 * supplementary groups, in the guest image. busybox's su cannot (a static
 * glibc has no NSS to look users up) and its setpriv has no --reuid; the
 * guest image's tests use this to act as another user (bdimg-init.sh).
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror (images/build-image.sh).
 */
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	char *end;
	unsigned long id;

	if (argc < 3) {
		fprintf(stderr, "usage: as-user UID CMD [ARGS...]\n");
		return 2;
	}
	errno = 0;
	id = strtoul(argv[1], &end, 10);
	if (errno || *end || end == argv[1] || id > 65535) {
		fprintf(stderr, "as-user: bad uid '%s'\n", argv[1]);
		return 2;
	}
	if (setgroups(0, NULL) || setgid((gid_t)id) || setuid((uid_t)id)) {
		fprintf(stderr, "as-user: cannot become %lu: %s\n", id, strerror(errno));
		return 1;
	}
	execvp(argv[2], argv + 2);
	fprintf(stderr, "as-user: %s: %s\n", argv[2], strerror(errno));
	return 127;
}
