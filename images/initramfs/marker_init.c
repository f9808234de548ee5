/*
 * /init for bdvmm's Linux full-boot test.
 *
 * Proves that a Linux guest got all the way to user space: writes
 *
 *   BDVMM-INIT-MARKER: init reached user space
 *   BDVMM-INIT-MARKER: kernel <release>
 *   BDVMM-INIT-MARKER: cpus online <list>      (/sys/devices/system/cpu/online)
 *   BDVMM-INIT-MARKER: slept 100 ms            (the timer interrupt works)
 *
 * to the first serial port (falling back to /dev/console), then reboots.
 * With the VMM's default command line (reboot=k) the reboot goes through
 * the i8042 reset line, which bdvmm reports as exit status 12.
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o marker_init marker_init.c
 * (see images/Makefile, target initrd).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define MARKER "BDVMM-INIT-MARKER: "

/* Write all of buf, retrying on short writes and EINTR. */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

static int open_console(void)
{
	static const char *const paths[] = { "/dev/ttyS0", "/dev/console" };
	size_t i;

	for (i = 0; i < sizeof(paths) / sizeof(paths[0]); i++) {
		int fd = open(paths[i], O_WRONLY | O_NOCTTY | O_CLOEXEC);

		if (fd >= 0)
			return fd;
	}
	/* The kernel opens /dev/console as fds 0-2 for init if it can. */
	return STDOUT_FILENO;
}

/* The kernel's list of online CPUs, e.g. "0-1". */
static void say_cpus_online(int fd)
{
	char list[64] = "unknown", line[128];
	int in, len;
	ssize_t n;

	if (mount("sysfs", "/sys", "sysfs", 0, NULL) != 0 && errno != EBUSY)
		perror("marker_init: mount sysfs on /sys");
	in = open("/sys/devices/system/cpu/online", O_RDONLY | O_CLOEXEC);
	if (in >= 0) {
		n = read(in, list, sizeof(list) - 1);
		list[n > 0 ? n : 0] = '\0';
		list[strcspn(list, "\n")] = '\0';
		close(in);
	}
	len = snprintf(line, sizeof(line), MARKER "cpus online %s\n", list);
	if (len > 0)
		write_all(fd, line, (size_t)len < sizeof(line) ? (size_t)len : sizeof(line) - 1);
}

int main(void)
{
	struct utsname uts;
	char line[sizeof(uts.release) + 64];
	int fd, len;

	/* The initramfs ships its own nodes; devtmpfs adds the rest. */
	if (mount("devtmpfs", "/dev", "devtmpfs", 0, NULL) != 0 && errno != EBUSY)
		perror("marker_init: mount devtmpfs on /dev");

	fd = open_console();
	write_all(fd, MARKER "init reached user space\n",
		  strlen(MARKER "init reached user space\n"));

	if (uname(&uts) != 0)
		snprintf(uts.release, sizeof(uts.release), "unknown (uname: %s)",
			 strerror(errno));
	len = snprintf(line, sizeof(line), MARKER "kernel %s\n", uts.release);
	if (len > 0)
		write_all(fd, line, (size_t)len < sizeof(line) ? (size_t)len : sizeof(line) - 1);

	say_cpus_online(fd);
	/* Without timer interrupts (no IO-APIC found) this never returns. */
	if (nanosleep(&(struct timespec){ .tv_nsec = 100 * 1000 * 1000 }, NULL) == 0)
		write_all(fd, MARKER "slept 100 ms\n", strlen(MARKER "slept 100 ms\n"));

	sync();
	reboot(RB_AUTOBOOT);
	/* Only reached if reboot failed; init must not exit (kernel panic). */
	perror("marker_init: reboot");
	for (;;)
		pause();
}
