/*
 * driver.c - MTA-side load generator for milters (txmilt benchmarks).
 *
 * One thread, non-blocking sockets, epoll.  Each "session"
 * is one SMTP session as Postfix runs it against a list of milters
 * (smtpd_milters = a, b, c): OPTNEG, macros + CONNECT, HELO, then per message
 * MAIL, RCPT..., DATA, (D L + HEADER)..., EOH, (D B + BODY)..., EOB, ABORT,
 * and QUIT at the end.  With several milters every command goes to milter 1,
 * then 2, then 3, each on its own socket, waiting for each reply.
 *
 * NO flags in a milter's OPTNEG reply switch the command off (its macro
 * packet is still sent, as both MTAs do); NR flags mean no reply is awaited.
 * Every reply is checked: final letters must be 'c' or 'a' ('s' for BODY),
 * and at EOB exactly --expect-headers ADDHEADER packets whose name starts
 * with --header-name must arrive before the final reply (PROGRESS packets
 * are ignored); anything else is an error and the session is dropped.
 *
 * Output: one JSON object on stdout.  In --idle mode the driver opens N
 * sessions, takes each through OPTNEG, CONNECT and HELO, prints a line
 * {"ready": n, ...} when all are established (or no progress was made for
 * --timeout seconds, or --ready-within seconds passed), holds them until stdin
 * closes or SIGTERM/SIGINT, then prints the JSON result.  At most --burst
 * sessions are in their handshake at once, to stay inside listen backlogs.
 *
 * Like Postfix, the driver leaves delayed ACKs on.  A milter that writes its
 * EOB packets one write() at a time without TCP_NODELAY (libmilter, and so
 * pymilter; python-libmilter) then waits about 40 ms per message for the ACK
 * (Nagle); --quickack acknowledges every read at once to take that stall out.
 *
 * libc/POSIX/Linux only.  Build: gcc -O2 -o driver driver.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAXCHAIN 8
#define MAX_FRAME (16u * 1024 * 1024)
#define CHUNK 65535

/* protocol flags (SMFIP_*) */
#define P_NOCONNECT 0x1u
#define P_NOHELO 0x2u
#define P_NOMAIL 0x4u
#define P_NORCPT 0x8u
#define P_NOBODY 0x10u
#define P_NOHDRS 0x20u
#define P_NOEOH 0x40u
#define P_NR_HDR 0x80u
#define P_NODATA 0x200u
#define P_NR_CONN 0x1000u
#define P_NR_HELO 0x2000u
#define P_NR_MAIL 0x4000u
#define P_NR_RCPT 0x8000u
#define P_NR_DATA 0x10000u
#define P_NR_EOH 0x40000u
#define P_NR_BODY 0x80000u

enum kind { K_OPTNEG, K_CMD, K_EOB, K_ABORT, K_QUIT };

struct step {
    unsigned char *data; /* macro packet (if any) followed by the command packet */
    size_t len;
    size_t macro_len;
    char letter;
    enum kind kind;
};

struct msock {
    int fd;
    int connected;
    int eof;
    int want_out; /* EPOLLOUT is armed: a send would have blocked */
    unsigned proto; /* negotiated protocol flags */
    int skip_body;  /* answered SKIP: no more BODY for this message */
    unsigned char *rbuf;
    size_t rlen, rcap;
};

enum cstate { C_FREE, C_SEND, C_WAIT, C_IDLE };

struct conn {
    enum cstate state;
    struct msock m[MAXCHAIN];
    int idx;        /* current step */
    int mi;         /* current milter in the chain */
    size_t off;     /* bytes of the current step written to the current milter */
    int msgs;       /* messages finished on this session */
    int in_message; /* a message was started and not finished */
    int first_msg;  /* has not yet started its first message */
    int hcount;     /* ADDHEADERs seen at this EOB, over the chain */
    double t_mail;
    double deadline;
};

/* ------------------------------------------------------------ options */

