/* The C side of the uffd benchmarks, driven over stdin/stdout by
 * benches/uffd.rs so criterion times both sides in one run.
 *
 *   harness ucx N     UCX ucs_rcache with N one-page regions; then for each
 *                     line "ITERS" on stdin, ITERS ucs_rcache_get + put hits
 *                     on pseudo-random regions, answering the elapsed ns.
 *   harness monitor   a minimal userfaultfd monitor thread (blocking read,
 *                     nothing else); for each "ITERS", ITERS times: map a
 *                     page, register it, touch it, time its munmap.
 *
 * Built without UCX (-DNO_UCX) when libucx-dev is missing. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#ifndef NO_UCX
#include <ucm/api/ucm.h>
#include <ucs/memory/rcache.h>
#endif

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

/* The same index sequence as benches/uffd.rs. */
static uint64_t next_index(uint64_t *x, uint64_t n) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    /* Multiply-shift range reduction, not `%`: a 64-bit division would
     * cost as much as the lookups being measured, on both sides. */
    return (uint64_t)(((unsigned __int128)*x * n) >> 64);
}

#ifndef NO_UCX
static ucs_status_t mem_reg(void *c, ucs_rcache_t *r, void *a, ucs_rcache_region_t *g, uint16_t f) {
    return UCS_OK;
}
static void mem_dereg(void *c, ucs_rcache_t *r, ucs_rcache_region_t *g) {}
static void dump(void *c, ucs_rcache_t *r, ucs_rcache_region_t *g, char *b, size_t m) {
    if (m) b[0] = 0;
}

static int run_ucx(uint64_t n) {
    static ucs_rcache_ops_t ops = {mem_reg, mem_dereg, dump};
    ucs_rcache_params_t p;
    memset(&p, 0, sizeof p);
    p.region_struct_size = sizeof(ucs_rcache_region_t);
    p.alignment = 4096;
    p.max_alignment = 4096;
    p.ucm_events = UCM_EVENT_VM_UNMAPPED;
    p.ucm_event_priority = 1000;
    p.ops = &ops;
    p.flags = UCS_RCACHE_FLAG_NO_PFN_CHECK;
    p.max_regions = (unsigned long)-1;
    p.max_size = (size_t)-1;
    p.max_unreleased = (size_t)-1;
    ucs_rcache_t *rc;
    if (ucs_rcache_create(&p, "bench", NULL, &rc) != UCS_OK) {
        fprintf(stderr, "ucs_rcache_create failed\n");
        return 1;
    }
    char *base = mmap(NULL, n * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (uint64_t i = 0; i < n; i++) {
        ucs_rcache_region_t *r;
        if (ucs_rcache_get(rc, base + i * 4096, 4096, PROT_READ | PROT_WRITE, NULL, &r) != UCS_OK) {
            fprintf(stderr, "ucs_rcache_get failed\n");
            return 1;
        }
        ucs_rcache_region_put(rc, r);
    }
    printf("ready\n");
    fflush(stdout);
    uint64_t iters, x = 0x9E3779B97F4A7C15ull;
    while (scanf("%lu", &iters) == 1) {
        uint64_t t0 = now_ns();
        for (uint64_t i = 0; i < iters; i++) {
            ucs_rcache_region_t *r;
            char *a = base + next_index(&x, n) * 4096;
            if (ucs_rcache_get(rc, a, 4096, PROT_READ | PROT_WRITE, NULL, &r) != UCS_OK) abort();
            ucs_rcache_region_put(rc, r);
        }
        printf("%lu\n", now_ns() - t0);
        fflush(stdout);
    }
    return 0;
}
#endif

static int uffd;

static void *monitor(void *arg) {
    struct uffd_msg m[64];
    for (;;)
        if (read(uffd, m, sizeof m) < 0) return NULL;
}

static int run_monitor(void) {
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    struct uffdio_api api = {.api = UFFD_API,
                             .features = UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMOVE |
                                         UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_PAGEFAULT_FLAG_WP};
    if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api)) {
        perror("userfaultfd");
        return 1;
    }
    pthread_t t;
    pthread_create(&t, NULL, monitor, NULL);
    printf("ready\n");
    fflush(stdout);
    uint64_t iters;
    while (scanf("%lu", &iters) == 1) {
        uint64_t total = 0;
        for (uint64_t i = 0; i < iters; i++) {
            char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            struct uffdio_register r = {.range = {(unsigned long)p, 4096},
                                        .mode = UFFDIO_REGISTER_MODE_WP};
            if (ioctl(uffd, UFFDIO_REGISTER, &r)) abort();
            p[0] = 1;
            uint64_t t0 = now_ns();
            munmap(p, 4096);
            total += now_ns() - t0;
        }
        printf("%lu\n", total);
        fflush(stdout);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "monitor")) return run_monitor();
#ifndef NO_UCX
    if (argc >= 3 && !strcmp(argv[1], "ucx")) return run_ucx(strtoull(argv[2], NULL, 10));
#endif
    fprintf(stderr, "usage: harness monitor | harness ucx N\n");
    return 2;
}
