/* openloop: an open-loop HTTP/1.1 load generator for benchmarks/overload.py (issue 13).
 *
 *   openloop HOST PORT PATH BODY_FILE RATE SECONDS CLIENTS MAX_CONNS TIMEOUT_S > rows.csv
 *
 * CLIENTS clients each send a request every CLIENTS / RATE seconds, their ticks staggered so that request k (of
 * client k % CLIENTS) is due at k / RATE seconds after the start, whatever the server did with the earlier ones. A
 * client sends on one of its own keep-alive connections that is idle, else on a new one of its own (up to
 * MAX_CONNS / CLIENTS each; past that the request is not sent), as independent clients do: so a slow or refused
 * answer never holds the next request back, as it does with hey -q and wrk, whose connections wait for their answers
 * (a server that holds a refused connection back lowers the rate offered to it), and no client's request goes out on
 * a connection another client was just answered on. One thread and epoll, a few microseconds of CPU per request, so that on a small machine the generator is not
 * what limits the rate (hey costs ~100 us per request).
 *
 * Prints one CSV row per due request, "offset,status-code,response-time" (hey -o csv's columns): the offset is when it
 * was due, the response time counts from then (so the time spent waiting for a connection is in it), the status is 0
 * for a connection closed or refused without an answer or an answer still missing TIMEOUT_S after the last request
 * was due, and -1 for a request that could not be sent because MAX_CONNS connections were all busy.
 * Only Content-Length answers are read (servekit and TorchServe answer the benchmark's requests so).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { FREE, CONNECTING, IDLE, BUSY };

typedef struct {
    int fd, state, status;
    double due;        /* when the request it carries was due, s */
    size_t sent;       /* bytes of the request written */
    char head[8192];   /* the answer's head, until its blank line */
    size_t have;       /* bytes in head */
    long body_left;    /* -1 until the head is read */
    int closes;        /* the answer says Connection: close */
    int idle_at;       /* its place in idle[], -1 when not there */
    long owner;        /* the client it was opened for */
} Conn;

typedef struct {
    float offset, latency;
    short status;
} Row;

static char *request;
static size_t request_len;
static struct sockaddr_in addr;
static Conn *conns;
static int *idle, n_idle, n_open, max_conns, epfd;
static int *own, per_client; /* each client's connections: per_client slots, -1 when empty */
static Row *rows;
static long n_rows;
static double t0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9 - t0;
}

static void record(double due, int status) {
    rows[n_rows].offset = (float)due;
    rows[n_rows].latency = status < 0 ? 0.0f : (float)(now() - due);
    rows[n_rows].status = (short)status;
    n_rows++;
}

static void push_idle(Conn *c) {
    c->state = IDLE;
    c->idle_at = n_idle;
    idle[n_idle++] = (int)(c - conns);
}

static void unidle(Conn *c) { /* out of idle[]: the last one takes its place */
    Conn *last = &conns[idle[--n_idle]];
    idle[c->idle_at] = (int)(last - conns);
    last->idle_at = c->idle_at;
    c->idle_at = -1;
}

static void drop(Conn *c) { /* closes the connection; a request it carried has no answer */
    if (c->state == BUSY || c->state == CONNECTING) record(c->due, 0);
    if (c->idle_at >= 0) unidle(c);
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = FREE;
    n_open--;
}

static void watch(Conn *c, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_rest(Conn *c) {
    while (c->sent < request_len) {
        ssize_t n = send(c->fd, request + c->sent, request_len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                watch(c, EPOLLIN | EPOLLOUT);
                return;
            }
            drop(c);
            return;
        }
        c->sent += (size_t)n;
    }
    watch(c, EPOLLIN);
}

static void start(Conn *c, double due) {
    c->due = due;
    c->sent = 0;
    c->have = 0;
    c->body_left = -1;
    c->closes = 0;
    if (c->state == IDLE) {
        c->state = BUSY;
        send_rest(c);
    }
}

static Conn *open_conn(void) {
    if (n_open >= max_conns) return NULL;
    Conn *c = NULL;
    for (int i = 0; i < max_conns; i++)
        if (conns[i].state == FREE) {
            c = &conns[i];
            break;
        }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0 || !c) {
        if (fd >= 0) close(fd);
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->state = CONNECTING;
    c->idle_at = -1;
    n_open++;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        drop(c);
        return NULL;
    }
    return c;
}

static void answered(Conn *c) {
    record(c->due, c->status);
    if (c->closes) {
        c->state = IDLE; /* nothing pending: drop() records nothing */
        drop(c);
        return;
    }
    push_idle(c);
}