static const char *opt_host = "127.0.0.1";
static int opt_ports[MAXCHAIN];
static const char *opt_unix[MAXCHAIN];
static int nchain;
static int opt_conc = 1;
static int opt_per_conn = 1;
static long opt_total = 0;
static double opt_duration = 0;
static int opt_headers = 10;
static long opt_body = 2048;
static int opt_rcpts = 1;
static int opt_expect = 1;
static const char *opt_hname = "X-Bench";
static long opt_idle = 0;
static double opt_timeout = 30;
static long opt_max_errors = 1000;
static int opt_burst = 64;
static double opt_ready_within = 120;
static int opt_quickack = 0;

/* ------------------------------------------------------------ state */

static struct step *steps;
static int nsteps, msg_start, msg_end, quit_step;
static struct conn *conns;
static int nconns;
static int epfd;
static struct addrinfo *addrs[MAXCHAIN];

static long msgs_started, msgs_ok, errors, sessions_opened, pending_first;
static long established, dropped_idle;
static double *lat;
static long nlat, lat_cap;
static double t_start, t_end_budget;
static int stopping;
static volatile sig_atomic_t got_signal;
static char err_samples[5][200];
static int n_err_samples;
static long active;
static unsigned first_proto[MAXCHAIN];
static int seen_proto[MAXCHAIN];

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "driver: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory");
    return p;
}

/* ------------------------------------------------------------ packets */

struct buf {
    unsigned char *p;
    size_t len, cap;
};

