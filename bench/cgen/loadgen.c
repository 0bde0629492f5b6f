/*
 * The C load generator of the two-host view (bench/twohost.py).
 *
 *   loadgen --port P --mode conn|keep [--conns 8] [--warmup 0.5] [--duration 2]
 *           [--cert PEM --key PEM --ca PEM] [--resume] [--max-requests N]
 *
 * N blocking worker threads send "GET /" over HTTP/1.1 to 127.0.0.1:P and read each
 * 200 response to its Content-Length. conn: a new TCP connection (and, with --cert,
 * a new TLS handshake presenting that leaf and verifying the server's chain against
 * --ca) per request, closed after the response; keep: one connection per worker,
 * requests back to back. --resume offers each worker's newest TLS session.
 *
 * Prints "start" when the warm-up ends, then one JSON line with the keys of
 * bench/scenarios/loadgen.py: requests, failures, errors, rps, p50/p90/p99/max ms,
 * client_cpu_s, ... Every socket has a 10 s timeout; every worker stops at the
 * deadline or after --max-requests requests in all.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (4u << 20)
#define N_ERRORS 6
static const char *ERROR_NAMES[N_ERRORS] = {"connect", "handshake", "write", "read",
                                            "status", "closed"};

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: api\r\nUser-Agent: bench\r\n\r\n";

static int g_port, g_keep, g_resume;
static double g_start_at, g_end_at;
static long g_max_requests = 1000000000L;
static atomic_long g_total;
static SSL_CTX *g_ctx;

struct worker {
    pthread_t thread;
    float *lat_ms; /* latencies of successful requests inside the window */
    unsigned n;
    long errors[N_ERRORS];
    long resumed, handshakes;
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct conn {
    int fd;
    SSL *ssl;
};

static void conn_close(struct conn *c) {
    if (c->ssl) {
        SSL_shutdown(c->ssl); /* send close_notify; do not wait for the peer's */
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

/* 0 on success, else 1 + index into ERROR_NAMES. */
static int conn_open(struct conn *c, SSL_SESSION **session, struct worker *w) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port)};
    struct timeval tv = {.tv_sec = 10};
    int one = 1;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->ssl = NULL;
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0)
        return 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        return 1;
    if (!g_ctx)
        return 0;
    c->ssl = SSL_new(g_ctx);
    if (!c->ssl)
        return 2;
    SSL_set_fd(c->ssl, c->fd);
    if (g_resume && *session)
        SSL_set_session(c->ssl, *session);
    if (SSL_connect(c->ssl) != 1 || SSL_get_verify_result(c->ssl) != X509_V_OK) {
        ERR_clear_error();
        return 2;
    }
    w->handshakes++;
    if (SSL_session_reused(c->ssl))
        w->resumed++;
    return 0;
}

static int io_write(struct conn *c, const char *buf, int len) {
    if (c->ssl)
        return SSL_write(c->ssl, buf, len);
    return (int)send(c->fd, buf, (size_t)len, MSG_NOSIGNAL);
}

static int io_read(struct conn *c, char *buf, int len) {
    if (c->ssl) {
        int n = SSL_read(c->ssl, buf, len);
        if (n <= 0)
            ERR_clear_error();
        return n;
    }
    return (int)recv(c->fd, buf, (size_t)len, 0);
}

