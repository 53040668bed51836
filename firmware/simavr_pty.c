/* Runs AVR firmware in simavr in real time with its UART0 on a pseudo-terminal (for tests).
 *
 * Usage: simavr_pty FIRMWARE.elf MCU FREQ_HZ TAP_FILE
 * Prints "PTY <slave path>" on stdout once the pty exists, then runs until SIGTERM.
 * - The simulated clock is held to the wall clock (CLOCK_MONOTONIC): millis() runs at real speed. When the host
 *   stalls the emulator, it catches up at full speed afterwards, so the MCU's time never drifts from real time;
 *   what it sent meanwhile leaves late, as if delayed on the wire.
 * - Bytes the firmware sends go to the pty master; when nobody reads the slave and its buffer is full they
 *   are dropped, as a UART without flow control drops them. Bytes written to the slave reach the UART's input,
 *   paced by the UART's own XON/XOFF.
 * - Every line the firmware sends is written to TAP_FILE as "<taken> <sent> <+|-><line>\n": the epoch ms at which
 *   the MCU emitted its first byte on its own (real-time) clock, the epoch ms at which the byte reached the pty,
 *   and "+" when the pty took all of the line or "-" when bytes were dropped.
 * - Each ADC conversion reads the next step of a counter on ADC0 (1, 2, 3, ... of 1024 steps of AVCC), so
 *   consecutive analogRead(A0) calls return 1, 2, 3, ... and each reading carries a distinct value.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include <simavr/avr_adc.h>
#include <simavr/avr_uart.h>
#include <simavr/sim_avr.h>
#include <simavr/sim_elf.h>
#include <simavr/sim_irq.h>

#define AVCC_MV 5000
#define ADC_STEPS 1024
#define SLICE_US 1000          /* simulated time between looks at the pty and the wall clock */
#define LINE_MAX 512

static volatile sig_atomic_t stopping = 0;
static int master = -1;
static FILE *tap = NULL;
static int uart_ready = 1;     /* XON from the UART: its input fifo has room */
static char line[LINE_MAX];
static size_t line_len = 0;
static long long line_ms = 0;
static long long line_sent_ms = 0;
static long long epoch_start_ms = 0;   /* the wall clock when simulated time 0 was */
static int line_dropped = 0;
static uint32_t adc_step = 0;