static void b_put(struct buf *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die("out of memory");
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void b_u32(struct buf *b, uint32_t v) {
    unsigned char x[4] = {v >> 24, v >> 16, v >> 8, v};
    b_put(b, x, 4);
}

static void b_str(struct buf *b, const char *s) { b_put(b, s, strlen(s) + 1); }

/* Append a packet: letter + payload. */
static void b_packet(struct buf *b, char letter, const struct buf *payload) {
    b_u32(b, (uint32_t)(1 + (payload ? payload->len : 0)));
    b_put(b, &letter, 1);
    if (payload && payload->len) b_put(b, payload->p, payload->len);
}

/* Append a macro packet for `letter` with NULL-terminated name/value pairs. */
static void b_macros(struct buf *b, char letter, const char *const *pairs) {
    struct buf pl = {0};
    b_put(&pl, &letter, 1);
    for (int i = 0; pairs && pairs[i]; i++) b_str(&pl, pairs[i]);
    b_packet(b, 'D', &pl);
    free(pl.p);
}

static void add_step(struct buf *macro, char letter, const struct buf *payload, enum kind kind) {
    struct buf all = {0};
    size_t mlen = 0;
    if (macro && macro->len) {
        b_put(&all, macro->p, macro->len);
        mlen = macro->len;
    }
    b_packet(&all, letter, payload);
    steps = realloc(steps, sizeof *steps * (nsteps + 1));
    if (!steps) die("out of memory");
    steps[nsteps++] = (struct step){all.p, all.len, mlen, letter, kind};
}

static const char *HEADER_NAMES[] = {
    "From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
    "Content-Transfer-Encoding", "X-Mailer", "Reply-To", "List-Id", "X-Priority",
};

static void build_steps(void) {
    struct buf m = {0}, p = {0};
    const char *qid = "4BvZ7Q2x9Kz1";

    /* OPTNEG: version 6, actions 0x1FF, protocol 0x1FFFFF */
    b_u32(&p, 6);
    b_u32(&p, 0x1FF);
    b_u32(&p, 0x1FFFFF);
    add_step(NULL, 'O', &p, K_OPTNEG);

    /* CONNECT with Postfix's default connect macros */
    p.len = m.len = 0;
    const char *cmac[] = {"j", "mx.example.net", "{daemon_name}", "mx.example.net",
                          "{daemon_addr}", "127.0.0.1", "v", "Postfix 3.7.11",
                          "_", "client.example.com [192.0.2.10]", NULL};
    b_macros(&m, 'C', cmac);
    b_str(&p, "client.example.com");
    b_put(&p, "4", 1);
    unsigned char port[2] = {0xd4, 0x31};
    b_put(&p, port, 2);
    b_str(&p, "192.0.2.10");
    add_step(&m, 'C', &p, K_CMD);

    /* HELO (no TLS, so the HELO macro packet is empty) */
    p.len = m.len = 0;
    b_macros(&m, 'H', NULL);
    b_str(&p, "client.example.com");
    add_step(&m, 'H', &p, K_CMD);

    msg_start = nsteps;
    char size[64];
    snprintf(size, sizeof size, "SIZE=%ld", opt_body + 60L * opt_headers);
    p.len = m.len = 0;
    const char *mmac[] = {"{mail_addr}", "sender@example.com", "{mail_host}", "example.com",
                          "{mail_mailer}", "smtp", NULL};
    b_macros(&m, 'M', mmac);
    b_str(&p, "<sender@example.com>");
    b_str(&p, "BODY=8BITMIME");
    b_str(&p, size);
    add_step(&m, 'M', &p, K_CMD);

    for (int r = 0; r < opt_rcpts; r++) {
        char addr[80], bare[64];
        snprintf(bare, sizeof bare, "rcpt%d@example.net", r + 1);
        snprintf(addr, sizeof addr, "<%s>", bare);
        p.len = m.len = 0;
        const char *rmac[] = {"i", qid, "{rcpt_addr}", bare, "{rcpt_host}", "example.net",
                              "{rcpt_mailer}", "smtp", NULL};
        b_macros(&m, 'R', rmac);
        b_str(&p, addr);
        add_step(&m, 'R', &p, K_CMD);
    }

    const char *imac[] = {"i", qid, NULL};
    p.len = m.len = 0;
    b_macros(&m, 'T', imac);
    add_step(&m, 'T', NULL, K_CMD);

    int nnames = sizeof HEADER_NAMES / sizeof *HEADER_NAMES;
    for (int h = 0; h < opt_headers; h++) {
        char name[64], value[128];
        if (h < nnames)
            snprintf(name, sizeof name, "%s", HEADER_NAMES[h]);
        else
            snprintf(name, sizeof name, "X-Extra-%d", h);
        snprintf(value, sizeof value, "value of header %d for the benchmark <x%d@example.com>", h, h);
        p.len = m.len = 0;
        b_macros(&m, 'L', imac);
        b_str(&p, name);
        b_str(&p, value);
        add_step(&m, 'L', &p, K_CMD);
    }

    p.len = m.len = 0;
    b_macros(&m, 'N', imac);
    add_step(&m, 'N', NULL, K_CMD);

    /* body: 76-character lines with CRLF, exactly opt_body bytes, in 65535-byte chunks */
    unsigned char *body = xmalloc(opt_body);
    for (long i = 0; i < opt_body; i++) {
        long col = i % 78;
        body[i] = col == 76 ? '\r' : col == 77 ? '\n' : (unsigned char)('a' + (i / 78 + col) % 26);
    }
    for (long at = 0; at < opt_body; at += CHUNK) {
        long n = opt_body - at < CHUNK ? opt_body - at : CHUNK;
        p.len = m.len = 0;
        b_macros(&m, 'B', imac);
        b_put(&p, body + at, n);
        add_step(&m, 'B', &p, K_CMD);
    }
    free(body);

    p.len = m.len = 0;
    b_macros(&m, 'E', imac);
    add_step(&m, 'E', NULL, K_EOB);

    add_step(NULL, 'A', NULL, K_ABORT);
    msg_end = nsteps;
    add_step(NULL, 'Q', NULL, K_QUIT);
    quit_step = nsteps - 1;
    free(m.p);
    free(p.p);
}

/* ------------------------------------------------------------ flags */

static unsigned no_flag(char letter) {
    switch (letter) {
    case 'C': return P_NOCONNECT;
    case 'H': return P_NOHELO;
    case 'M': return P_NOMAIL;
    case 'R': return P_NORCPT;
    case 'T': return P_NODATA;
    case 'L': return P_NOHDRS;
    case 'N': return P_NOEOH;
    case 'B': return P_NOBODY;
    default: return 0;
    }
}

static unsigned nr_flag(char letter) {
    switch (letter) {
    case 'C': return P_NR_CONN;
    case 'H': return P_NR_HELO;
    case 'M': return P_NR_MAIL;
    case 'R': return P_NR_RCPT;
    case 'T': return P_NR_DATA;
    case 'L': return P_NR_HDR;
    case 'N': return P_NR_EOH;
    case 'B': return P_NR_BODY;
    default: return 0;
    }
}

/* Is the command itself skipped for this milter (only its macros go out)? */
static int skipped(const struct step *s, const struct msock *ms) {
    if (s->kind != K_CMD) return 0;
    if (s->letter == 'B' && ms->skip_body) return 1;
    return (ms->proto & no_flag(s->letter)) != 0;
}

static int wants_reply(const struct step *s, const struct msock *ms) {
    switch (s->kind) {
    case K_OPTNEG:
    case K_EOB: return 1;
    case K_CMD: return !skipped(s, ms) && !(ms->proto & nr_flag(s->letter));
    default: return 0;
    }
}

/* ------------------------------------------------------------ sessions */

static void note_error(struct conn *c, const char *fmt, ...) {
    errors++;
    if (n_err_samples < 5) {
        char msg[160];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
        snprintf(err_samples[n_err_samples++], sizeof err_samples[0], "step %c milter %d: %s",
                 c && c->idx < nsteps ? steps[c->idx].letter : '?', c ? c->mi + 1 : 0, msg);
    }
}

static int budget_left(void) {
    if (stopping) return 0;
    if (opt_idle) return 0;
    if (opt_duration > 0) return now() < t_end_budget;
    return msgs_started < opt_total;
}

static void close_conn(struct conn *c) {
    for (int i = 0; i < nchain; i++) {
        struct msock *ms = &c->m[i];
        if (ms->fd >= 0) close(ms->fd);
        ms->fd = -1;
        free(ms->rbuf);
        ms->rbuf = NULL;
        ms->rlen = ms->rcap = 0;
    }
    if (c->first_msg) pending_first--;
    if (c->state == C_IDLE) established--;
    c->state = C_FREE;
    active--;
}

static void fail_conn(struct conn *c) {
    if (opt_idle && c->state == C_IDLE) dropped_idle++;
    close_conn(c);
}

static int open_socket(int i) {
    int fd;
    if (opt_unix[i]) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof sa.sun_path, "%s", opt_unix[i]);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0 && errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
    } else {
        struct addrinfo *ai = addrs[i];
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return -1;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
    }
    return fd;
}

