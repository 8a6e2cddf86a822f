/* streamclient: the closed-loop streaming client of benchmarks/continuous.py (issue 17), in C.
 *
 *   streamclient HOST PORT MODEL BODIES_FILE STREAMS WARMUP_S SECONDS THINK_MS SEED [DRAIN_S] > result.json
 *
 * Does what continuous.py's Python client (``stream`` and ``load``) does, without its event loop's latency, which
 * added 0.5 ms or so (0.1-0.2 of an iteration on two cores; more when the machine is busy) to every time to first
 * token it measured, and at a third of its CPU (~0.1 core at 20k tokens/s: a read per chunk). Each of STREAMS streams
 * keeps one POST /predictions/MODEL in flight on its own keep-alive connection, with the bodies of BODIES_FILE (one
 * JSON body a line) that are its own, stream i taking lines i, i + STREAMS, i + 2 x STREAMS... (the Python client's
 * bodies[i::STREAMS]); it reads the chunked answer chunk by chunk (each token is a chunk ending in "\n"), then sends its
 * next request at once, or with THINK_MS > 0 after an exponential pause of that mean (drawn from SEED and the stream's
 * number; the Python client draws the same distribution from another generator). A stream stops when its next request
 * would go out at or after the end of the window, or when its bodies run out. The window is [WARMUP_S, WARMUP_S +
 * SECONDS) after the start, on CLOCK_MONOTONIC:
 *
 *   tokens     the tokens received in the window (newlines in the chunks' data)
 *   requests   the answers 200, fully read, of the requests sent in the window
 *   ttft       seconds from sending a request to its first chunk, for the requests sent in the window (once a
 *              request; the Python client records each chunk until one carries a token: the same with servekit,
 *              whose chunks all carry one)
 *   gaps       seconds between two chunks with a token of one answer, the later one received in the window (their
 *              median is one iteration of the worker)
 *   errors     answers other than 200, answers not chunked (a one-token answer, or an error: the Python client raised
 *              RuntimeError on them), connections closed or reset while a request was in flight, connections refused,
 *              and answers still missing DRAIN_S (default 30) after the end of the window, in the window or not
 *              (as the Python client's); errors_by_kind has each
 *   cpu_s      this process's CPU seconds (getrusage), all told; cpu_window_s those of the window
 *
 * printed as one JSON object on stdout at the end (ttft and gaps as lists: a few MB at most; continuous.py reads them
 * into the same Stats as its Python client's). What a stream does on an error: an answer not 200 is read to its end
 * and the connection kept; an answer not chunked is skipped by its Content-Length on a connection that stays open,
 * and its connection closed when it has none (or says Connection: close); a connection closed, reset or speaking
 * something else than HTTP/1.1 is closed and the stream goes on with its next request on a new connection; a refused
 * connection ends the stream (nothing listens: a server that died). So the run always ends: when every stream has
 * stopped, or DRAIN_S after the window at the latest, whatever the server does.
 *
 * One thread and epoll, no dependency beyond the C library (math: cc ... -lm).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { WAITING, BUSY, DONE };                                                 /* a stream: before, in, after */
enum { STATUS, HEADERS, CHUNK_SIZE, CHUNK_DATA, CHUNK_END, TRAILERS, BODY }; /* where its answer's parser is */
enum { MORE, COMPLETE, COMPLETE_CLOSE, BAD };                                /* what the parser says of it so far */

typedef struct {
    int fd, connected, state, index;
    long next;          /* its next body: line index + next x STREAMS */
    double wake;        /* its next request not before then (its pause) */
    double sent, last;  /* when its request went out; its answer's last chunk with a token (< 0: none yet) */
    int first;          /* its answer's first chunk came */
    char *request;
    size_t request_len, request_sent;
    int phase, status, chunked, closes, bad;
    long content_length, left, newlines; /* left: bytes still to come of the chunk (or the body not chunked) */
    char line[8192];
    size_t line_len;
    uint64_t rng;
} Stream;

typedef struct {
    double *v;
    size_t n, cap;
} Array;

static Stream *streams;
static int n_streams, n_done, n_waiting, epfd;
static char **bodies;
static size_t *body_lens, n_bodies, max_body;
static const char *host, *model;
static struct sockaddr_in addr;
static double t0, start, end, think_s;
static long tokens, requests, failed, refused, not_chunked, not_200, unanswered;
static Array ttft, gaps;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9 - t0;
}

static double cpu_seconds(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_stime.tv_sec + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e-6;
}

