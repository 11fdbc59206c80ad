/*
 * tftpbench - a small TFTP read (RRQ) load client for the tftpd benchmark.
 *
 * Written for this project.  It fetches one file from a TFTP server with any
 * number of clients, each on its own UDP socket (its own transfer ID), many
 * of them at once in one event loop (epoll), optionally spread over several
 * forked worker processes.  It asks for blksize, windowsize (RFC 7440) and
 * tsize, ACKs a window when its last block arrives, ACKs the last in-order
 * block on a gap or a duplicate (once until the next in-order block), follows
 * block numbers past 65535 (wrap to 0), and retransmits its last packet on a
 * timeout.  It does no per-block work beyond one recv, the header check and
 * (every windowsize blocks) one send, so it stays cheaper than the servers.
 *
 * Output, one line per client (parsed by bench/harness.py):
 *   C <index> <ok|fail> <start_ns> <end_ns> <bytes> <blocks> <reacks> <timeouts> <blksize> <windowsize> <tsize> <message>
 * (reacks: ACKs sent again because a block came out of order or twice;
 *  timeouts: retransmissions of our last packet after the timeout)
 * and, with -M PID, one line for the whole run:
 *   M <peak_rss_kib> <peak_processes> <samples> <peak_pss_kib>
 * where peak_rss_kib is the largest sum of VmRSS over PID and all its
 * descendants seen while the clients ran (sampled from /proc every -i ms),
 * and peak_pss_kib the same for the proportional set size (every 4th sample;
 * it counts pages shared between forked children once), and finally
 *   R <user_us> <sys_us>
 * the CPU time this client used.
 *
 * Build: gcc -O2 -Wall -o tftpbench tftpbench.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { OP_RRQ = 1, OP_DATA = 3, OP_ACK = 4, OP_ERROR = 5, OP_OACK = 6 };
enum { ST_IDLE, ST_FIRST, ST_RUN, ST_OK, ST_FAIL };

#define MAXPKT (65464 + 4)

struct client {
    int fd;
    int state;
    int connected;
    uint32_t blksize;
    uint32_t window;
    int64_t tsize;          /* -1: not announced */
    uint64_t next;          /* absolute number of the next expected block */
    uint64_t bytes;
    uint32_t since_ack;     /* in-order blocks since the last ACK we sent */
    int reacked;            /* ACKed a gap/duplicate; quiet until in-order */
    int tries;              /* timeouts in a row */
    uint64_t retrans;       /* re-ACKs on a gap or duplicate */
    uint64_t timeouts;      /* our last packet sent again after a timeout */
    int64_t t_start, t_end, t_last;
    unsigned char *out;     /* -o: mapped output file (client 0 only) */
    int64_t out_len;
    int out_fd;
    char msg[80];
};

/* settings */
static struct sockaddr_in g_server;
static const char *g_file = NULL;
static int g_nclients = 1, g_conc = 1, g_jobs = 1;
static uint32_t g_blksize = 512, g_window = 1;
static int g_ask_tsize = 1;
static int64_t g_expect = -1;
static int64_t g_timeout_ns = 1000000000LL;
static int g_retries = 6;
static int64_t g_deadline_ns = 600LL * 1000000000LL;
static const char *g_outpath = NULL;
static pid_t g_mon_pid = 0;
static int g_mon_ms = 50;
static int g_rcvbuf = 4 << 20;

static unsigned char g_rrq[1024];
static size_t g_rrq_len;
static unsigned char g_buf[MAXPKT + 64];

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void build_rrq(void)
{
    size_t n = 0;
    char opt[64];
    g_rrq[n++] = 0;
    g_rrq[n++] = OP_RRQ;
    size_t fl = strlen(g_file);
    if (fl > 512) { fprintf(stderr, "file name too long\n"); exit(2); }
    memcpy(g_rrq + n, g_file, fl + 1); n += fl + 1;
    memcpy(g_rrq + n, "octet", 6); n += 6;
#define ADDOPT(name, val) do { \
        int l = snprintf(opt, sizeof opt, "%s", name); memcpy(g_rrq + n, opt, l + 1); n += l + 1; \
        l = snprintf(opt, sizeof opt, "%lu", (unsigned long)(val)); memcpy(g_rrq + n, opt, l + 1); n += l + 1; \
    } while (0)
    if (g_blksize && g_blksize != 512) ADDOPT("blksize", g_blksize);
    if (g_ask_tsize) ADDOPT("tsize", 0);
    if (g_window > 1) ADDOPT("windowsize", g_window);