static void advance(struct conn *c);

/* Level-triggered EPOLLIN always; EPOLLOUT only while a send is blocked. */
static void arm_out(struct conn *c, int i, int on) {
    struct msock *ms = &c->m[i];
    if (ms->want_out == on) return;
    ms->want_out = on;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0),
                             .data.u64 = ((uint64_t)(c - conns) << 8) | (unsigned)i};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, ms->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static int open_conn(void) {
    int slot = -1;
    for (int i = 0; i < nconns; i++)
        if (conns[i].state == C_FREE) {
            slot = i;
            break;
        }
    if (slot < 0) return -1;
    struct conn *c = &conns[slot];
    memset(c, 0, sizeof *c);
    for (int i = 0; i < nchain; i++) c->m[i].fd = -1;
    c->state = C_SEND;
    c->first_msg = 1;
    pending_first++;
    active++;
    sessions_opened++;
    c->deadline = now() + opt_timeout;
    for (int i = 0; i < nchain; i++) {
        int fd = open_socket(i);
        if (fd < 0) {
            note_error(c, "connect: %s", strerror(errno));
            fail_conn(c);
            return 0;
        }
        c->m[i].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = ((uint64_t)slot << 8) | (unsigned)i};
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    }
    advance(c);
    return 0;
}

/* Start sessions while there is budget and room. */
static void refill(void) {
    if (opt_idle) {
        long handshaking = active - established;
        while (sessions_opened < opt_idle && handshaking < opt_burst && active < nconns) {
            open_conn();
            handshaking = active - established;
        }
        return;
    }
    while (active < nconns && budget_left()) {
        if (opt_duration <= 0 && msgs_started + pending_first >= opt_total) break;
        if (errors >= opt_max_errors) break;
        open_conn();
    }
}