static void push(Array *a, double x) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 4096;
        a->v = realloc(a->v, a->cap * sizeof *a->v);
        if (!a->v) {
            perror("realloc");
            exit(1);
        }
    }
    a->v[a->n++] = x;
}

static double pause_s(Stream *s) { /* exponential of mean think_s, from splitmix64 */
    uint64_t z = (s->rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    double u = ((z >> 11) + 1) * 0x1.0p-53; /* (0, 1] */
    return -log(u) * think_s;
}

static void set_state(Stream *s, int state) {
    n_waiting += (state == WAITING) - (s->state == WAITING);
    n_done += (state == DONE) - (s->state == DONE);
    s->state = state;
}

static void watch(Stream *s, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
}

static void disconnect(Stream *s) {
    if (s->fd < 0) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    s->fd = -1;
    s->connected = 0;
}

static void stop(Stream *s) {
    disconnect(s);
    set_state(s, DONE);
}

static void connect_stream(Stream *s) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("socket");
        refused++;
        stop(s);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->fd = fd;
    s->connected = 0;
    struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev); /* connected (even at once) when epoll says it is writable */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        refused++;
        stop(s);
    }
}

static void send_rest(Stream *s);

static void try_send(Stream *s) { /* its next request, if its pause is over and its connection up */
    if (s->state != WAITING || !s->connected) return;
    double t = now();
    if (t < s->wake) return;
    if (t >= end) { /* as the Python client: no request sent at or after the end of the window */
        stop(s);
        return;
    }
    size_t k = (size_t)s->index + (size_t)s->next * (size_t)n_streams;
    s->next++;
    int head = snprintf(s->request, 1024,
                        "POST /predictions/%s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                        "content-length: %zu\r\n\r\n",
                        model, host, body_lens[k]);
    memcpy(s->request + head, bodies[k], body_lens[k]);
    s->request_len = (size_t)head + body_lens[k];
    s->request_sent = 0;
    s->phase = STATUS;
    s->line_len = 0;
    s->first = 0;
    s->last = -1;
    s->bad = 0;
    set_state(s, BUSY);
    s->sent = now();
    send_rest(s);
}

static void schedule(Stream *s) { /* after an answer (or at the start): the stream's next request, or its stop */
    if ((size_t)s->index + (size_t)s->next * (size_t)n_streams >= n_bodies) {
        stop(s);
        return;
    }
    set_state(s, WAITING);
    s->wake = think_s > 0 ? now() + pause_s(s) : 0;
    if (s->fd < 0) connect_stream(s);
    try_send(s);
}

static void broken(Stream *s) { /* its connection closed, reset or not HTTP: a request in flight is an error */
    disconnect(s);
    if (s->state == BUSY) {
        failed++;
        schedule(s);
    } else if (s->state == WAITING) { /* idle: the server closed it (keep-alive timeout), open another */
        connect_stream(s);
    }
}

static void send_rest(Stream *s) {
    while (s->request_sent < s->request_len) {
        ssize_t n = send(s->fd, s->request + s->request_sent, s->request_len - s->request_sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) {
                if (errno == EAGAIN) {
                    watch(s, EPOLLIN | EPOLLOUT);
                    return;
                }
                continue;
            }
            broken(s);
            return;
        }
        s->request_sent += (size_t)n;
    }
    watch(s, EPOLLIN);
}

static void chunk(Stream *s, double t) { /* a chunk fully read at t: what the Python client records */
    long count = s->newlines;
    if (t >= start && t < end) {
        tokens += count;
        if (count && s->last >= 0) push(&gaps, t - s->last);
    }
    if (!s->first) {
        s->first = 1;
        if (s->sent >= start && s->sent < end) push(&ttft, t - s->sent);
    }
    if (count) s->last = t;
}

static int header_line(Stream *s, char *line, size_t len) { /* MORE, or the end of the head */
    if (len > 0) {
        char *colon = memchr(line, ':', len);
        if (!colon) return BAD;
        char *value = colon + 1 + strspn(colon + 1, " \t");
        size_t name = (size_t)(colon - line);
        if (name == 17 && !strncasecmp(line, "transfer-encoding", name) && strcasestr(value, "chunked")) s->chunked = 1;
        if (name == 14 && !strncasecmp(line, "content-length", name)) s->content_length = atol(value);
        if (name == 10 && !strncasecmp(line, "connection", name) && strcasestr(value, "close")) s->closes = 1;
        return MORE;
    }
    if (s->chunked) {
        s->phase = CHUNK_SIZE;
        return MORE;
    }
    not_chunked++; /* an error, as the Python client's RuntimeError: skipped, the stream goes on */
    s->bad = 1;
    if (s->content_length < 0 || s->closes) return COMPLETE_CLOSE; /* delimited by its close, or closing anyway */
    s->left = s->content_length;
    s->phase = BODY;
    return s->left ? MORE : COMPLETE;
}

