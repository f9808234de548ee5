// SPDX-License-Identifier: MIT
/* Proves a failing guest makes bdvmm fail too (exit status 10). */
#include "lib.h"

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base)
{
	(void)ncpus;
	(void)ram_bytes;
	(void)bd_base;

	if (cpu != 0)
		spin_forever();

	report(false, "deliberate failure");
	return report_summary();
}