/* One request and its response on an open connection: 0 or 1 + error index. */
static int exchange(struct conn *c) {
    char buf[4096];
    int have = 0, n;
    char *end = NULL;
    long length = 0;
    if (io_write(c, REQUEST, (int)sizeof REQUEST - 1) != (int)sizeof REQUEST - 1)
        return 3;
    while (!end) {
        if (have >= (int)sizeof buf - 1)
            return 5;
        n = io_read(c, buf + have, (int)sizeof buf - 1 - have);
        if (n <= 0)
            return have ? 4 : 6;
        have += n;
        buf[have] = 0;
        end = strstr(buf, "\r\n\r\n");
    }
    if (strncmp(buf, "HTTP/1.1 200", 12) != 0)
        return 5;
    for (char *line = strstr(buf, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n"))
        if (strncasecmp(line + 2, "content-length:", 15) == 0)
            length = strtol(line + 17, NULL, 10);
    long body = have - (long)(end + 4 - buf);
    while (body < length) {
        n = io_read(c, buf, (int)sizeof buf);
        if (n <= 0)
            return 4;
        body += n;
    }
    return 0;
}

static void record(struct worker *w, double began, double ended, int err) {
    if (began < g_start_at || ended > g_end_at)
        return;
    if (err) {
        w->errors[err - 1]++;
        return;
    }
    if (w->n < MAX_SAMPLES / 8)
        w->lat_ms[w->n++] = (float)((ended - began) * 1000.0);
}

static void *work(void *arg) {
    struct worker *w = arg;
    struct conn c = {.fd = -1, .ssl = NULL};
    SSL_SESSION *session = NULL;
    while (now_s() < g_end_at && atomic_fetch_add(&g_total, 1) < g_max_requests) {
        double began = now_s();
        int err = 0;
        if (c.fd < 0)
            err = conn_open(&c, &session, w);
        if (!err)
            err = exchange(&c);
        if (!err && g_resume && c.ssl && (!session || !SSL_session_reused(c.ssl))) {
            /* TLS 1.3 tickets arrive after the handshake: read after the response. */
            SSL_SESSION *got = SSL_get1_session(c.ssl);
            if (got && SSL_SESSION_is_resumable(got)) {
                if (session)
                    SSL_SESSION_free(session);
                session = got;
            } else if (got) {
                SSL_SESSION_free(got);
            }
        }
        double ended = now_s();
        if (err || !g_keep)
            conn_close(&c);
        record(w, began, ended, err);
    }
    conn_close(&c);
    if (session)
        SSL_SESSION_free(session);
    return NULL;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static double pct(const float *v, unsigned n, double q) {
    if (!n)
        return 0.0 / 0.0;
    unsigned i = (unsigned)(q * (n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

/* A latency for the JSON line: NaN (as Python's json writes it) when there is none. */
static const char *ms(char *buf, double v) {
    if (v != v)
        return "NaN";
    snprintf(buf, 32, "%.4f", v);
    return buf;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s\n", what);
    ERR_print_errors_fp(stderr);
    exit(2);
}

int main(int argc, char **argv) {
    int conns = 8;
    signal(SIGPIPE, SIG_IGN); /* a peer that closed first is an error, not a kill */
    double warmup = 0.5, duration = 2.0;
    const char *cert = NULL, *key = NULL, *ca = NULL, *mode = "conn";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--resume")) {
            g_resume = 1;
            continue;
        }
        if (!v)
            die("missing value");
        if (!strcmp(a, "--port")) g_port = atoi(v);
        else if (!strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "--conns")) conns = atoi(v);
        else if (!strcmp(a, "--warmup")) warmup = atof(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--cert")) cert = v;
        else if (!strcmp(a, "--key")) key = v;
        else if (!strcmp(a, "--ca")) ca = v;
        else if (!strcmp(a, "--max-requests")) g_max_requests = atol(v);
        else die("unknown option");
        i++;
    }
    if (g_port <= 0 || conns <= 0 || conns > 256 || duration <= 0)
        die("bad --port, --conns or --duration");
    g_keep = !strcmp(mode, "keep");
    if (!g_keep && strcmp(mode, "conn"))
        die("--mode is conn or keep");
    if (cert) {
        g_ctx = SSL_CTX_new(TLS_client_method());
        if (!g_ctx || !key || !ca)
            die("--cert needs --key and --ca");
        SSL_CTX_set_min_proto_version(g_ctx, TLS1_2_VERSION);
        if (SSL_CTX_use_certificate_chain_file(g_ctx, cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(g_ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_load_verify_locations(g_ctx, ca, NULL) != 1)
            die("cannot load the leaf, key or roots");
        /* Chain verification only: Connect leaves name no DNS host. */
        SSL_CTX_set_verify(g_ctx, SSL_VERIFY_PEER, NULL);
        SSL_CTX_set_session_cache_mode(g_ctx, SSL_SESS_CACHE_OFF);
    }
    struct worker *ws = calloc((size_t)conns, sizeof *ws);
    if (!ws)
        die("out of memory");
    double t0 = now_s();
    g_start_at = t0 + warmup;
    g_end_at = g_start_at + duration;
    for (int i = 0; i < conns; i++) {
        ws[i].lat_ms = malloc(sizeof(float) * (MAX_SAMPLES / 8));
        if (!ws[i].lat_ms || pthread_create(&ws[i].thread, NULL, work, &ws[i]))
            die("cannot start a worker");
    }
    struct timespec until = {.tv_sec = (time_t)warmup,
                             .tv_nsec = (long)((warmup - (double)(time_t)warmup) * 1e9)};
    nanosleep(&until, NULL);
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    printf("start\n");
    fflush(stdout);
    for (int i = 0; i < conns; i++)
        pthread_join(ws[i].thread, NULL);
    getrusage(RUSAGE_SELF, &r1);
    double window = (now_s() < g_end_at ? now_s() : g_end_at) - g_start_at;
    unsigned total = 0;
    long errors[N_ERRORS] = {0}, failures = 0, resumed = 0, handshakes = 0;
    for (int i = 0; i < conns; i++) {
        total += ws[i].n;
        resumed += ws[i].resumed;
        handshakes += ws[i].handshakes;
        for (int e = 0; e < N_ERRORS; e++)
            errors[e] += ws[i].errors[e];
    }
    float *all = malloc(sizeof(float) * (total ? total : 1));
    if (!all)
        die("out of memory");
    for (int i = 0, at = 0; i < conns; i++) {
        memcpy(all + at, ws[i].lat_ms, sizeof(float) * ws[i].n);
        at += (int)ws[i].n;
    }
    qsort(all, total, sizeof(float), cmp_float);
    double cpu = (double)(r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) +
                 (double)(r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) / 1e6 +
                 (double)(r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) +
                 (double)(r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) / 1e6;
    for (int e = 0; e < N_ERRORS; e++)
        failures += errors[e];
    printf("{\"requests\": %u, \"failures\": %ld, \"errors\": {", total, failures);
    for (int e = 0, first = 1; e < N_ERRORS; e++) {
        if (!errors[e])
            continue;
        printf("%s\"%s\": %ld", first ? "" : ", ", ERROR_NAMES[e], errors[e]);
        first = 0;
    }
    char b50[32], b90[32], b99[32], bmax[32];
    printf("}, \"window_s\": %.6f, \"rps\": %.3f, \"p50_ms\": %s, "
           "\"p90_ms\": %s, \"p99_ms\": %s, \"max_ms\": %s, \"client_cpu_s\": %.6f, "
           "\"client_rss_kib\": %ld, \"unfinished_workers\": 0, \"sessions_offered\": null, "
           "\"handshakes\": %ld, \"resumed\": %ld, \"error_samples\": {}}\n",
           window, window > 0 ? total / window : 0.0, ms(b50, pct(all, total, 0.50)),
           ms(b90, pct(all, total, 0.90)), ms(b99, pct(all, total, 0.99)),
           ms(bmax, total ? all[total - 1] : 0.0 / 0.0), cpu,
           r1.ru_maxrss, handshakes, resumed);
    fflush(stdout);
    return 0;
}