/* Parses n bytes of the answer, received at t. Sets *used to the bytes taken when it says COMPLETE(_CLOSE). */
static int feed(Stream *s, const char *p, size_t n, double t, size_t *used) {
    size_t i = 0;
    while (i < n) {
        if (s->phase == CHUNK_DATA || s->phase == BODY) {
            size_t take = (size_t)s->left < n - i ? (size_t)s->left : n - i;
            if (s->phase == CHUNK_DATA)
                for (const char *q = p + i, *stop_at = p + i + take; (q = memchr(q, '\n', (size_t)(stop_at - q)));
                     q++)
                    s->newlines++;
            i += take;
            s->left -= (long)take;
            if (s->left) continue;
            if (s->phase == BODY) {
                *used = i;
                return s->closes ? COMPLETE_CLOSE : COMPLETE;
            }
            chunk(s, t);
            s->phase = CHUNK_END;
            continue;
        }
        const char *nl = memchr(p + i, '\n', n - i);
        size_t take = nl ? (size_t)(nl - (p + i)) + 1 : n - i;
        if (s->line_len + take >= sizeof s->line) return BAD;
        memcpy(s->line + s->line_len, p + i, take);
        s->line_len += take;
        i += take;
        if (!nl) continue;
        size_t len = s->line_len - 1; /* without its \n, and its \r */
        if (len && s->line[len - 1] == '\r') len--;
        s->line[len] = 0;
        s->line_len = 0;
        char *line = s->line, *after;
        int said = MORE;
        switch (s->phase) {
        case STATUS:
            if (strncmp(line, "HTTP/1.", 7) || len < 12) return BAD;
            s->status = atoi(line + 9);
            s->chunked = s->closes = 0;
            s->content_length = -1;
            s->phase = HEADERS;
            break;
        case HEADERS:
            said = header_line(s, line, len);
            break;
        case CHUNK_SIZE:
            s->left = strtol(line, &after, 16); /* a chunk extension (";...") is ignored */
            if (after == line || s->left < 0) return BAD;
            s->newlines = 0;
            s->phase = s->left ? CHUNK_DATA : TRAILERS;
            break;
        case CHUNK_END:
            if (len) return BAD;
            s->phase = CHUNK_SIZE;
            break;
        case TRAILERS:
            if (!len) said = s->closes ? COMPLETE_CLOSE : COMPLETE;
            break;
        }
        if (said != MORE) {
            *used = i;
            return said;
        }
    }
    return MORE;
}

static void readable(Stream *s) {
    static char buf[65536];
    ssize_t n = read(s->fd, buf, sizeof buf);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0 || s->state != BUSY) { /* closed, reset, or bytes nobody asked for */
        broken(s);
        return;
    }
    double t = now();
    size_t used = 0;
    int said = feed(s, buf, (size_t)n, t, &used);
    if (said == MORE) return;
    if (said == BAD) {
        broken(s);
        return;
    }
    if (!s->bad) {
        if (s->status != 200)
            not_200++;
        else if (s->sent >= start && s->sent < end)
            requests++;
    }
    if (said == COMPLETE_CLOSE || used < (size_t)n) disconnect(s); /* bytes after the answer: not HTTP/1.1 as sent */
    schedule(s);
}

static void print_array(const char *name, const Array *a) {
    printf(", \"%s\": [", name);
    for (size_t i = 0; i < a->n; i++) printf(i ? ", %.7g" : "%.7g", a->v[i]);
    printf("]");
}

