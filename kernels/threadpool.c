/*
 * A small fork-join thread pool for the kernels.
 *
 * Decode issues a few hundred short kernel calls per token, so dispatch latency matters more than
 * anything else: the caller publishes a job by bumping a generation counter, workers that are
 * spinning see it within ~100 ns, tasks are handed out with an atomic counter (so a worker that the
 * OS delays just takes fewer tasks), and the caller runs tasks too. Idle workers spin for a while
 * (ONDEVICE_SPIN_US, default 1000 us: longer than the gap between kernel calls of a decode step)
 * and then block on a futex (condition variable off Linux) so an idle process costs no CPU. When
 * the cores are oversubscribed the pool temporarily runs jobs on the caller alone (see
 * note_job).
 *
 * Joining is tracked in one 64-bit word: generation in the high 32 bits, a "closed" flag and the
 * number of workers inside the job in the low bits. The caller closes the job once every task has
 * been handed out and waits only for workers actually running; a worker that wakes late finds the
 * job closed and never touches its fields.
 */
#if defined(__linux__)
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#endif

#include "od_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() ((void)0)
#endif

#define OD_MAX_THREADS 256
#define STATE_CLOSED (1ull << 31)
#define STATE_ACTIVE_MASK ((1ull << 31) - 1)

typedef struct {
    int n_threads; /* including the calling thread */
    pthread_t workers[OD_MAX_THREADS];
    int n_workers;

    _Atomic uint32_t generation; /* futex word */
    _Atomic uint64_t state;      /* generation << 32 | closed | active workers */
    _Atomic int64_t next_task;
    _Atomic int n_sleeping;
    _Atomic int stop;

    od_task_fn fn;
    void *ctx;
    int64_t n_tasks;

    pthread_mutex_t busy; /* one job at a time; also serializes resizing */
#if !defined(__linux__)
    pthread_mutex_t sleep_lock;
    pthread_cond_t sleep_cond;
#endif
} od_pool;

static od_pool g_pool = {
    .n_threads = 0,
    .busy = PTHREAD_MUTEX_INITIALIZER,
#if !defined(__linux__)
    .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
    .sleep_cond = PTHREAD_COND_INITIALIZER,
#endif
};
static int64_t g_spin_ns = 1000 * 1000;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void wait_for_generation_change(od_pool *p, uint32_t seen) {
#if defined(__linux__)
    while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop))
        syscall(SYS_futex, &p->generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    pthread_mutex_lock(&p->sleep_lock);
    while (atomic_load(&p->generation) == seen && !atomic_load(&p->stop))
        pthread_cond_wait(&p->sleep_cond, &p->sleep_lock);
    pthread_mutex_unlock(&p->sleep_lock);
#endif
}