#undef ADDOPT
    g_rrq_len = n;
}

static void send_ack(struct client *c, uint16_t blk)
{
    unsigned char p[4] = { 0, OP_ACK, (unsigned char)(blk >> 8), (unsigned char)blk };
    if (send(c->fd, p, 4, 0) < 0 && errno != EAGAIN && errno != ENOBUFS && errno != ECONNREFUSED)
        snprintf(c->msg, sizeof c->msg, "send: %s", strerror(errno));
}

static void finish(struct client *c, int ok, const char *why, int64_t t)
{
    c->state = ok ? ST_OK : ST_FAIL;
    c->t_end = t;
    if (why && !c->msg[0]) snprintf(c->msg, sizeof c->msg, "%s", why);
    if (c->fd >= 0) { close(c->fd); c->fd = -1; }
    if (c->out) {
        munmap(c->out, c->out_len > 0 ? c->out_len : 1);
        c->out = NULL;
    }
    if (c->out_fd >= 0) {
        if (c->out_len >= 0 && ftruncate(c->out_fd, (off_t)c->bytes) < 0) { /* keep what we have */ }
        close(c->out_fd);
        c->out_fd = -1;
    }
}

static void store(struct client *c, const unsigned char *data, size_t len, uint64_t offset)
{
    if (c->out_fd < 0) return;
    if (c->out && offset + len <= (uint64_t)c->out_len) {
        memcpy(c->out + offset, data, len);
    } else if (pwrite(c->out_fd, data, len, (off_t)offset) != (ssize_t)len) {
        snprintf(c->msg, sizeof c->msg, "output write failed");
    }
}

static void parse_oack(struct client *c, const unsigned char *p, size_t n)
{
    size_t i = 2;
    while (i < n) {
        const char *name = (const char *)p + i;
        size_t nl = strnlen(name, n - i);
        if (i + nl >= n) break;
        i += nl + 1;
        const char *val = (const char *)p + i;
        size_t vl = strnlen(val, n - i);
        if (i + vl >= n) break;
        i += vl + 1;
        long long v = strtoll(val, NULL, 10);
        if (!strcasecmp(name, "blksize")) c->blksize = (uint32_t)v;
        else if (!strcasecmp(name, "windowsize")) c->window = (uint32_t)v;
        else if (!strcasecmp(name, "tsize")) c->tsize = v;
    }
}

static void start_client(struct client *c, int index, int64_t t)
{
    memset(c, 0, sizeof *c);
    c->out_fd = -1;
    c->tsize = -1;
    c->blksize = 512;
    c->window = 1;
    c->next = 1;
    c->t_start = c->t_last = t;
    c->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    if (setsockopt(c->fd, SOL_SOCKET, SO_RCVBUFFORCE, &g_rcvbuf, sizeof g_rcvbuf) < 0)
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &g_rcvbuf, sizeof g_rcvbuf);
    struct sockaddr_in me = { .sin_family = AF_INET };
    me.sin_addr = g_server.sin_addr;   /* same loopback address as the server */
    if (bind(c->fd, (struct sockaddr *)&me, sizeof me) < 0) die("bind");
    if (g_outpath && index == 0) {
        c->out_fd = open(g_outpath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (c->out_fd < 0) die("open output");
        c->out_len = -1;
    }
    c->state = ST_FIRST;
    if (sendto(c->fd, g_rrq, g_rrq_len, 0, (struct sockaddr *)&g_server, sizeof g_server) < 0)
        snprintf(c->msg, sizeof c->msg, "sendto: %s", strerror(errno));
}