static void record_latency(double ms) {
    if (nlat == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 4096;
        lat = realloc(lat, sizeof *lat * lat_cap);
        if (!lat) die("out of memory");
    }
    lat[nlat++] = ms;
}

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/*
 * Consume reply packets for the current step from the current milter.
 * Returns 1 when the final reply arrived, 0 when more bytes are needed,
 * -1 on an error (already noted).
 */
static int take_reply(struct conn *c) {
    struct msock *ms = &c->m[c->mi];
    const struct step *s = &steps[c->idx];
    size_t pos = 0;
    int result = 0;
    while (result == 0) {
        if (ms->rlen - pos < 5) break;
        uint32_t len = be32(ms->rbuf + pos);
        if (len == 0 || len > MAX_FRAME) {
            note_error(c, "bad reply length %u", len);
            return -1;
        }
        if (ms->rlen - pos < 4 + (size_t)len) break;
        char letter = (char)ms->rbuf[pos + 4];
        const unsigned char *pl = ms->rbuf + pos + 5;
        size_t plen = len - 1;
        pos += 4 + len;
        if (letter == 'p') continue; /* PROGRESS: still working */
        switch (s->kind) {
        case K_OPTNEG:
            if (letter != 'O' || plen < 12) {
                note_error(c, "OPTNEG answered with '%c' (%zu bytes)", letter, plen);
                return -1;
            }
            ms->proto = be32(pl + 8);
            if (!seen_proto[c->mi]) {
                seen_proto[c->mi] = 1;
                first_proto[c->mi] = ms->proto;
            }
            result = 1;
            break;
        case K_EOB:
            if (letter == 'h') {
                size_t n = strlen(opt_hname);
                if (plen < n + 2 || memcmp(pl, opt_hname, n) != 0 || pl[plen - 1] != 0) {
                    note_error(c, "unexpected ADDHEADER %.*s", (int)(plen > 40 ? 40 : plen), pl);
                    return -1;
                }
                c->hcount++;
            } else if (letter == 'c' || letter == 'a') {
                result = 1;
            } else {
                note_error(c, "unexpected '%c' packet at EOB", letter);
                return -1;
            }
            break;
        default:
            if (letter == 'c' || letter == 'a') {
                result = 1;
            } else if (letter == 's' && s->letter == 'B') {
                ms->skip_body = 1;
                result = 1;
            } else {
                note_error(c, "unexpected reply '%c'", letter);
                return -1;
            }
        }
    }
    if (pos) {
        memmove(ms->rbuf, ms->rbuf + pos, ms->rlen - pos);
        ms->rlen -= pos;
    }
    if (result == 1 && ms->rlen) {
        note_error(c, "%zu extra bytes after the final reply", ms->rlen);
        return -1;
    }
    return result;
}

/* Move to the next step once every milter has had the current one. */
static void next_step(struct conn *c) {
    const struct step *s = &steps[c->idx];
    if (s->kind == K_EOB && c->hcount != opt_expect) {
        note_error(c, "%d ADDHEADER packets at EOB from the chain, expected %d", c->hcount, opt_expect);
        c->in_message = 0;
        fail_conn(c);
        return;
    }
    c->mi = 0;
    c->off = 0;
    if (s->kind == K_EOB) {
        msgs_ok++;
        record_latency((now() - c->t_mail) * 1000.0);
        c->in_message = 0;
    }
    if (s->kind == K_QUIT) {
        close_conn(c);
        return;
    }
    if (s->kind == K_ABORT) {
        c->msgs++;
        c->idx = msg_start;
    } else {
        c->idx++;
    }
    if (c->idx == msg_start) {
        /* a new message, or the end of the session */
        if (opt_idle) {
            c->state = C_IDLE;
            established++;
            if (c->first_msg) {
                c->first_msg = 0;
                pending_first--;
            }
            return;
        }
        if (c->msgs >= opt_per_conn || !budget_left() || errors >= opt_max_errors) {
            c->idx = quit_step;
        } else {
            msgs_started++;
            if (c->first_msg) {
                c->first_msg = 0;
                pending_first--;
            }
            c->in_message = 1;
            c->hcount = 0;
            for (int i = 0; i < nchain; i++) c->m[i].skip_body = 0;
            c->t_mail = now();
        }
    }
    c->state = C_SEND;
}

