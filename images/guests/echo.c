// SPDX-License-Identifier: MIT
/*
 * Console input: polls COM1 for received bytes (no interrupts) and echoes
 * each line back as "echo: <line>"; the line "quit" powers off.  Proves
 * that what is written to bdvmm's standard input reaches the guest's
 * serial port, in order and whole.
 */
#include "lib.h"

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	char line[256];
	size_t n = 0;

	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;
	if (cpu != 0)
		spin_forever();

	puts("echo: ready\n");
	for (;;) {
		char c = console_getc();

		if (c != '\n' && n < sizeof(line) - 1) {
			line[n++] = c;
			continue;
		}
		line[n] = '\0';
		if (n == 4 && line[0] == 'q' && line[1] == 'u' && line[2] == 'i' &&
		    line[3] == 't')
			return 0;
		puts("echo: ");
		puts(line);
		putc('\n');
		n = 0;
	}
}