/* Handle one datagram for client c; returns nothing, may finish the client. */
static void on_packet(struct client *c, const unsigned char *p, ssize_t n, int64_t t,
                      const struct sockaddr_in *from)
{
    if (n < 4) return;
    uint16_t op = (uint16_t)(p[0] << 8 | p[1]);
    if (c->state == ST_FIRST) {
        if (op == OP_ERROR) {
            snprintf(c->msg, sizeof c->msg, "ERROR %u %.60s", p[2] << 8 | p[3], (const char *)p + 4);
            finish(c, 0, NULL, t);
            return;
        }
        if (op != OP_OACK && op != OP_DATA) return;
        if (from && connect(c->fd, (const struct sockaddr *)from, sizeof *from) < 0) {
            finish(c, 0, "connect failed", t);
            return;
        }
        c->connected = 1;
        c->state = ST_RUN;
        c->tries = 0;
        if (op == OP_OACK) {
            parse_oack(c, p, (size_t)n);
            if (c->blksize < 8 || c->blksize > 65464 || c->window < 1) {
                finish(c, 0, "bad OACK", t);
                return;
            }
            if (c->out_fd >= 0 && c->tsize > 0) {
                if (ftruncate(c->out_fd, (off_t)c->tsize) == 0) {
                    void *m = mmap(NULL, (size_t)c->tsize, PROT_READ | PROT_WRITE, MAP_SHARED, c->out_fd, 0);
                    if (m != MAP_FAILED) { c->out = m; c->out_len = c->tsize; }
                }
            }
            c->t_last = t;
            send_ack(c, 0);
            return;
        }
        /* DATA without OACK: the server took no options */
        c->blksize = 512;
        c->window = 1;
    }
    if (c->state != ST_RUN) return;
    if (op == OP_DATA) {
        uint16_t blk = (uint16_t)(p[2] << 8 | p[3]);
        size_t len = (size_t)n - 4;
        c->t_last = t;
        if (blk == (uint16_t)c->next) {
            if (len > c->blksize) { finish(c, 0, "DATA longer than blksize", t); return; }
            if (c->out_fd >= 0) store(c, p + 4, len, (c->next - 1) * (uint64_t)c->blksize);
            c->bytes += len;
            c->next++;
            c->tries = 0;
            c->reacked = 0;
            if (len < c->blksize) {
                send_ack(c, blk);
                if (c->tsize >= 0 && (uint64_t)c->tsize != c->bytes) {
                    snprintf(c->msg, sizeof c->msg, "size %llu != tsize %lld",
                             (unsigned long long)c->bytes, (long long)c->tsize);
                    finish(c, 0, NULL, t);
                } else if (g_expect >= 0 && (uint64_t)g_expect != c->bytes) {
                    snprintf(c->msg, sizeof c->msg, "size %llu != expected %lld",
                             (unsigned long long)c->bytes, (long long)g_expect);
                    finish(c, 0, NULL, t);
                } else {
                    finish(c, 1, NULL, t);
                }
                return;
            }
            if (++c->since_ack >= c->window) {
                send_ack(c, blk);
                c->since_ack = 0;
            }
        } else if (!c->reacked) {
            /* a gap (lost block) or a retransmitted window: ACK what we have */
            send_ack(c, (uint16_t)(c->next - 1));
            c->since_ack = 0;
            c->reacked = 1;
            c->retrans++;
        }
    } else if (op == OP_OACK) {
        if (c->next == 1) { send_ack(c, 0); c->retrans++; }   /* our ACK 0 was lost */
    } else if (op == OP_ERROR) {
        snprintf(c->msg, sizeof c->msg, "ERROR %u %.60s", p[2] << 8 | p[3], (const char *)p + 4);
        finish(c, 0, NULL, t);
    }
}

static void on_timeout(struct client *c, int64_t t)
{
    if (++c->tries > g_retries) {
        snprintf(c->msg, sizeof c->msg, "timeout after %d retries (block %llu)",
                 g_retries, (unsigned long long)c->next);
        finish(c, 0, NULL, t);
        return;
    }
    c->timeouts++;
    c->t_last = t;
    if (c->state == ST_FIRST) {
        sendto(c->fd, g_rrq, g_rrq_len, 0, (struct sockaddr *)&g_server, sizeof g_server);
    } else {
        send_ack(c, (uint16_t)(c->next - 1));
        c->since_ack = 0;
        c->reacked = 0;
    }
}

static void report(const struct client *c, int index)
{
    char line[256];
    char msg[81];
    size_t i;
    snprintf(msg, sizeof msg, "%s", c->msg[0] ? c->msg : "-");
    for (i = 0; msg[i]; i++) if (isspace((unsigned char)msg[i]) || !isprint((unsigned char)msg[i])) msg[i] = '_';
    int l = snprintf(line, sizeof line, "C %d %s %lld %lld %llu %llu %llu %llu %u %u %lld %s\n",
                     index, c->state == ST_OK ? "ok" : "fail",
                     (long long)c->t_start, (long long)c->t_end,
                     (unsigned long long)c->bytes, (unsigned long long)(c->next - 1),
                     (unsigned long long)c->retrans, (unsigned long long)c->timeouts, c->blksize, c->window,
                     (long long)c->tsize, msg);
    if (write(1, line, (size_t)l) < 0) { /* nothing to do */ }
}