/* Drive one session as far as it can go without blocking. */
static void advance(struct conn *c) {
    for (;;) {
        if (c->state == C_FREE || c->state == C_IDLE) return;
        const struct step *s = &steps[c->idx];
        struct msock *ms = &c->m[c->mi];
        if (c->state == C_SEND) {
            size_t len = skipped(s, ms) ? s->macro_len : s->len;
            while (c->off < len) {
                ssize_t n = send(ms->fd, s->data + c->off, len - c->off, MSG_NOSIGNAL);
                if (n < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOTCONN) {
                        arm_out(c, c->mi, 1);
                        return;
                    }
                    if (errno == EINTR) continue;
                    note_error(c, "send: %s", strerror(errno));
                    fail_conn(c);
                    return;
                }
                ms->connected = 1;
                c->off += (size_t)n;
            }
            if (ms->want_out) arm_out(c, c->mi, 0);
            if (wants_reply(s, ms)) {
                c->state = C_WAIT;
                c->deadline = now() + opt_timeout;
            } else if (c->mi + 1 < nchain) {
                c->mi++;
                c->off = 0;
                continue;
            } else {
                next_step(c);
                continue;
            }
        }
        /* C_WAIT */
        int r = take_reply(c);
        if (r < 0) {
            fail_conn(c);
            return;
        }
        if (r == 0) {
            if (ms->eof) {
                note_error(c, "milter closed the connection");
                fail_conn(c);
            }
            return;
        }
        if (c->mi + 1 < nchain) {
            c->mi++;
            c->off = 0;
            c->state = C_SEND;
        } else {
            next_step(c);
        }
    }
}

static void read_sock(struct conn *c, int i) {
    struct msock *ms = &c->m[i];
    for (;;) {
        if (ms->rcap - ms->rlen < 4096) {
            ms->rcap = ms->rcap ? ms->rcap * 2 : 4096;
            if (ms->rcap > MAX_FRAME * 2) {
                note_error(c, "milter sent more than %u bytes unasked", MAX_FRAME);
                fail_conn(c);
                return;
            }
            ms->rbuf = realloc(ms->rbuf, ms->rcap);
            if (!ms->rbuf) die("out of memory");
        }
        ssize_t n = recv(ms->fd, ms->rbuf + ms->rlen, ms->rcap - ms->rlen, 0);
        if (n > 0 && opt_quickack) {
            int one = 1; /* ACK at once: no delayed-ACK stall when a milter splits its writes */
            setsockopt(ms->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
        }
        if (n > 0) {
            size_t room = ms->rcap - ms->rlen;
            ms->rlen += (size_t)n;
            if ((size_t)n < room) return; /* level-triggered: epoll says if more is there */
            continue;
        }
        if (n == 0) {
            ms->eof = 1;
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        ms->eof = 1; /* ECONNRESET and friends */
        return;
    }
}

static void on_event(uint64_t data, uint32_t events) {
    struct conn *c = &conns[data >> 8];
    int i = (int)(data & 0xff);
    if (c->state == C_FREE || c->m[i].fd < 0) return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) read_sock(c, i);
    if (c->state == C_FREE) return;
    if (events & EPOLLERR && !c->m[i].connected) {
        int err = 0;
        socklen_t l = sizeof err;
        getsockopt(c->m[i].fd, SOL_SOCKET, SO_ERROR, &err, &l);
        note_error(c, "connect: %s", strerror(err ? err : ECONNREFUSED));
        fail_conn(c);
        return;
    }
    if (c->state == C_IDLE) {
        if (c->m[i].eof || c->m[i].rlen) {
            note_error(c, c->m[i].eof ? "idle session closed by the milter" : "unasked data on an idle session");
            fail_conn(c);
        }
        return;
    }
    /* Only the current milter's socket makes progress; others just buffer. */
    if (i == c->mi) advance(c);
    else if (c->m[i].eof && c->state != C_FREE) {
        note_error(c, "milter %d closed the connection out of turn", i + 1);
        fail_conn(c);
    }
}

static void sweep_timeouts(double t) {
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if ((c->state == C_WAIT || c->state == C_SEND) && t > c->deadline) {
            note_error(c, "no progress for %.0f s", opt_timeout);
            fail_conn(c);
        }
    }
}