static int parse_head(Conn *c) { /* 1 when the head is complete, 0 when more is needed, -1 when it is not HTTP */
    char *end = memmem(c->head, c->have, "\r\n\r\n", 4);
    if (!end) return c->have == sizeof c->head ? -1 : 0;
    *end = 0;
    if (strncmp(c->head, "HTTP/1.", 7) != 0) return -1;
    c->status = atoi(c->head + 9);
    long length = 0;
    for (char *line = strstr(c->head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
        if (!strncasecmp(line + 2, "content-length:", 15)) length = atol(line + 17);
        if (!strncasecmp(line + 2, "connection:", 11) && strcasestr(line + 13, "close") == line + 13 + strspn(line + 13, " "))
            c->closes = 1;
    }
    size_t head_len = (size_t)(end - c->head) + 4;
    c->body_left = length - (long)(c->have - head_len);
    return 1;
}

static void readable(Conn *c) {
    for (;;) {
        char scratch[65536];
        int in_head = c->body_left < 0;
        char *into = in_head ? c->head + c->have : scratch;
        size_t room = in_head ? sizeof c->head - c->have : sizeof scratch;
        ssize_t n = read(c->fd, into, room);
        if (n == 0 || (n < 0 && errno != EAGAIN)) {
            drop(c);
            return;
        }
        if (n < 0) return;
        if (c->state != BUSY) { /* an answer nobody asked for */
            drop(c);
            return;
        }
        if (in_head) {
            c->have += (size_t)n;
            int parsed = parse_head(c);
            if (parsed < 0) {
                drop(c);
                return;
            }
            if (parsed == 0) continue;
        } else {
            c->body_left -= n;
        }
        if (c->body_left <= 0) {
            answered(c);
            return;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: openloop HOST PORT PATH BODY_FILE RATE SECONDS CLIENTS MAX_CONNS TIMEOUT_S\n");
        return 2;
    }
    double rate = atof(argv[5]), seconds = atof(argv[6]), timeout = atof(argv[9]);
    int clients = atoi(argv[7]);
    max_conns = atoi(argv[8]);
    FILE *f = fopen(argv[4], "rb");
    if (!f) {
        perror(argv[4]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    long body_len = ftell(f);
    rewind(f);
    char *body = malloc((size_t)body_len + 1);
    if (fread(body, 1, (size_t)body_len, f) != (size_t)body_len) return 2;
    fclose(f);
    request = malloc((size_t)body_len + 1024);
    int head = snprintf(request, 1024,
                        "POST %s HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                        "Content-Length: %ld\r\n\r\n",
                        argv[3], argv[1], argv[2], body_len);
    memcpy(request + head, body, (size_t)body_len);
    request_len = (size_t)head + (size_t)body_len;
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    inet_pton(AF_INET, argv[1], &addr.sin_addr);

    long total = (long)(rate * seconds);
    rows = calloc((size_t)total + 1, sizeof *rows);
    conns = calloc((size_t)max_conns, sizeof *conns);
    idle = calloc((size_t)max_conns, sizeof *idle);
    per_client = max_conns / clients > 0 ? max_conns / clients : 1;
    own = malloc((size_t)(clients * per_client) * sizeof *own);
    for (int i = 0; i < clients * per_client; i++) own[i] = -1;
    epfd = epoll_create1(0);
    struct epoll_event events[1024];
    t0 = 0;
    t0 = now();
    long next = 0;
    for (;;) {
        double t = now();
        for (; next < total && next / rate <= t; next++) {
            double due = next / rate;
            long client = next % clients;
            int *mine = &own[client * per_client], *slot = NULL;
            Conn *c = NULL;
            for (int j = 0; j < per_client && !c; j++) {
                Conn *o = mine[j] >= 0 ? &conns[mine[j]] : NULL;
                if (o && o->owner == client && o->state == IDLE) {
                    c = o;
                    unidle(c);
                } else if (!o || o->owner != client || o->state == FREE) {
                    slot = &mine[j];
                }
            }
            if (!c && slot && (c = open_conn())) {
                *slot = (int)(c - conns);
                c->owner = client;
            }
            if (c)
                start(c, due);
            else
                record(due, -1);
        }
        if (next >= total && (n_open == n_idle || t > seconds + timeout)) break;
        double wait_s = next < total ? next / rate - now() : 0.01; /* until the next request is due, to the us */
        if (wait_s < 0) wait_s = 0;
        struct timespec wait = {.tv_sec = (time_t)wait_s, .tv_nsec = (long)((wait_s - (time_t)wait_s) * 1e9)};
        int n = epoll_pwait2(epfd, events, 1024, &wait, NULL);
        for (int i = 0; i < n; i++) {
            Conn *c = events[i].data.ptr;
            if (c->state == FREE) continue;
            if (c->state == CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    drop(c);
                    continue;
                }
                c->state = BUSY;
                send_rest(c);
                continue;
            }
            if (events[i].events & EPOLLOUT && c->state == BUSY && c->sent < request_len) send_rest(c);
            if (c->state != FREE && events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c);
        }
    }
    for (int i = 0; i < max_conns; i++)
        if (conns[i].state != FREE) drop(&conns[i]);
    printf("offset,status-code,response-time\n");
    for (long i = 0; i < n_rows; i++) printf("%.6f,%d,%.6f\n", rows[i].offset, rows[i].status, rows[i].latency);
    return 0;
}