/* One worker: the clients whose index % jobs == job, at most conc at once. */
static void run_worker(int job)
{
    int mine = 0;
    for (int i = job; i < g_nclients; i += g_jobs) mine++;
    if (!mine) return;
    int conc = g_conc / g_jobs + (job < g_conc % g_jobs ? 1 : 0);
    if (conc < 1) conc = 1;
    if (conc > mine) conc = mine;

    struct client *cl = calloc((size_t)conc, sizeof *cl);
    int *slot_index = calloc((size_t)conc, sizeof *slot_index);
    if (!cl || !slot_index) die("calloc");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");

    int64_t t0 = now_ns();
    int64_t deadline = t0 + g_deadline_ns;
    int started = 0, done = 0, active = 0;
    int next_index = job;

    for (int s = 0; s < conc; s++) cl[s].state = ST_IDLE;

    struct epoll_event evs[256];
    int64_t last_scan = t0;
    while (done < mine) {
        int64_t t = now_ns();
        /* fill free slots */
        for (int s = 0; s < conc && started < mine; s++) {
            if (cl[s].state != ST_IDLE) continue;
            slot_index[s] = next_index;
            start_client(&cl[s], next_index, t);
            next_index += g_jobs;
            started++;
            active++;
            struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)s };
            if (epoll_ctl(ep, EPOLL_CTL_ADD, cl[s].fd, &ev) < 0) die("epoll_ctl");
        }
        int n;
        if (active == 1 && conc == 1) {
            /* one client: block in recv itself (one syscall per packet fewer) */
            n = 0;
            struct client *c = &cl[0];
            int64_t wait = c->t_last + g_timeout_ns - t;
            if (wait < 1000000) wait = 1000000;
            struct timeval tv = { .tv_sec = wait / 1000000000LL, .tv_usec = (wait % 1000000000LL) / 1000 };
            int fl = fcntl(c->fd, F_GETFL);
            fcntl(c->fd, F_SETFL, fl & ~O_NONBLOCK);
            setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            while (c->state == ST_FIRST || c->state == ST_RUN) {
                struct sockaddr_in from;
                socklen_t fl2 = sizeof from;
                ssize_t r = c->connected ? recv(c->fd, g_buf, sizeof g_buf, 0)
                                         : recvfrom(c->fd, g_buf, sizeof g_buf, 0, (struct sockaddr *)&from, &fl2);
                int64_t t2 = now_ns();
                if (r >= 0) {
                    on_packet(c, g_buf, r, t2, c->connected ? NULL : &from);
                } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    on_timeout(c, t2);
                } else if (errno != EINTR && errno != ECONNREFUSED) {
                    snprintf(c->msg, sizeof c->msg, "recv: %s", strerror(errno));
                    finish(c, 0, NULL, t2);
                }
                if (t2 > deadline && (c->state == ST_FIRST || c->state == ST_RUN))
                    finish(c, 0, "run deadline", t2);
            }
        } else {
            int64_t wait_ms = 5;
            n = epoll_wait(ep, evs, 256, (int)wait_ms);
            if (n < 0 && errno != EINTR) die("epoll_wait");
            t = now_ns();
            for (int e = 0; e < n; e++) {
                struct client *c = &cl[evs[e].data.u32];
                for (int k = 0; k < 64 && (c->state == ST_FIRST || c->state == ST_RUN); k++) {
                    struct sockaddr_in from;
                    socklen_t fl2 = sizeof from;
                    ssize_t r = c->connected ? recv(c->fd, g_buf, sizeof g_buf, 0)
                                             : recvfrom(c->fd, g_buf, sizeof g_buf, 0, (struct sockaddr *)&from, &fl2);
                    if (r < 0) {
                        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNREFUSED) {
                            snprintf(c->msg, sizeof c->msg, "recv: %s", strerror(errno));
                            finish(c, 0, NULL, t);
                        }
                        break;
                    }
                    on_packet(c, g_buf, r, t, c->connected ? NULL : &from);
                    /* lock-step: nothing more can be queued right after our ACK */
                    if (c->window == 1 && c->state == ST_RUN) break;
                }
            }
            if (t - last_scan >= 5000000) {
                last_scan = t;
                for (int s = 0; s < conc; s++) {
                    struct client *c = &cl[s];
                    if (c->state != ST_FIRST && c->state != ST_RUN) continue;
                    if (t > deadline) finish(c, 0, "run deadline", t);
                    else if (t - c->t_last >= g_timeout_ns) on_timeout(c, t);
                }
            }
        }
        /* report and free finished slots */
        for (int s = 0; s < conc; s++) {
            if (cl[s].state == ST_OK || cl[s].state == ST_FAIL) {
                report(&cl[s], slot_index[s]);
                cl[s].state = ST_IDLE;
                done++;
                active--;
            }
        }
        if (now_ns() > deadline) {
            /* clients never started count as failures */
            while (started < mine) {
                struct client c0;
                memset(&c0, 0, sizeof c0);
                c0.state = ST_FAIL;
                c0.next = 1;
                snprintf(c0.msg, sizeof c0.msg, "not started (run deadline)");
                report(&c0, next_index);
                next_index += g_jobs;
                started++;
                done++;
            }
        }
    }
    close(ep);
    free(cl);
    free(slot_index);
}