/* ------------------------------------------------------------ output */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!nlat) return 0;
    long k = (long)(p / 100.0 * (double)(nlat - 1) + 0.5);
    return lat[k];
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') printf("\\%c", ch);
        else if (ch < 0x20 || ch >= 0x7f) printf("\\u%04x", ch);
        else putchar(ch);
    }
    putchar('"');
}

static void print_result(double elapsed, double cpu) {
    qsort(lat, nlat, sizeof *lat, cmp_double);
    printf("{\"mode\": \"%s\", \"chain\": %d, \"concurrency\": %d, \"messages\": %ld, \"errors\": %ld, "
           "\"sessions\": %ld, \"elapsed_s\": %.3f, \"msg_per_s\": %.1f, \"p50_ms\": %.3f, "
           "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"driver_cpu_s\": %.3f, \"driver_cpu_pct\": %.1f",
           opt_idle ? "idle" : "load", nchain, opt_conc, msgs_ok, errors, sessions_opened, elapsed,
           elapsed > 0 ? msgs_ok / elapsed : 0, pct(50), pct(99), nlat ? lat[nlat - 1] : 0, cpu,
           elapsed > 0 ? 100.0 * cpu / elapsed : 0);
    if (opt_idle) printf(", \"established\": %ld, \"dropped\": %ld, \"target\": %ld", established, dropped_idle, opt_idle);
    printf(", \"protocol\": [");
    for (int i = 0; i < nchain; i++) printf("%s\"0x%x\"", i ? ", " : "", first_proto[i]);
    printf("], \"error_samples\": [");
    for (int i = 0; i < n_err_samples; i++) {
        if (i) printf(", ");
        json_string(err_samples[i]);
    }
    printf("]}\n");
    fflush(stdout);
}

static void on_signal(int sig) { got_signal = sig; }

static void usage(void) {
    fprintf(stderr, "MTA-side milter load driver; prints one JSON object (see bench/README.md).\n");
    fprintf(stderr,
            "usage: driver [--host H] --port P [--port P2 ...] | --unix PATH [--unix PATH2 ...]\n"
            "  [--concurrency C] [--per-conn M] (--messages N | --duration S) [--headers H]\n"
            "  [--body-size B] [--rcpts R] [--expect-headers E] [--header-name PREFIX]\n"
            "  [--idle N [--burst K] [--ready-within S]] [--timeout S] [--max-errors N] [--quickack]\n");
    exit(2);
}

