/* SPDX-License-Identifier: MIT */
/*
 * Minimal runtime for bdvmm test guests: port I/O, serial output,
 * a print lock usable from ring 3, and kvm-unit-tests style reporting.
 */
#ifndef BDVMM_GUEST_LIB_H
#define BDVMM_GUEST_LIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COM1_PORT	0x3f8
#define DEBUG_EXIT_PORT	0xf4
#define BOOT_TIMER_PORT	0xf5
#define POST_PORT	0x80
#define I8042_CMD_PORT	0x64
#define I8042_RESET	0xfe

/* Unmapped guest-physical address: every access exits to the VMM. */
#define MMIO_HOLE	0xd0000000UL

static inline void outb(uint16_t port, uint8_t val)
{
	asm volatile("outb %0, %1" : : "a"(val), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t val)
{
	asm volatile("outl %0, %1" : : "a"(val), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t val;

	asm volatile("inb %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t val;

	asm volatile("inl %1, %0" : "=a"(val) : "Nd"(port));
	return val;
}

static inline void cpu_relax(void)
{
	asm volatile("pause" : : : "memory");
}

#define COM1_LSR	(COM1_PORT + 5)
#define LSR_DATA_READY	0x01

/* Whether a byte from the host waits on COM1 (one exit to ask). */
static inline bool console_has_input(void)
{
	return inb(COM1_LSR) & LSR_DATA_READY;
}

/* The next byte from the host on COM1, polled (no interrupts). */
static inline char console_getc(void)
{
	while (!console_has_input())
		cpu_relax();
	return (char)inb(COM1_PORT);
}

/* CPL is the low two bits of CS. */
static inline unsigned int cpu_ring(void)
{
	uint16_t cs;

	asm volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

/* Ticket lock: fair, and needs only locked RMW, which ring 3 may use. */
struct spinlock {
	uint32_t next;
	uint32_t owner;
};

void spin_lock(struct spinlock *lock);
void spin_unlock(struct spinlock *lock);

/* Serialises whole lines printed by several vCPUs. */
void print_lock(void);
void print_unlock(void);

/* One character costs exactly one OUT: the UART is always ready. */
static inline void putc(char c)
{
	outb(COM1_PORT, c);
}

void puts(const char *s);
void print_dec(uint64_t val);
void print_hex(uint64_t val);

void __attribute__((noreturn)) poweroff(uint32_t status);
void __attribute__((noreturn)) spin_forever(void);

void report(bool cond, const char *name);
int report_summary(void);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

int main(unsigned long cpu, unsigned long ncpus, unsigned long ram_bytes,
	 unsigned long bd_base);

#endif /* BDVMM_GUEST_LIB_H */