static void wake_sleepers(od_pool *p) {
#if defined(__linux__)
    syscall(SYS_futex, &p->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    pthread_mutex_lock(&p->sleep_lock);
    pthread_cond_broadcast(&p->sleep_cond);
    pthread_mutex_unlock(&p->sleep_lock);
#endif
}

static int64_t run_tasks(od_task_fn fn, void *ctx, int64_t n_tasks, _Atomic int64_t *next) {
    int64_t done = 0;
    for (;; done++) {
        const int64_t t = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (t >= n_tasks) break;
        fn(ctx, t);
    }
    return done;
}

/*
 * Oversubscription guard. When other processes compete for the cores, workers are often not on a
 * CPU when a job is published (the caller ends up doing everything while spinning workers only burn
 * CPU share) or get preempted mid-task (the caller then waits a whole scheduler slice): two threads
 * run slower than one. The caller knows how long its own tasks take, so it can estimate what each
 * job would have cost serially and compare with what it actually took. When the average gain over
 * recent jobs drops below 15%, jobs run on the caller alone for a while (20 ms, doubling while the
 * gain stays low, up to ~0.3 s) and then parallel execution is tried again. On an idle machine the gain
 * is ~40-50% and this never triggers. ONDEVICE_POOL_ADAPTIVE=0 disables it.
 */
static int g_adaptive = 1;
static double g_gain_avg = 0.5;   /* moving average of (serial estimate - actual) / serial estimate */
static int g_jobs_seen;           /* jobs since the last (re)start of parallel execution */
static int64_t g_solo_until_ns;   /* run on the caller alone until then */
static int64_t g_solo_window_ns = 20 * 1000 * 1000;
/* all of the above are touched only by the owner of the pool's `busy` mutex */

static void note_job(int64_t own_ns, int64_t own_tasks, int64_t n_tasks, int64_t job_ns, int64_t now) {
    if (own_tasks <= 0 || own_ns <= 0) return; /* workers did everything: fine, nothing to learn */
    const double serial = (double)own_ns / (double)own_tasks * (double)n_tasks;
    const double gain = (serial - (double)job_ns) / serial;
    g_gain_avg += (gain - g_gain_avg) / 16.0;
    if (++g_jobs_seen >= 32 && g_gain_avg < 0.15) {
        g_solo_until_ns = now + g_solo_window_ns;
        if (g_solo_window_ns < 250 * 1000 * 1000) g_solo_window_ns *= 2;
        g_gain_avg = 0.5;
        g_jobs_seen = 0;
    } else if (g_gain_avg > 0.2) {
        g_solo_window_ns = 20 * 1000 * 1000;
    }
}

static void *worker_main(void *arg) {
    od_pool *p = arg;
    uint32_t seen = atomic_load(&p->generation);
    for (;;) {
        /* spin, then block */
        if (atomic_load_explicit(&p->generation, memory_order_acquire) == seen) {
            const int64_t deadline = now_ns() + g_spin_ns;
            int changed = 0;
            for (unsigned iter = 1;; iter++) {
                if (atomic_load_explicit(&p->generation, memory_order_acquire) != seen ||
                    atomic_load_explicit(&p->stop, memory_order_relaxed)) {
                    changed = 1;
                    break;
                }
                cpu_relax();
                if ((iter & 255) == 0 && now_ns() > deadline) break;
            }
            if (!changed) {
                /* seq_cst pairs with the caller's store-generation / load-n_sleeping */
                atomic_fetch_add(&p->n_sleeping, 1);
                wait_for_generation_change(p, seen);
                atomic_fetch_sub(&p->n_sleeping, 1);
            }
        }
        if (atomic_load(&p->stop)) break;
        const uint32_t gen = atomic_load_explicit(&p->generation, memory_order_acquire);
        seen = gen;
        /* join the job unless it is already closed or superseded */
        uint64_t s = atomic_load_explicit(&p->state, memory_order_acquire);
        int joined = 0;
        while ((uint32_t)(s >> 32) == gen && !(s & STATE_CLOSED)) {
            if (atomic_compare_exchange_weak_explicit(&p->state, &s, s + 1, memory_order_acq_rel,
                                                      memory_order_acquire)) {
                joined = 1;
                break;
            }
        }
        if (!joined) continue;
        run_tasks(p->fn, p->ctx, p->n_tasks, &p->next_task);
        atomic_fetch_sub_explicit(&p->state, 1, memory_order_release);
    }
    return NULL;
}

static void pool_stop_workers(od_pool *p) {
    if (p->n_workers == 0) return;
    atomic_store(&p->stop, 1);
    atomic_fetch_add(&p->generation, 1);
    wake_sleepers(p);
    for (int i = 0; i < p->n_workers; i++) pthread_join(p->workers[i], NULL);
    p->n_workers = 0;
    atomic_store(&p->stop, 0);
}

static void pool_start_workers(od_pool *p, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    if (n_threads > OD_MAX_THREADS) n_threads = OD_MAX_THREADS;
    p->n_threads = 1;
    for (int i = 0; i < n_threads - 1; i++) {
        if (pthread_create(&p->workers[p->n_workers], NULL, worker_main, p) != 0) break;
        p->n_workers++;
    }
    p->n_threads = p->n_workers + 1;
}

static pthread_once_t g_pool_once = PTHREAD_ONCE_INIT;

/* After fork() the child has only the forking thread: forget the workers (they do not exist there)
 * and respawn them on the next call. Spawning threads inside the handler itself is not allowed. */
static _Atomic int g_respawn_threads = 0;

static void pool_after_fork_child(void) {
    const int wanted = g_pool.n_threads;
    pthread_mutex_init(&g_pool.busy, NULL);
#if !defined(__linux__)
    pthread_mutex_init(&g_pool.sleep_lock, NULL);
    pthread_cond_init(&g_pool.sleep_cond, NULL);
#endif
    g_pool.n_workers = 0;
    g_pool.n_threads = 1;
    atomic_store(&g_pool.n_sleeping, 0);
    atomic_store(&g_pool.stop, 0);
    atomic_store(&g_pool.state, 0);
    atomic_store(&g_respawn_threads, wanted);
}

static void pool_respawn_if_forked(void) {
    const int wanted = atomic_exchange(&g_respawn_threads, 0);
    if (wanted > 1) {
        pthread_mutex_lock(&g_pool.busy);
        if (g_pool.n_workers == 0) pool_start_workers(&g_pool, wanted);
        pthread_mutex_unlock(&g_pool.busy);
    }
}

static void pool_default_init(void) {
    const char *adaptive = getenv("ONDEVICE_POOL_ADAPTIVE");
    if (adaptive && strcmp(adaptive, "0") == 0) g_adaptive = 0;
    const char *spin = getenv("ONDEVICE_SPIN_US");
    if (spin && *spin) {
        const long us = strtol(spin, NULL, 10);
        if (us >= 0) g_spin_ns = (int64_t)us * 1000;
    }
    pthread_mutex_lock(&g_pool.busy);
    if (g_pool.n_threads == 0) {
        int n = od_detect_physical_cores();
        const char *env = getenv("ONDEVICE_THREADS");
        if (env && *env) {
            const long v = strtol(env, NULL, 10);
            if (v > 0) n = (int)v;
        }
        pool_start_workers(&g_pool, n);
    }
    pthread_mutex_unlock(&g_pool.busy);
    pthread_atfork(NULL, NULL, pool_after_fork_child);
}

void od_pool_run(od_task_fn fn, void *ctx, int64_t n_tasks) {
    od_pool *p = &g_pool;
    pthread_once(&g_pool_once, pool_default_init);
    if (atomic_load_explicit(&g_respawn_threads, memory_order_relaxed)) pool_respawn_if_forked();
    if (n_tasks <= 0) return;
    if (p->n_threads <= 1 || n_tasks == 1 || pthread_mutex_trylock(&p->busy) != 0) {
        /* single-threaded, trivial, or another thread owns the pool: do it here */
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    const int64_t start = g_adaptive ? now_ns() : 0;
    if (g_adaptive && start < g_solo_until_ns) {
        pthread_mutex_unlock(&p->busy);
        for (int64_t t = 0; t < n_tasks; t++) fn(ctx, t);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    p->n_tasks = n_tasks;
    atomic_store_explicit(&p->next_task, 0, memory_order_relaxed);
    const uint32_t gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&p->state, (uint64_t)gen << 32, memory_order_release);
    atomic_store(&p->generation, gen); /* seq_cst: see worker_main */
    if (atomic_load(&p->n_sleeping) > 0) wake_sleepers(p);

    const int64_t own_tasks = run_tasks(fn, ctx, n_tasks, &p->next_task);

    atomic_fetch_or_explicit(&p->state, STATE_CLOSED, memory_order_acq_rel);
    const int64_t own_done = g_adaptive ? now_ns() : 0;
    int waited = 0;
    for (unsigned iter = 1; atomic_load_explicit(&p->state, memory_order_acquire) & STATE_ACTIVE_MASK; iter++) {
        waited = 1;
        cpu_relax();
        if ((iter & 1023) == 0) sched_yield(); /* a worker was preempted mid-task: let it run */
    }
    if (g_adaptive) {
        const int64_t end = waited ? now_ns() : own_done;
        note_job(own_done - start, own_tasks, n_tasks, end - start, end);
    }
    pthread_mutex_unlock(&p->busy);
}

int od_pool_threads(void) {
    pthread_once(&g_pool_once, pool_default_init);
    if (atomic_load_explicit(&g_respawn_threads, memory_order_relaxed)) pool_respawn_if_forked();
    return g_pool.n_threads;
}

void od_pool_set_threads(int n) {
    pthread_once(&g_pool_once, pool_default_init);
    atomic_store(&g_respawn_threads, 0);
    if (n <= 0) n = od_detect_physical_cores();
    pthread_mutex_lock(&g_pool.busy);
    if (n != g_pool.n_threads) {
        pool_stop_workers(&g_pool);
        pool_start_workers(&g_pool, n);
    }
    pthread_mutex_unlock(&g_pool.busy);
}

/* ------------------------------------------------------------------ physical core count */

#if defined(__linux__)
static int read_int_file(const char *path, int *value) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    const int ok = fscanf(f, "%d", value) == 1;
    fclose(f);
    return ok;
}

/* Count distinct (package, core) pairs among the CPUs this process may run on. */
static int cores_from_sysfs(void) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return 0;
    int pairs[CPU_SETSIZE][2];
    int n_pairs = 0;
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &allowed)) continue;
        char path[128];
        int core = -1, package = -1;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/core_id", cpu);
        if (!read_int_file(path, &core)) return 0;
        snprintf(path, sizeof(path), "/sys/devices/system/cpu/cpu%d/topology/physical_package_id", cpu);
        if (!read_int_file(path, &package)) package = 0;
        int known = 0;
        for (int i = 0; i < n_pairs; i++)
            if (pairs[i][0] == package && pairs[i][1] == core) known = 1;
        if (!known) {
            pairs[n_pairs][0] = package;
            pairs[n_pairs][1] = core;
            n_pairs++;
        }
    }
    return n_pairs;
}