int main(int argc, char **argv) {
    static struct option longopts[] = {
        {"host", required_argument, 0, 'h'},         {"port", required_argument, 0, 'p'},
        {"unix", required_argument, 0, 'u'},         {"concurrency", required_argument, 0, 'c'},
        {"per-conn", required_argument, 0, 'm'},     {"messages", required_argument, 0, 'n'},
        {"duration", required_argument, 0, 'd'},     {"headers", required_argument, 0, 'H'},
        {"body-size", required_argument, 0, 'b'},    {"rcpts", required_argument, 0, 'r'},
        {"expect-headers", required_argument, 0, 'e'}, {"header-name", required_argument, 0, 'N'},
        {"idle", required_argument, 0, 'i'},         {"timeout", required_argument, 0, 't'},
        {"max-errors", required_argument, 0, 'E'},   {"burst", required_argument, 0, 'B'},
        {"ready-within", required_argument, 0, 'R'}, {"quickack", no_argument, 0, 'Q'},
        {"help", no_argument, 0, '?'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt_host = optarg; break;
        case 'p':
        case 'u':
            if (nchain == MAXCHAIN) die("at most %d milters", MAXCHAIN);
            if (ch == 'p') opt_ports[nchain++] = atoi(optarg);
            else opt_unix[nchain++] = optarg;
            break;
        case 'c': opt_conc = atoi(optarg); break;
        case 'm': opt_per_conn = atoi(optarg); break;
        case 'n': opt_total = atol(optarg); break;
        case 'd': opt_duration = atof(optarg); break;
        case 'H': opt_headers = atoi(optarg); break;
        case 'b': opt_body = atol(optarg); break;
        case 'r': opt_rcpts = atoi(optarg); break;
        case 'e': opt_expect = atoi(optarg); break;
        case 'N': opt_hname = optarg; break;
        case 'i': opt_idle = atol(optarg); break;
        case 't': opt_timeout = atof(optarg); break;
        case 'E': opt_max_errors = atol(optarg); break;
        case 'B': opt_burst = atoi(optarg); break;
        case 'R': opt_ready_within = atof(optarg); break;
        case 'Q': opt_quickack = 1; break;
        default: usage();
        }
    }
    if (!nchain || opt_conc < 1 || opt_per_conn < 1 || opt_body < 1 || opt_rcpts < 1 || opt_headers < 0) usage();
    if (!opt_idle && opt_total <= 0 && opt_duration <= 0) usage();

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    for (int i = 0; i < nchain; i++) {
        if (opt_unix[i]) continue;
        char port[16];
        snprintf(port, sizeof port, "%d", opt_ports[i]);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
        int e = getaddrinfo(opt_host, port, &hints, &addrs[i]);
        if (e) die("%s:%s: %s", opt_host, port, gai_strerror(e));
    }
    build_steps();

    nconns = opt_idle ? (int)opt_idle : opt_conc;
    conns = calloc(nconns, sizeof *conns);
    if (!conns) die("out of memory");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));
    if (opt_idle) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
        epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev); /* stdin closing ends idle mode */
    }

    double cpu0 = cpu_seconds();
    t_start = now();
    t_end_budget = t_start + opt_duration;
    double last_sweep = t_start, last_progress = t_start;
    long last_count = -1;
    int ready_printed = 0;
    struct epoll_event evs[512];
    refill();
    for (;;) {
        if (got_signal) stopping = 1;
        if (!opt_idle && active == 0 && (!budget_left() || errors >= opt_max_errors)) break;
        if (!opt_idle && opt_duration <= 0 && active == 0 && msgs_started >= opt_total) break;
        int n = epoll_wait(epfd, evs, 512, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        for (int k = 0; k < n; k++) {
            if (evs[k].data.u64 == UINT64_MAX) {
                char tmp[256];
                ssize_t r = read(0, tmp, sizeof tmp);
                if (r <= 0) stopping = 1;
                continue;
            }
            on_event(evs[k].data.u64, evs[k].events);
        }
        double t = now();
        if (t - last_sweep > 0.5) {
            sweep_timeouts(t);
            last_sweep = t;
        }
        refill();
        if (opt_idle) {
            long done = established + errors;
            if (done != last_count) {
                last_count = done;
                last_progress = t;
            }
            if (!ready_printed && ((sessions_opened >= opt_idle && active == established) ||
                                   t - last_progress > opt_timeout || t - t_start > opt_ready_within)) {
                printf("{\"ready\": %ld, \"target\": %ld, \"errors\": %ld, \"seconds\": %.3f}\n", established,
                       opt_idle, errors, t - t_start);
                fflush(stdout);
                ready_printed = 1;
            }
            if (stopping) break;
        }
    }
    double elapsed = now() - t_start;
    double cpu = cpu_seconds() - cpu0;
    if (opt_idle) {
        /* say goodbye properly */
        static const unsigned char quit[] = {0, 0, 0, 1, 'Q'};
        long held = established;
        for (int i = 0; i < nconns; i++) {
            if (conns[i].state == C_FREE) continue;
            for (int j = 0; j < nchain; j++)
                if (conns[i].m[j].fd >= 0) send(conns[i].m[j].fd, quit, sizeof quit, MSG_NOSIGNAL);
            close_conn(&conns[i]);
        }
        established = held;
    }
    print_result(elapsed, cpu);
    return 0;
}