int main(int argc, char **argv) {
    if (argc != 10 && argc != 11) {
        fprintf(stderr, "usage: streamclient HOST PORT MODEL BODIES_FILE STREAMS WARMUP_S SECONDS THINK_MS SEED "
                        "[DRAIN_S]\n");
        return 2;
    }
    host = argv[1];
    model = argv[3];
    n_streams = atoi(argv[5]);
    double warmup = atof(argv[6]), seconds = atof(argv[7]), drain = argc == 11 ? atof(argv[10]) : 30.0;
    think_s = atof(argv[8]) / 1000;
    uint64_t seed = strtoull(argv[9], NULL, 10);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[2]));
    if (n_streams < 1 || inet_pton(AF_INET, host, &addr.sin_addr) != 1 || strlen(host) + strlen(model) > 512) {
        fprintf(stderr, "streamclient: STREAMS must be 1 or more, HOST an IPv4 address, MODEL a name\n");
        return 2;
    }

    FILE *f = fopen(argv[4], "rb");
    if (!f) {
        perror(argv[4]);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    char *text = malloc((size_t)size + 1);
    if (!text || fread(text, 1, (size_t)size, f) != (size_t)size) {
        perror(argv[4]);
        return 2;
    }
    fclose(f);
    text[size] = 0;
    for (long i = 0; i < size; i++) n_bodies += text[i] == '\n';
    bodies = calloc(n_bodies + 1, sizeof *bodies);
    body_lens = calloc(n_bodies + 1, sizeof *body_lens);
    n_bodies = 0;
    for (char *p = text, *stop_at; p < text + size; p = stop_at + 1) { /* one body a line; empty lines skipped */
        stop_at = memchr(p, '\n', (size_t)(text + size - p));
        if (!stop_at) stop_at = text + size;
        size_t len = (size_t)(stop_at - p);
        if (len && p[len - 1] == '\r') len--;
        if (len) {
            bodies[n_bodies] = p;
            body_lens[n_bodies++] = len;
            max_body = len > max_body ? len : max_body;
        }
    }

    streams = calloc((size_t)n_streams, sizeof *streams);
    epfd = epoll_create1(0);
    t0 = 0;
    t0 = now();
    start = warmup;
    end = warmup + seconds;
    double deadline = end + drain, cpu_start = -1, cpu_end = -1;
    for (int i = 0; i < n_streams; i++) {
        Stream *s = &streams[i];
        s->fd = -1;
        s->index = i;
        s->rng = seed * 0x100000001b3ULL + (uint64_t)i;
        s->request = malloc(1024 + max_body);
        n_waiting++; /* calloc: WAITING */
        schedule(s);
    }
    struct epoll_event events[1024];
    for (;;) {
        double t = now();
        if (cpu_start < 0 && t >= start) cpu_start = cpu_seconds();
        if (cpu_end < 0 && t >= end) cpu_end = cpu_seconds();
        if (n_done == n_streams || t >= deadline) break;
        double next = deadline;
        if (cpu_start < 0) next = start;
        else if (cpu_end < 0) next = end;
        if (n_waiting)
            for (int i = 0; i < n_streams; i++) {
                Stream *s = &streams[i];
                if (s->state != WAITING || !s->connected) continue;
                if (s->wake <= t)
                    try_send(s);
                else if (s->wake < next)
                    next = s->wake;
            }
        double wait_s = next - now();
        if (wait_s < 0) wait_s = 0;
        struct timespec wait = {.tv_sec = (time_t)wait_s, .tv_nsec = (long)((wait_s - (time_t)wait_s) * 1e9)};
        int n = epoll_pwait2(epfd, events, 1024, &wait, NULL);
        if (n < 0 && errno != EINTR) {
            perror("epoll_pwait2");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            Stream *s = events[i].data.ptr;
            if (s->fd < 0) continue; /* closed by an earlier event of this round */
            if (!s->connected) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    refused++;
                    stop(s);
                    continue;
                }
                s->connected = 1;
                watch(s, EPOLLIN);
                try_send(s);
                continue;
            }
            if (events[i].events & EPOLLOUT && s->state == BUSY && s->request_sent < s->request_len) send_rest(s);
            if (s->fd >= 0 && events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(s);
        }
    }
    double t = now();
    if (cpu_start < 0) cpu_start = cpu_seconds();
    if (cpu_end < 0) cpu_end = cpu_seconds();
    for (int i = 0; i < n_streams; i++) {
        if (streams[i].state == BUSY) unanswered++; /* still in flight at the deadline */
        disconnect(&streams[i]);
    }
    long errors = failed + refused + not_chunked + not_200 + unanswered;
    printf("{\"tokens\": %ld, \"requests\": %ld, \"errors\": %ld, \"errors_by_kind\": {\"failed\": %ld, \"refused\": %ld, "
           "\"not_chunked\": %ld, \"not_200\": %ld, \"unanswered\": %ld}, \"cpu_s\": %.6f, \"cpu_window_s\": %.6f, "
           "\"elapsed_s\": %.6f",
           tokens, requests, errors, failed, refused, not_chunked, not_200, unanswered, cpu_seconds(),
           cpu_end - cpu_start, t);
    print_array("ttft", &ttft);
    print_array("gaps", &gaps);
    printf("}\n");
    return 0;
}