/* /proc/cpuinfo: distinct (physical id, core id) pairs; 0 if the fields are missing. */
static int cores_from_cpuinfo(void) {
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return 0;
    char line[512];
    int package = 0, pairs[1024][2], n_pairs = 0;
    while (fgets(line, sizeof(line), f)) {
        int v;
        if (sscanf(line, "physical id : %d", &v) == 1) package = v;
        else if (sscanf(line, "core id : %d", &v) == 1) {
            int known = 0;
            for (int i = 0; i < n_pairs; i++)
                if (pairs[i][0] == package && pairs[i][1] == v) known = 1;
            if (!known && n_pairs < 1024) {
                pairs[n_pairs][0] = package;
                pairs[n_pairs][1] = v;
                n_pairs++;
            }
        }
    }
    fclose(f);
    return n_pairs;
}
#endif

int od_detect_physical_cores(void) {
    static _Atomic int cached = 0;
    int n = atomic_load(&cached);
    if (n > 0) return n;
#if defined(__linux__)
    n = cores_from_sysfs();
    if (n <= 0) {
        n = cores_from_cpuinfo();
        cpu_set_t allowed;
        /* cpuinfo ignores the affinity mask: never exceed the CPUs we may use */
        if (sched_getaffinity(0, sizeof(allowed), &allowed) == 0 && n > CPU_COUNT(&allowed))
            n = CPU_COUNT(&allowed);
    }
#endif
    if (n <= 0) {
        const long online = sysconf(_SC_NPROCESSORS_ONLN);
        n = online > 0 ? (int)online : 1;
    }
    if (n > OD_MAX_THREADS) n = OD_MAX_THREADS;
    atomic_store(&cached, n);
    return n;
}