/* ---- memory of the server's process tree, sampled from /proc ---- */

static int read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

/* Sum of resident KiB over root and its descendants; *nproc gets the count;
 * with pss != NULL also the sum of proportional set sizes (smaps_rollup). */
static long tree_rss_kib(pid_t root, int *nproc, long *pss)
{
    static pid_t pids[65536], ppids[65536];
    int n = 0;
    char path[300], buf[4096];
    DIR *d = opendir("/proc");
    if (!d) return -1;
    struct dirent *de;
    while ((de = readdir(d)) && n < 65536) {
        if (de->d_name[0] < '1' || de->d_name[0] > '9') continue;
        snprintf(path, sizeof path, "/proc/%s/stat", de->d_name);
        if (read_small(path, buf, sizeof buf) <= 0) continue;
        char *rp = strrchr(buf, ')');
        if (!rp) continue;
        int pp = 0;
        char st;
        if (sscanf(rp + 1, " %c %d", &st, &pp) != 2) continue;
        pids[n] = atoi(de->d_name);
        ppids[n] = pp;
        n++;
    }
    closedir(d);
    /* mark the tree: repeat until no new member (trees here are shallow) */
    static char in[65536];
    memset(in, 0, (size_t)n);
    int found = 0, changed = 1;
    for (int i = 0; i < n; i++) if (pids[i] == root) { in[i] = 1; found = 1; }
    if (!found) { *nproc = 0; return 0; }
    if (pss) *pss = 0;
    for (int pass = 0; changed && pass < 16; pass++) {
        changed = 0;
        for (int i = 0; i < n; i++) {
            if (in[i]) continue;
            for (int j = 0; j < n; j++)
                if (in[j] && pids[j] == ppids[i]) { in[i] = 1; changed = 1; break; }
        }
    }
    long total = 0;
    int count = 0;
    long page_kib = sysconf(_SC_PAGESIZE) / 1024;
    for (int i = 0; i < n; i++) {
        if (!in[i]) continue;
        snprintf(path, sizeof path, "/proc/%d/statm", pids[i]);
        if (read_small(path, buf, sizeof buf) <= 0) continue;
        long size = 0, res = 0;
        if (sscanf(buf, "%ld %ld", &size, &res) == 2) { total += res * page_kib; count++; }
        if (pss) {
            snprintf(path, sizeof path, "/proc/%d/smaps_rollup", pids[i]);
            if (read_small(path, buf, sizeof buf) > 0) {
                char *q = strstr(buf, "\nPss:");
                if (q) *pss += strtol(q + 5, NULL, 10);
            }
        }
    }
    *nproc = count;
    return total;
}