static long long now_ms(void) {
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t mono_us(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void on_stop(int sig) { (void)sig; stopping = 1; }

static void on_uart_out(struct avr_irq_t *irq, uint32_t value, void *param) {
	(void)irq;
	avr_t *avr = (avr_t *)param;
	uint8_t byte = (uint8_t)value;
	if (line_len == 0) {
		line_ms = epoch_start_ms + (long long)(avr->cycle * 1000u / avr->frequency);
		line_sent_ms = now_ms();
		line_dropped = 0;
	}
	if (write(master, &byte, 1) != 1) line_dropped = 1;
	if (byte == '\n') {
		while (line_len > 0 && line[line_len - 1] == '\r') line_len--;
		fprintf(tap, "%lld %lld %c%.*s\n", line_ms, line_sent_ms, line_dropped ? '-' : '+', (int)line_len, line);
		fflush(tap);
		line_len = 0;
	} else if (line_len < LINE_MAX) {
		line[line_len++] = (char)byte;
	}
}

static void on_xon(struct avr_irq_t *irq, uint32_t value, void *param) { (void)irq; (void)value; (void)param; uart_ready = 1; }
static void on_xoff(struct avr_irq_t *irq, uint32_t value, void *param) { (void)irq; (void)value; (void)param; uart_ready = 0; }

static void on_adc_trigger(struct avr_irq_t *irq, uint32_t value, void *param) {
	(void)value;
	avr_t *avr = (avr_t *)param;
	(void)irq;
	adc_step = adc_step % (ADC_STEPS - 1) + 1;
	avr_raise_irq(avr_io_getirq(avr, AVR_IOCTL_ADC_GETIRQ, ADC_IRQ_ADC0), adc_step * AVCC_MV / ADC_STEPS + 2);
}

static void no_sleep(avr_t *avr, avr_cycle_count_t how_long) { (void)avr; (void)how_long; }

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: %s FIRMWARE.elf MCU FREQ_HZ TAP_FILE\n", argv[0]);
		return 2;
	}
	elf_firmware_t firmware;
	memset(&firmware, 0, sizeof firmware);
	if (elf_read_firmware(argv[1], &firmware) != 0) {
		fprintf(stderr, "cannot read %s\n", argv[1]);
		return 1;
	}
	avr_t *avr = avr_make_mcu_by_name(argv[2]);
	if (avr == NULL) {
		fprintf(stderr, "unknown MCU %s\n", argv[2]);
		return 1;
	}
	avr_init(avr);
	firmware.frequency = (uint32_t)strtoul(argv[3], NULL, 10);
	avr_load_firmware(avr, &firmware);
	avr->frequency = firmware.frequency;
	avr->avcc = avr->vcc = avr->aref = AVCC_MV;
	avr->sleep = no_sleep;     /* the loop below keeps time; simavr's own sleep would block the pty */
	avr->log = LOG_ERROR;

	tap = fopen(argv[4], "a");
	if (tap == NULL) {
		perror(argv[4]);
		return 1;
	}
	int slave = -1;
	char name[256];
	if (openpty(&master, &slave, name, NULL, NULL) != 0) {
		perror("openpty");
		return 1;
	}
	struct termios raw;
	tcgetattr(slave, &raw);
	cfmakeraw(&raw);
	tcsetattr(slave, TCSANOW, &raw);   /* the slave stays open here, so the pty lives while the daemon is away */
	fcntl(master, F_SETFL, fcntl(master, F_GETFL) | O_NONBLOCK);

	uint32_t flags = 0;
	avr_ioctl(avr, AVR_IOCTL_UART_GET_FLAGS('0'), &flags);
	flags &= ~(uint32_t)(AVR_UART_FLAG_STDIO | AVR_UART_FLAG_POLL_SLEEP);
	avr_ioctl(avr, AVR_IOCTL_UART_SET_FLAGS('0'), &flags);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUTPUT), on_uart_out, avr);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XON), on_xon, NULL);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_OUT_XOFF), on_xoff, NULL);
	avr_irq_register_notify(avr_io_getirq(avr, AVR_IOCTL_ADC_GETIRQ, ADC_IRQ_OUT_TRIGGER), on_adc_trigger, avr);
	avr_irq_t *uart_in = avr_io_getirq(avr, AVR_IOCTL_UART_GETIRQ('0'), UART_IRQ_INPUT);

	signal(SIGTERM, on_stop);
	signal(SIGINT, on_stop);
	signal(SIGPIPE, SIG_IGN);
	printf("PTY %s\n", name);
	fflush(stdout);

	uint8_t pending[256];
	size_t pending_len = 0, pending_done = 0;
	const avr_cycle_count_t slice = (avr_cycle_count_t)avr->frequency / (1000000 / SLICE_US);
	uint64_t start = mono_us();
	epoch_start_ms = now_ms() - (long long)(avr->cycle * 1000u / avr->frequency);
	avr_cycle_count_t next = avr->cycle + slice;
	while (!stopping) {
		while (avr->cycle < next) {
			int state = avr_run(avr);
			if (state == cpu_Done || state == cpu_Crashed) {
				fprintf(stderr, "firmware stopped (state %d)\n", state);
				return 1;
			}
		}
		next += slice;
		if (pending_done == pending_len) {
			ssize_t got = read(master, pending, sizeof pending);
			pending_len = got > 0 ? (size_t)got : 0;
			pending_done = 0;
		}
		while (uart_ready && pending_done < pending_len) avr_raise_irq(uart_in, pending[pending_done++]);
		uint64_t simulated = (uint64_t)(avr->cycle * 1000000u / avr->frequency);
		uint64_t elapsed = mono_us() - start;
		if (simulated > elapsed) usleep((useconds_t)(simulated - elapsed));   /* behind: run on at full speed */
	}
	fclose(tap);
	return 0;
}