/* R <user_us> <sys_us>: CPU used by this client (all its processes) */
static void print_rusage(void)
{
    struct rusage a, b;
    getrusage(RUSAGE_SELF, &a);
    getrusage(RUSAGE_CHILDREN, &b);
    long long u = (long long)(a.ru_utime.tv_sec + b.ru_utime.tv_sec) * 1000000LL + a.ru_utime.tv_usec + b.ru_utime.tv_usec;
    long long s = (long long)(a.ru_stime.tv_sec + b.ru_stime.tv_sec) * 1000000LL + a.ru_stime.tv_usec + b.ru_stime.tv_usec;
    printf("R %lld %lld\n", u, s);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: tftpbench -p PORT -f FILE [-a ADDR] [-n CLIENTS] [-c CONCURRENT] [-j JOBS]\n"
            "                 [-b BLKSIZE] [-w WINDOWSIZE] [-S] [-e EXPECTED_BYTES] [-t TIMEOUT_MS]\n"
            "                 [-r RETRIES] [-T DEADLINE_S] [-o OUTFILE] [-M SERVER_PID] [-i SAMPLE_MS]\n"
            "  -b 0 / -w 0: do not ask for the option; -S: do not ask for tsize\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int opt;
    const char *addr = "127.0.0.1";
    int port = 0;
    while ((opt = getopt(argc, argv, "a:p:f:n:c:j:b:w:Se:t:r:T:o:M:i:h")) != -1) {
        switch (opt) {
        case 'a': addr = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': g_file = optarg; break;
        case 'n': g_nclients = atoi(optarg); break;
        case 'c': g_conc = atoi(optarg); break;
        case 'j': g_jobs = atoi(optarg); break;
        case 'b': g_blksize = (uint32_t)atoi(optarg); break;
        case 'w': g_window = (uint32_t)atoi(optarg); break;
        case 'S': g_ask_tsize = 0; break;
        case 'e': g_expect = atoll(optarg); break;
        case 't': g_timeout_ns = atoll(optarg) * 1000000LL; break;
        case 'r': g_retries = atoi(optarg); break;
        case 'T': g_deadline_ns = (int64_t)(atof(optarg) * 1e9); break;
        case 'o': g_outpath = optarg; break;
        case 'M': g_mon_pid = (pid_t)atoi(optarg); break;
        case 'i': g_mon_ms = atoi(optarg); break;
        default: usage();
        }
    }
    if (!g_file || port <= 0 || port > 65535 || g_nclients < 1 || g_conc < 1 || g_jobs < 1 ||
        g_jobs > 64 || g_retries < 0 || g_mon_ms < 1)
        usage();
    if (g_blksize && (g_blksize < 8 || g_blksize > 65464)) usage();
    if (g_window > 65535) usage();
    if (g_jobs > g_nclients) g_jobs = g_nclients;
    memset(&g_server, 0, sizeof g_server);
    g_server.sin_family = AF_INET;
    g_server.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &g_server.sin_addr) != 1) usage();
    build_rrq();
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IONBF, 0);

    if (g_jobs == 1 && !g_mon_pid) {
        run_worker(0);
        print_rusage();
        return 0;
    }
    pid_t kids[64];
    for (int j = 0; j < g_jobs; j++) {
        pid_t k = fork();
        if (k < 0) die("fork");
        if (k == 0) { run_worker(j); _exit(0); }
        kids[j] = k;
    }
    int left = g_jobs, samples = 0, peak_procs = 0, status = 0;
    long peak = 0, peak_pss = 0;
    int64_t limit = now_ns() + g_deadline_ns + 30LL * 1000000000LL;
    while (left > 0) {
        if (g_mon_pid) {
            int np = 0;
            long pss = 0;
            long kib = tree_rss_kib(g_mon_pid, &np, samples % 4 == 0 ? &pss : NULL);
            if (pss > peak_pss) peak_pss = pss;
            samples++;
            if (kib > peak) peak = kib;
            if (np > peak_procs) peak_procs = np;
        }
        for (;;) {
            pid_t w = waitpid(-1, &status, g_mon_pid ? WNOHANG : 0);
            if (w > 0) { left--; if (WIFEXITED(status) && WEXITSTATUS(status)) fprintf(stderr, "worker exit %d\n", WEXITSTATUS(status)); continue; }
            break;
        }
        if (left > 0 && g_mon_pid) {
            struct timespec ts = { .tv_sec = g_mon_ms / 1000, .tv_nsec = (g_mon_ms % 1000) * 1000000L };
            nanosleep(&ts, NULL);
        }
        if (now_ns() > limit) {
            for (int j = 0; j < g_jobs; j++) kill(kids[j], SIGKILL);
        }
    }
    if (g_mon_pid) printf("M %ld %d %d %ld\n", peak, peak_procs, samples, peak_pss);
    print_rusage();
    return 0;
}
