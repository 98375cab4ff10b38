/*
 * cuda_double.c - a test double of the CUDA driver API (libcuda.so.1) over host memory.
 *
 * It exports the driver entry points that kvsidecar binds, with the real driver's symbol names and
 * x86-64 SysV ABI (CUdeviceptr = unsigned long long, CUdevice = int, handles = pointers, CUresult =
 * int, IPC handles = 64-byte structs passed by value), so the sidecar (through .NET NativeLibrary)
 * and a Python test engine (through ctypes) can load it in place of libcuda.so.1 on a machine
 * without a GPU. What is simulated:
 *
 *   - devices:        FAKECUDA_DEVICES ordinals (default 1, max 8) with fixed UUIDs; one primary
 *                     context per device (a static object, so its pointer is stable); the current
 *                     context is per thread.
 *   - device memory:  one POSIX shm object "/fakecuda-<pid>-<seq>" per cuMemAlloc, mapped
 *                     MAP_SHARED; the mapping's address is the device pointer. A process-wide
 *                     table of "device ranges" (own allocations and imported IPC mappings) backs
 *                     address-range queries and copy validation.
 *   - legacy IPC:     a memory handle names the shm object; another process maps it. An event
 *                     handle names a shm object that holds the event's two counters.
 *   - pinned memory:  cuMemHostAlloc = anonymous mmap; cuMemHostRegister only records the range.
 *   - streams:        one worker pthread per stream with a FIFO queue; copies are memmove on the
 *                     worker, so they really run asynchronously to the caller (optionally slowed by
 *                     FAKECUDA_COPY_DELAY_US per copy operation).
 *   - events:         {recorded, completed} counters; a record bumps "recorded" now and enqueues
 *                     "completed = that value"; waits poll "completed" (works across processes).
 *   - batch copy:     cuMemcpyBatchAsync (12.8 ABI) and cuMemcpyBatchAsync_v2 (13.0 ABI), handed
 *                     out by cuGetProcAddress_v2 according to the requested CUDA version.
 *
 * Not simulated: kernels/modules, VMM (cuMemCreate...), peer access, timing, graphs, real device
 * faults (a copy whose device range vanished before it ran sets a sticky CUDA_ERROR_ILLEGAL_ADDRESS
 * on its stream instead of faulting; a wild host pointer still crashes, as it would on a GPU).
 *
 * Test control API (prefix fakecuda_): failure injection per exported symbol, counters, copy delay,
 * batch-copy availability, pinned-memory limit, marking an allocation as VMM (not IPC-capable).
 * See README.md next to this file.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------------ */
/* Types with the real driver's ABI                                                                  */
/* ------------------------------------------------------------------------------------------------ */

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long cuuint64_t;
typedef struct fc_ctx *CUcontext;
typedef struct fc_stream *CUstream;
typedef struct fc_event *CUevent;
typedef struct { char reserved[64]; } CUipcMemHandle;
typedef struct { char reserved[64]; } CUipcEventHandle;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int srcAccessOrder; /* STREAM=1, DURING_API_CALL=2, ANY=3 */
    CUmemLocation srcLocHint;
    CUmemLocation dstLocHint;
    unsigned int flags;
} CUmemcpyAttributes;

_Static_assert(sizeof(CUipcMemHandle) == 64, "CUipcMemHandle is 64 bytes");
_Static_assert(sizeof(CUipcEventHandle) == 64, "CUipcEventHandle is 64 bytes");
_Static_assert(sizeof(CUuuid) == 16, "CUuuid is 16 bytes");
_Static_assert(sizeof(CUmemcpyAttributes) == 24, "CUmemcpyAttributes is 24 bytes");

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_MAP_FAILED = 205,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712,
    CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713,
};

enum { CU_EVENT_BLOCKING_SYNC = 1, CU_EVENT_DISABLE_TIMING = 2, CU_EVENT_INTERPROCESS = 4 };
enum { ATTR_DEVICE_ORDINAL = 9, ATTR_IS_LEGACY_CUDA_IPC_CAPABLE = 10, ATTR_RANGE_START_ADDR = 11, ATTR_RANGE_SIZE = 12 };
enum { PROC_SUCCESS = 0, PROC_SYMBOL_NOT_FOUND = 1, PROC_VERSION_NOT_SUFFICIENT = 2 };
enum { DEV_ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91 };

#define MAX_DEVICES 8
#define IPC_MEM_MAGIC 0x50494346u /* 'FCIP' */
#define IPC_EVENT_MAGIC 0x56454346u /* 'FCEV' */
#define NAME_LEN 36

#define EXPORT __attribute__((visibility("default")))

/* Wire format of our IPC handles (inside the 64 opaque bytes). */
struct ipc_mem_wire {
    uint32_t magic;
    int32_t pid;
    uint64_t seq;
    uint64_t size;
    uint32_t dev;
    char name[NAME_LEN];
};
_Static_assert(sizeof(struct ipc_mem_wire) == 64, "memory handle layout");
struct ipc_event_wire {
    uint32_t magic;
    int32_t pid;
    char name[56];
};
_Static_assert(sizeof(struct ipc_event_wire) == 64, "event handle layout");

/* ------------------------------------------------------------------------------------------------ */
/* Global state                                                                                      */
/* ------------------------------------------------------------------------------------------------ */

static int g_initialized;                /* cuInit succeeded */
static int g_ndev = 1;
static int g_version = 13000;
static int g_copy_delay_us, g_default_copy_delay_us;
static int g_batch_available = 1, g_default_batch_available = 1;
static long long g_pin_limit = -1, g_default_pin_limit = -1;
static uint64_t g_seq;                   /* names of shm objects */
static pthread_mutex_t g_init_mu = PTHREAD_MUTEX_INITIALIZER;
static void *g_self;                     /* dlopen handle of this library, for cuGetProcAddress */
static void *g_self_base;                /* load address of this library */

/* Counters (fakecuda_counter). */
static long long c_ipc_opens, c_ipc_closes, c_open_mappings, c_pinned_bytes, c_batch_calls, c_copy_calls,
    c_stream_waits, c_streams, c_events, c_device_allocs;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define ADD(x, v) __atomic_add_fetch(&(x), (v), __ATOMIC_ACQ_REL)

static long long env_ll(const char *name, long long dflt)
{
    const char *s = getenv(name);
    if (!s || !*s)
        return dflt;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || *end) {
        fprintf(stderr, "cuda-double: ignoring %s=%s (not a number)\n", name, s);
        return dflt;
    }
    return v;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Failure injection: checked first in every exported cu* entry point                               */
/* ------------------------------------------------------------------------------------------------ */

#define MAX_INJECT 64
struct inject {
    char sym[64];
    int result, skip, count; /* count -1 = forever */
    int used;
};
static struct inject g_inj[MAX_INJECT];
static int g_inj_active; /* number of used entries (fast path when 0) */
static pthread_mutex_t g_inj_mu = PTHREAD_MUTEX_INITIALIZER;

static struct inject *inject_find(const char *sym)
{
    for (int i = 0; i < MAX_INJECT; i++)
        if (g_inj[i].used && strcmp(g_inj[i].sym, sym) == 0)
            return &g_inj[i];
    return NULL;
}

static void inject_drop(struct inject *e)
{
    e->used = 0;
    ADD(g_inj_active, -1);
}

/* Returns 1 and the result to return if this call of `sym` is to fail. */
static int inject_check(const char *sym, int *rc)
{
    if (!LOAD(g_inj_active))
        return 0;
    int hit = 0;
    pthread_mutex_lock(&g_inj_mu);
    struct inject *e = inject_find(sym);
    if (e && e->skip == 0 && e->count != 0) {
        *rc = e->result;
        hit = 1;
        if (e->count > 0 && --e->count == 0)
            inject_drop(e);
    }
    pthread_mutex_unlock(&g_inj_mu);
    return hit;
}

/* A call that was let through finished; successful ones use up the injection's `skip`. */
static void inject_done(const char *sym, int rc)
{
    if (rc != CUDA_SUCCESS || !LOAD(g_inj_active))
        return;
    pthread_mutex_lock(&g_inj_mu);
    struct inject *e = inject_find(sym);
    if (e && e->skip > 0)
        e->skip--;
    pthread_mutex_unlock(&g_inj_mu);
}

static int inject_set(const char *sym, int result, int skip, int count)
{
    if (!sym || !*sym || strlen(sym) >= sizeof g_inj[0].sym || skip < 0 || count < -1)
        return -1;
    int rc = 0;
    pthread_mutex_lock(&g_inj_mu);
    struct inject *e = inject_find(sym);
    if (count == 0) {
        if (e)
            inject_drop(e);
    } else {
        if (!e) {
            for (int i = 0; i < MAX_INJECT && !e; i++)
                if (!g_inj[i].used)
                    e = &g_inj[i];
            if (e) {
                snprintf(e->sym, sizeof e->sym, "%s", sym);
                e->used = 1;
                ADD(g_inj_active, 1);
            }
        }
        if (e) {
            e->result = result;
            e->skip = skip;
            e->count = count;
        } else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&g_inj_mu);
    return rc;
}

/* FAKECUDA_INJECT="sym=code[@skip][xcount],sym2=..." (count defaults to -1 = forever). */
static void inject_parse_env(void)
{
    const char *env = getenv("FAKECUDA_INJECT");
    if (!env || !*env)
        return;
    char *copy = strdup(env), *save = NULL;
    if (!copy)
        return;
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        char *p;
        long code, skip = 0, count = -1;
        if (!eq)
            goto bad;
        *eq = 0;
        code = strtol(eq + 1, &p, 0);
        if (p == eq + 1)
            goto bad;
        if (*p == '@') {
            char *q = p + 1;
            skip = strtol(q, &p, 0);
            if (p == q)
                goto bad;
        }
        if (*p == 'x') {
            char *q = p + 1;
            count = strtol(q, &p, 0);
            if (p == q)
                goto bad;
        }
        if (*p || inject_set(item, (int)code, (int)skip, (int)count) != 0)
            goto bad;
        continue;
    bad:
        fprintf(stderr, "cuda-double: ignoring malformed FAKECUDA_INJECT item '%s'\n", item);
    }
    free(copy);
}

/* Every exported cu* function is `API(the call of its implementation)`: injection first, then the
 * implementation, then the bookkeeping of `skip`. __func__ is the exported name. */
#define API(call)                                  \
    do {                                           \
        int rc_;                                   \
        if (inject_check(__func__, &rc_))          \
            return rc_;                            \
        rc_ = (call);                              \
        inject_done(__func__, rc_);                \
        return rc_;                                \
    } while (0)

/* ------------------------------------------------------------------------------------------------ */
/* Contexts                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

#define CTX_MAGIC 0x43545846u
struct fc_ctx {
    uint32_t magic;
    int dev;
    int refs; /* primary-context retain count (informational: the context is never destroyed) */
};
static struct fc_ctx g_ctx[MAX_DEVICES];
static pthread_mutex_t g_ctx_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread struct fc_ctx *t_ctx;       /* current context of this thread */
static __thread struct fc_ctx *t_stack[16]; /* cuCtxPushCurrent / cuCtxPopCurrent */
static __thread int t_depth;

#define NEED_INIT()                                 \
    do {                                            \
        if (!LOAD(g_initialized))                   \
            return CUDA_ERROR_NOT_INITIALIZED;      \
    } while (0)
#define NEED_CTX()                                  \
    do {                                            \
        NEED_INIT();                                \
        if (!t_ctx)                                 \
            return CUDA_ERROR_INVALID_CONTEXT;      \
    } while (0)

static struct fc_ctx *ctx_lookup(CUcontext c)
{
    for (int i = 0; i < g_ndev; i++)
        if (c == &g_ctx[i])
            return &g_ctx[i];
    return NULL;
}

static int valid_dev(CUdevice d) { return d >= 0 && d < g_ndev; }

/* ------------------------------------------------------------------------------------------------ */
/* Device ranges (own allocations and imported IPC mappings)                                         */
/* ------------------------------------------------------------------------------------------------ */

enum { R_OWN = 1, R_IMPORTED = 2 };
struct range {
    uintptr_t base;
    size_t size;
    int dev, kind, vmm, refs;
    pid_t pid; /* process that created the shm object (to unlink only our own at exit, also after fork) */
    uint64_t seq;
    char name[NAME_LEN];
    struct range *next;
};
static struct range *g_ranges;
/* Writers: alloc/free/open/close. Readers: validation and the copies themselves (so a copy never
 * touches a mapping that is being removed). Writer-preferring so copies cannot starve cuMemFree. */
static pthread_rwlock_t g_rlock;

static struct range *range_containing(uintptr_t p)
{
    for (struct range *r = g_ranges; r; r = r->next)
        if (p >= r->base && p - r->base < r->size)
            return r;
    return NULL;
}

static struct range *range_at(uintptr_t base, int kind)
{
    for (struct range *r = g_ranges; r; r = r->next)
        if (r->base == base && r->kind == kind)
            return r;
    return NULL;
}

static void range_remove(struct range *x)
{
    for (struct range **pp = &g_ranges; *pp; pp = &(*pp)->next)
        if (*pp == x) {
            *pp = x->next;
            return;
        }
}

/* [p, p+n) lies inside one device range. Caller holds g_rlock. */
static int range_fits(uintptr_t p, size_t n)
{
    struct range *r = range_containing(p);
    return r && n <= r->size - (p - r->base);
}

/* ------------------------------------------------------------------------------------------------ */
/* Pinned host ranges                                                                                */
/* ------------------------------------------------------------------------------------------------ */

enum { P_HOSTALLOC = 1, P_REGISTERED = 2 };
struct pin {
    uintptr_t base;
    size_t size, maplen;
    int kind;
    struct pin *next;
};
static struct pin *g_pins;
static pthread_mutex_t g_pin_mu = PTHREAD_MUTEX_INITIALIZER;

static struct pin *pin_containing(uintptr_t p)
{
    for (struct pin *x = g_pins; x; x = x->next)
        if (p >= x->base && p - x->base < x->size)
            return x;
    return NULL;
}

static int pin_overlaps(uintptr_t p, size_t n)
{
    for (struct pin *x = g_pins; x; x = x->next)
        if (p < x->base + x->size && x->base < p + n)
            return 1;
    return 0;
}

static int pin_count_overlapping(uintptr_t p, size_t n)
{
    int k = 0;
    for (struct pin *x = g_pins; x; x = x->next)
        if (p < x->base + x->size && x->base < p + n)
            k++;
    return k;
}

static struct pin *pin_at(uintptr_t base, int kind)
{
    for (struct pin *x = g_pins; x; x = x->next)
        if (x->base == base && x->kind == kind)
            return x;
    return NULL;
}

static void pin_remove(struct pin *x)
{
    for (struct pin **pp = &g_pins; *pp; pp = &(*pp)->next)
        if (*pp == x) {
            *pp = x->next;
            return;
        }
}

static int pin_admit(size_t n) /* caller holds g_pin_mu */
{
    long long limit = LOAD(g_pin_limit);
    return limit < 0 || (unsigned long long)LOAD(c_pinned_bytes) + n <= (unsigned long long)limit;
}

/* ------------------------------------------------------------------------------------------------ */
/* Events                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

struct ev_state {
    uint64_t recorded;  /* number of records issued */
    uint64_t completed; /* highest record number whose preceding stream work finished */
};
#define EV_SHM_SIZE 64

#define EVENT_MAGIC 0x45565446u
struct fc_event {
    uint32_t magic;
    unsigned flags;
    struct ev_state *st;
    int ipc;   /* state lives in a shm object */
    int owner; /* created here (not opened from a handle): unlink the shm object at destroy */
    pid_t pid;
    char name[NAME_LEN];
    int refs; /* list membership + queued stream ops + callers in flight */
    struct fc_event *next;
};
static struct fc_event *g_events;
static pthread_mutex_t g_events_mu = PTHREAD_MUTEX_INITIALIZER;

static struct fc_event *event_get(CUevent h)
{
    struct fc_event *e = NULL;
    if (!h)
        return NULL;
    pthread_mutex_lock(&g_events_mu);
    for (struct fc_event *x = g_events; x; x = x->next)
        if (x == h) {
            e = x;
            e->refs++;
            break;
        }
    pthread_mutex_unlock(&g_events_mu);
    return e;
}

static void event_put(struct fc_event *e)
{
    pthread_mutex_lock(&g_events_mu);
    int last = --e->refs == 0;
    pthread_mutex_unlock(&g_events_mu);
    if (!last)
        return;
    if (e->ipc)
        munmap(e->st, EV_SHM_SIZE);
    else
        free(e->st);
    e->magic = 0;
    free(e);
}

static void event_complete(struct ev_state *st, uint64_t v) /* completed = max(completed, v) */
{
    uint64_t cur = __atomic_load_n(&st->completed, __ATOMIC_ACQUIRE);
    while (cur < v && !__atomic_compare_exchange_n(&st->completed, &cur, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    }
}

static void event_wait(struct ev_state *st, uint64_t target)
{
    while (__atomic_load_n(&st->completed, __ATOMIC_ACQUIRE) < target)
        sleep_us(20);
}

/* ------------------------------------------------------------------------------------------------ */
/* Streams: a worker thread per stream running a FIFO of operations                                 */
/* ------------------------------------------------------------------------------------------------ */

enum { OP_COPY = 1, OP_SIGNAL = 2, OP_WAIT = 3 };
struct seg {
    uintptr_t dst, src;
    size_t n;
    unsigned char dst_dev, src_dev; /* side is device memory: re-checked when the copy runs */
};
struct op {
    int kind;
    struct op *next;
    struct fc_event *ev; /* SIGNAL/WAIT: holds a reference */
    uint64_t value;
    size_t nseg;
    struct seg segs[];
};

#define STREAM_MAGIC 0x53545246u
struct fc_stream {
    uint32_t magic;
    int dev;
    pthread_t thr;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_idle;
    struct op *head, *tail;
    int busy, stop, sticky;
    int refs; /* list membership + callers in flight */
    struct fc_stream *next;
};
static struct fc_stream *g_streams;
static pthread_mutex_t g_streams_mu = PTHREAD_MUTEX_INITIALIZER;

/* The NULL stream and the special handles CU_STREAM_LEGACY (1) / CU_STREAM_PER_THREAD (2):
 * operations on them run synchronously in the caller. */
static int is_null_stream(CUstream h) { return (uintptr_t)h <= 2; }

static struct fc_stream *stream_get(CUstream h)
{
    struct fc_stream *s = NULL;
    pthread_mutex_lock(&g_streams_mu);
    for (struct fc_stream *x = g_streams; x; x = x->next)
        if (x == h) {
            s = x;
            s->refs++;
            break;
        }
    pthread_mutex_unlock(&g_streams_mu);
    return s;
}

static void stream_put(struct fc_stream *s)
{
    pthread_mutex_lock(&g_streams_mu);
    int last = --s->refs == 0;
    pthread_mutex_unlock(&g_streams_mu);
    if (!last)
        return;
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv_work);
    pthread_cond_destroy(&s->cv_idle);
    s->magic = 0;
    free(s);
}

/* Runs copies; a device side whose range is gone by now gives CUDA_ERROR_ILLEGAL_ADDRESS. */
static int exec_segs(const struct seg *segs, size_t nseg)
{
    int rc = CUDA_SUCCESS;
    pthread_rwlock_rdlock(&g_rlock);
    for (size_t i = 0; i < nseg; i++) {
        const struct seg *g = &segs[i];
        if (g->n == 0)
            continue;
        if ((g->dst_dev && !range_fits(g->dst, g->n)) || (g->src_dev && !range_fits(g->src, g->n))) {
            rc = CUDA_ERROR_ILLEGAL_ADDRESS;
            break;
        }
        memmove((void *)g->dst, (const void *)g->src, g->n);
    }
    pthread_rwlock_unlock(&g_rlock);
    return rc;
}

static void run_op(struct fc_stream *s, struct op *o)
{
    switch (o->kind) {
    case OP_COPY: {
        int delay = LOAD(g_copy_delay_us);
        if (delay > 0)
            sleep_us(delay);
        pthread_mutex_lock(&s->mu);
        int sticky = s->sticky;
        pthread_mutex_unlock(&s->mu);
        if (sticky) /* like a dead context: later copies do nothing */
            break;
        int rc = exec_segs(o->segs, o->nseg);
        if (rc) {
            pthread_mutex_lock(&s->mu);
            s->sticky = rc;
            pthread_mutex_unlock(&s->mu);
        }
        break;
    }
    case OP_SIGNAL:
        event_complete(o->ev->st, o->value);
        break;
    case OP_WAIT:
        event_wait(o->ev->st, o->value);
        break;
    }
    if (o->ev)
        event_put(o->ev);
    free(o);
}

static void *stream_worker(void *arg)
{
    struct fc_stream *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->head && !s->stop)
            pthread_cond_wait(&s->cv_work, &s->mu);
        if (!s->head)
            break; /* stopping and drained */
        struct op *o = s->head;
        s->head = o->next;
        if (!s->head)
            s->tail = NULL;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        run_op(s, o);
        pthread_mutex_lock(&s->mu);
        s->busy = 0;
        if (!s->head)
            pthread_cond_broadcast(&s->cv_idle);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int stream_enqueue(struct fc_stream *s, struct op *o)
{
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    o->next = NULL;
    if (s->tail)
        s->tail->next = o;
    else
        s->head = o;
    s->tail = o;
    pthread_cond_signal(&s->cv_work);
    pthread_mutex_unlock(&s->mu);
    return CUDA_SUCCESS;
}

static int stream_sync(struct fc_stream *s)
{
    pthread_mutex_lock(&s->mu);
    while (s->head || s->busy)
        pthread_cond_wait(&s->cv_idle, &s->mu);
    int rc = s->sticky;
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* Resolves a stream argument: *out = NULL for the NULL stream. */
static int stream_resolve(CUstream h, struct fc_stream **out)
{
    *out = NULL;
    if (is_null_stream(h))
        return CUDA_SUCCESS;
    *out = stream_get(h);
    return *out ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

static struct op *op_new(int kind, size_t nseg)
{
    struct op *o = calloc(1, sizeof *o + nseg * sizeof(struct seg));
    if (o) {
        o->kind = kind;
        o->nseg = nseg;
    }
    return o;
}

/* Runs `o` now (NULL stream) or queues it on `s`; consumes `o`. */
static int submit(struct fc_stream *s, struct op *o)
{
    if (s)
        return stream_enqueue(s, o);
    int rc = CUDA_SUCCESS;
    if (o->kind == OP_COPY)
        rc = exec_segs(o->segs, o->nseg);
    else if (o->kind == OP_SIGNAL)
        event_complete(o->ev->st, o->value);
    else if (o->kind == OP_WAIT)
        event_wait(o->ev->st, o->value);
    if (o->ev)
        event_put(o->ev);
    free(o);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Init, version, errors, devices                                                                    */
/* ------------------------------------------------------------------------------------------------ */

static int do_init(unsigned flags)
{
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_init_mu);
    int rc = CUDA_SUCCESS;
    if (!LOAD(g_initialized)) {
        if (env_ll("FAKECUDA_NO_DEVICE", 0) != 0) {
            rc = CUDA_ERROR_NO_DEVICE;
        } else {
            long long n = env_ll("FAKECUDA_DEVICES", 1);
            g_ndev = n < 1 ? 1 : n > MAX_DEVICES ? MAX_DEVICES : (int)n;
            for (int i = 0; i < MAX_DEVICES; i++) {
                g_ctx[i].magic = CTX_MAGIC;
                g_ctx[i].dev = i;
            }
            STORE(g_initialized, 1);
        }
    }
    pthread_mutex_unlock(&g_init_mu);
    return rc;
}

static int do_driver_version(int *v)
{
    if (!v)
        return CUDA_ERROR_INVALID_VALUE;
    *v = g_version;
    return CUDA_SUCCESS;
}

static const struct {
    int code;
    const char *name, *text;
} k_errors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed"},
    {208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {221, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "PTX JIT compiler library not found"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped"},
    {713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static int do_error_text(CUresult code, const char **p, int want_name)
{
    if (!p)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof k_errors / sizeof k_errors[0]; i++)
        if (k_errors[i].code == code) {
            *p = want_name ? k_errors[i].name : k_errors[i].text;
            return CUDA_SUCCESS;
        }
    *p = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

static int do_device_count(int *n)
{
    NEED_INIT();
    if (!n)
        return CUDA_ERROR_INVALID_VALUE;
    *n = g_ndev;
    return CUDA_SUCCESS;
}

static int do_device_get(CUdevice *d, int ordinal)
{
    NEED_INIT();
    if (!d)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}

static int do_device_uuid(CUuuid *u, CUdevice d)
{
    NEED_INIT();
    if (!u)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    static const unsigned char prefix[4] = {0xfa, 0xce, 0xcd, 0xa0};
    memset(u->bytes, 0, sizeof u->bytes);
    memcpy(u->bytes, prefix, sizeof prefix);
    u->bytes[15] = (char)(unsigned char)d;
    return CUDA_SUCCESS;
}

static int do_device_attribute(int *v, int attr, CUdevice d)
{
    NEED_INIT();
    if (!v)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    *v = attr == DEV_ATTR_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM ? 1 : 0;
    return CUDA_SUCCESS;
}

static int do_device_name(char *name, int len, CUdevice d)
{
    NEED_INIT();
    if (!name || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", "kvsidecar CUDA driver double");
    return CUDA_SUCCESS;
}

static int do_device_pci_bus_id(char *s, int len, CUdevice d)
{
    NEED_INIT();
    if (!s || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(s, (size_t)len, "0000:%02x:00.0", 0x18 + d);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ */
/* Context implementation                                                                            */
/* ------------------------------------------------------------------------------------------------ */

static int do_primary_retain(CUcontext *c, CUdevice d)
{
    NEED_INIT();
    if (!c)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_ctx_mu);
    g_ctx[d].refs++;
    pthread_mutex_unlock(&g_ctx_mu);
    *c = &g_ctx[d];
    return CUDA_SUCCESS;
}

static int do_primary_release(CUdevice d)
{
    NEED_INIT();
    if (!valid_dev(d))
        return CUDA_ERROR_INVALID_DEVICE;
    int rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_ctx_mu);
    if (g_ctx[d].refs > 0)
        g_ctx[d].refs--;
    else
        rc = CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_unlock(&g_ctx_mu);
    return rc;
}

static int do_ctx_set(CUcontext c)
{
    NEED_INIT();
    if (!c) {
        t_ctx = NULL;
        return CUDA_SUCCESS;
    }
    struct fc_ctx *x = ctx_lookup(c);
    if (!x)
        return CUDA_ERROR_INVALID_CONTEXT;
    t_ctx = x;
    return CUDA_SUCCESS;
}

static int do_ctx_get(CUcontext *c)
{
    NEED_INIT();
    if (!c)
        return CUDA_ERROR_INVALID_VALUE;
    *c = t_ctx;
    return CUDA_SUCCESS;
}

static int do_ctx_push(CUcontext c)
{
    NEED_INIT();
    struct fc_ctx *x = ctx_lookup(c);
    if (!x)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth >= (int)(sizeof t_stack / sizeof t_stack[0]))
        return CUDA_ERROR_OUT_OF_MEMORY;
    t_stack[t_depth++] = t_ctx;
    t_ctx = x;
    return CUDA_SUCCESS;
}

static int do_ctx_pop(CUcontext *c)
{
    NEED_CTX();
    if (c)
        *c = t_ctx;
    t_ctx = t_depth > 0 ? t_stack[--t_depth] : NULL;
    return CUDA_SUCCESS;
}

static int do_ctx_device(CUdevice *d)
{
    NEED_CTX();
    if (!d)
        return CUDA_ERROR_INVALID_VALUE;
    *d = t_ctx->dev;
    return CUDA_SUCCESS;
}

static int do_ctx_sync(void)
{
    NEED_CTX();
    /* Snapshot the live streams (with references), then wait for each outside the list lock. */
    pthread_mutex_lock(&g_streams_mu);
    size_t n = 0;
    for (struct fc_stream *s = g_streams; s; s = s->next)
        n++;
    struct fc_stream **all = calloc(n ? n : 1, sizeof *all);
    if (!all) {
        pthread_mutex_unlock(&g_streams_mu);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    n = 0;
    for (struct fc_stream *s = g_streams; s; s = s->next) {
        s->refs++;
        all[n++] = s;
    }
    pthread_mutex_unlock(&g_streams_mu);
    int rc = CUDA_SUCCESS;
    for (size_t i = 0; i < n; i++) {
        int r = stream_sync(all[i]);
        if (r && !rc)
            rc = r;
        stream_put(all[i]);
    }
    free(all);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Device memory, address queries                                                                    */
/* ------------------------------------------------------------------------------------------------ */

static int do_mem_alloc(CUdeviceptr *dptr, size_t n)
{
    NEED_CTX();
    if (!dptr || n == 0)
        return CUDA_ERROR_INVALID_VALUE;
    struct range *r = calloc(1, sizeof *r);
    if (!r)
        return CUDA_ERROR_OUT_OF_MEMORY;
    r->seq = ADD(g_seq, 1);
    r->pid = getpid();
    snprintf(r->name, sizeof r->name, "/fakecuda-%d-%llu", (int)r->pid, (unsigned long long)r->seq);
    int fd = shm_open(r->name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
        free(r);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)n) == 0)
        p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(r->name);
        free(r);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    r->base = (uintptr_t)p;
    r->size = n;
    r->dev = t_ctx->dev;
    r->kind = R_OWN;
    r->refs = 1;
    pthread_rwlock_wrlock(&g_rlock);
    r->next = g_ranges;
    g_ranges = r;
    pthread_rwlock_unlock(&g_rlock);
    ADD(c_device_allocs, 1);
    *dptr = (CUdeviceptr)r->base;
    return CUDA_SUCCESS;
}

static int do_mem_free(CUdeviceptr d)
{
    NEED_CTX();
    pthread_rwlock_wrlock(&g_rlock);
    struct range *r = range_at((uintptr_t)d, R_OWN);
    if (r)
        range_remove(r);
    pthread_rwlock_unlock(&g_rlock);
    if (!r)
        return CUDA_ERROR_INVALID_VALUE;
    munmap((void *)r->base, r->size);
    shm_unlink(r->name);
    free(r);
    ADD(c_device_allocs, -1);
    return CUDA_SUCCESS;
}

static int do_address_range(CUdeviceptr *base, size_t *size, CUdeviceptr p)
{
    NEED_CTX();
    int rc = CUDA_ERROR_NOT_FOUND;
    pthread_rwlock_rdlock(&g_rlock);
    struct range *r = range_containing((uintptr_t)p);
    if (r) {
        if (base)
            *base = (CUdeviceptr)r->base;
        if (size)
            *size = r->size;
        rc = CUDA_SUCCESS;
    }
    pthread_rwlock_unlock(&g_rlock);
    return rc;
}

static int do_pointer_attribute(void *data, int attr, CUdeviceptr p)
{
    NEED_CTX();
    if (!data)
        return CUDA_ERROR_INVALID_VALUE;
    int rc = CUDA_SUCCESS;
    pthread_rwlock_rdlock(&g_rlock);
    struct range *r = range_containing((uintptr_t)p);
    if (!r)
        rc = CUDA_ERROR_INVALID_VALUE;
    else
        switch (attr) {
        case ATTR_DEVICE_ORDINAL:
            *(int *)data = r->dev;
            break;
        case ATTR_IS_LEGACY_CUDA_IPC_CAPABLE:
            *(int *)data = r->vmm ? 0 : 1;
            break;
        case ATTR_RANGE_START_ADDR:
            *(CUdeviceptr *)data = (CUdeviceptr)r->base;
            break;
        case ATTR_RANGE_SIZE:
            *(size_t *)data = r->size;
            break;
        default:
            rc = CUDA_ERROR_INVALID_VALUE;
        }
    pthread_rwlock_unlock(&g_rlock);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Legacy IPC memory handles                                                                         */
/* ------------------------------------------------------------------------------------------------ */

static int do_ipc_get_mem_handle(CUipcMemHandle *h, CUdeviceptr d)
{
    NEED_CTX();
    if (!h)
        return CUDA_ERROR_INVALID_VALUE;
    int rc = CUDA_SUCCESS;
    struct ipc_mem_wire w;
    memset(&w, 0, sizeof w);
    pthread_rwlock_rdlock(&g_rlock);
    struct range *r = range_at((uintptr_t)d, R_OWN); /* the base of an own allocation only */
    if (!r || r->vmm) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else {
        w.magic = IPC_MEM_MAGIC;
        w.pid = (int32_t)r->pid;
        w.seq = r->seq;
        w.size = r->size;
        w.dev = (uint32_t)r->dev;
        snprintf(w.name, sizeof w.name, "%s", r->name);
    }
    pthread_rwlock_unlock(&g_rlock);
    if (rc == CUDA_SUCCESS)
        memcpy(h, &w, sizeof w);
    return rc;
}

static int do_ipc_open_mem_handle(CUdeviceptr *out, CUipcMemHandle h, unsigned flags)
{
    NEED_CTX();
    if (!out || (flags & ~1u)) /* CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1 */
        return CUDA_ERROR_INVALID_VALUE;
    struct ipc_mem_wire w;
    memcpy(&w, &h, sizeof w);
    if (w.magic != IPC_MEM_MAGIC || memchr(w.name, 0, sizeof w.name) == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (w.pid == (int32_t)getpid())
        return CUDA_ERROR_INVALID_CONTEXT; /* the real driver refuses to open its own process's handle */
    if (w.pid <= 0 || (kill((pid_t)w.pid, 0) == -1 && errno == ESRCH))
        return CUDA_ERROR_INVALID_HANDLE; /* exporter is gone */

    int rc = CUDA_SUCCESS;
    pthread_rwlock_wrlock(&g_rlock);
    for (struct range *r = g_ranges; r; r = r->next)
        if (r->kind == R_IMPORTED && strcmp(r->name, w.name) == 0) {
            r->refs++; /* already mapped in this process: same pointer */
            *out = (CUdeviceptr)r->base;
            pthread_rwlock_unlock(&g_rlock);
            return CUDA_SUCCESS;
        }
    struct range *r = NULL;
    struct stat st;
    int fd = shm_open(w.name, O_RDWR, 0);
    if (fd < 0 || fstat(fd, &st) != 0 || (uint64_t)st.st_size != w.size || w.size == 0) {
        rc = CUDA_ERROR_INVALID_HANDLE; /* freed by the exporter, or not the object the handle names */
    } else {
        void *p = mmap(NULL, (size_t)w.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        r = p == MAP_FAILED ? NULL : calloc(1, sizeof *r);
        if (!r) {
            if (p != MAP_FAILED)
                munmap(p, (size_t)w.size);
            rc = CUDA_ERROR_MAP_FAILED;
        } else {
            r->base = (uintptr_t)p;
            r->size = (size_t)w.size;
            r->dev = (int)w.dev;
            r->kind = R_IMPORTED;
            r->refs = 1;
            r->pid = (pid_t)w.pid;
            r->seq = w.seq;
            snprintf(r->name, sizeof r->name, "%s", w.name);
            r->next = g_ranges;
            g_ranges = r;
            *out = (CUdeviceptr)r->base;
        }
    }
    if (fd >= 0)
        close(fd);
    pthread_rwlock_unlock(&g_rlock);
    if (rc == CUDA_SUCCESS) {
        ADD(c_ipc_opens, 1);
        ADD(c_open_mappings, 1);
    }
    return rc;
}

static int do_ipc_close_mem_handle(CUdeviceptr d)
{
    NEED_CTX();
    pthread_rwlock_wrlock(&g_rlock);
    /* Like the real driver: one close unmaps it for every user in the process (refcount ignored). */
    struct range *r = range_at((uintptr_t)d, R_IMPORTED);
    if (r)
        range_remove(r);
    pthread_rwlock_unlock(&g_rlock);
    if (!r)
        return CUDA_ERROR_INVALID_VALUE;
    munmap((void *)r->base, r->size);
    free(r);
    ADD(c_ipc_closes, 1);
    ADD(c_open_mappings, -1);
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ */
/* Pinned host memory                                                                                */
/* ------------------------------------------------------------------------------------------------ */

static int do_host_alloc(void **pp, size_t n, unsigned flags)
{
    NEED_CTX();
    if (!pp || n == 0 || (flags & ~7u)) /* PORTABLE=1, DEVICEMAP=2, WRITECOMBINED=4 */
        return CUDA_ERROR_INVALID_VALUE;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t maplen = (n + page - 1) / page * page;
    int rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_pin_mu);
    struct pin *x = NULL;
    if (!pin_admit(n)) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        void *p = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        x = p == MAP_FAILED ? NULL : calloc(1, sizeof *x);
        if (!x) {
            if (p != MAP_FAILED)
                munmap(p, maplen);
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        } else {
            x->base = (uintptr_t)p;
            x->size = n;
            x->maplen = maplen;
            x->kind = P_HOSTALLOC;
            x->next = g_pins;
            g_pins = x;
            ADD(c_pinned_bytes, (long long)n);
            *pp = p;
        }
    }
    pthread_mutex_unlock(&g_pin_mu);
    return rc;
}

static int do_free_host(void *p)
{
    NEED_CTX();
    pthread_mutex_lock(&g_pin_mu);
    struct pin *x = p ? pin_at((uintptr_t)p, P_HOSTALLOC) : NULL;
    if (x) {
        pin_remove(x);
        ADD(c_pinned_bytes, -(long long)x->size);
    }
    pthread_mutex_unlock(&g_pin_mu);
    if (!x)
        return CUDA_ERROR_INVALID_VALUE;
    munmap((void *)x->base, x->maplen);
    free(x);
    return CUDA_SUCCESS;
}

static int do_host_register(void *p, size_t n, unsigned flags)
{
    NEED_CTX();
    if (!p || n == 0 || (flags & ~0xFu)) /* PORTABLE=1, DEVICEMAP=2, IOMEMORY=4, READ_ONLY=8 */
        return CUDA_ERROR_INVALID_VALUE;
    if ((uintptr_t)p + n < (uintptr_t)p)
        return CUDA_ERROR_INVALID_VALUE;
    int rc = CUDA_SUCCESS;
    pthread_mutex_lock(&g_pin_mu);
    if (pin_overlaps((uintptr_t)p, n)) {
        rc = CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED;
    } else if (!pin_admit(n)) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        struct pin *x = calloc(1, sizeof *x);
        if (!x) {
            rc = CUDA_ERROR_OUT_OF_MEMORY;
        } else {
            x->base = (uintptr_t)p;
            x->size = n;
            x->kind = P_REGISTERED;
            x->next = g_pins;
            g_pins = x;
            ADD(c_pinned_bytes, (long long)n);
        }
    }
    pthread_mutex_unlock(&g_pin_mu);
    return rc;
}

static int do_host_unregister(void *p)
{
    NEED_CTX();
    pthread_mutex_lock(&g_pin_mu);
    struct pin *x = p ? pin_at((uintptr_t)p, P_REGISTERED) : NULL;
    if (x) {
        pin_remove(x);
        ADD(c_pinned_bytes, -(long long)x->size);
    }
    pthread_mutex_unlock(&g_pin_mu);
    if (!x)
        return CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED;
    free(x);
    return CUDA_SUCCESS;
}

static int do_host_device_pointer(CUdeviceptr *out, void *p, unsigned flags)
{
    NEED_CTX();
    if (!out || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_pin_mu);
    int found = p && pin_containing((uintptr_t)p);
    pthread_mutex_unlock(&g_pin_mu);
    if (!found)
        return CUDA_ERROR_INVALID_VALUE;
    *out = (CUdeviceptr)(uintptr_t)p; /* mapped pinned memory: same address on the "device" */
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ */
/* Streams and copies                                                                                */
/* ------------------------------------------------------------------------------------------------ */

static int do_stream_create(CUstream *out, unsigned flags)
{
    NEED_CTX();
    if (!out || (flags & ~1u)) /* CU_STREAM_NON_BLOCKING = 1 */
        return CUDA_ERROR_INVALID_VALUE;
    struct fc_stream *s = calloc(1, sizeof *s);
    if (!s)
        return CUDA_ERROR_OUT_OF_MEMORY;
    s->magic = STREAM_MAGIC;
    s->dev = t_ctx->dev;
    s->refs = 1;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv_work, NULL);
    pthread_cond_init(&s->cv_idle, NULL);
    if (pthread_create(&s->thr, NULL, stream_worker, s) != 0) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv_work);
        pthread_cond_destroy(&s->cv_idle);
        free(s);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_mutex_lock(&g_streams_mu);
    s->next = g_streams;
    g_streams = s;
    pthread_mutex_unlock(&g_streams_mu);
    ADD(c_streams, 1);
    *out = s;
    return CUDA_SUCCESS;
}

static int do_stream_destroy(CUstream h)
{
    NEED_CTX();
    if (is_null_stream(h))
        return CUDA_ERROR_INVALID_HANDLE;
    struct fc_stream *s = NULL;
    pthread_mutex_lock(&g_streams_mu); /* unlink first: no new lookups find it */
    for (struct fc_stream **pp = &g_streams; *pp; pp = &(*pp)->next)
        if (*pp == h) {
            s = *pp;
            *pp = s->next;
            break;
        }
    pthread_mutex_unlock(&g_streams_mu);
    if (!s)
        return CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_lock(&s->mu);
    s->stop = 1; /* the worker drains the queue, then exits */
    pthread_cond_signal(&s->cv_work);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thr, NULL);
    ADD(c_streams, -1);
    stream_put(s);
    return CUDA_SUCCESS;
}

static int do_stream_sync(CUstream h)
{
    NEED_CTX();
    struct fc_stream *s;
    int rc = stream_resolve(h, &s);
    if (rc || !s)
        return rc;
    rc = stream_sync(s);
    stream_put(s);
    return rc;
}

static int do_stream_query(CUstream h)
{
    NEED_CTX();
    struct fc_stream *s;
    int rc = stream_resolve(h, &s);
    if (rc || !s)
        return rc;
    pthread_mutex_lock(&s->mu);
    rc = (s->head || s->busy) ? CUDA_ERROR_NOT_READY : s->sticky;
    pthread_mutex_unlock(&s->mu);
    stream_put(s);
    return rc;
}

/* Side modes of a copy: HOST (not validated, only non-NULL), DEVICE (must fit in one device range),
 * UNIFIED (device if it starts inside a device range, then it must fit; else host). */
enum { SIDE_HOST = 0, SIDE_DEVICE = 1, SIDE_UNIFIED = 2 };

/* Classifies one side. Caller holds g_rlock. Returns 0 if valid and sets *is_dev. */
static int classify_side(uintptr_t p, size_t n, int mode, unsigned char *is_dev)
{
    *is_dev = 0;
    if (mode == SIDE_DEVICE || (mode == SIDE_UNIFIED && range_containing(p))) {
        if (!range_fits(p, n))
            return -1;
        *is_dev = 1;
        return 0;
    }
    return p ? 0 : -1;
}

static int do_copy(uintptr_t dst, uintptr_t src, size_t n, int dst_mode, int src_mode, CUstream h)
{
    NEED_CTX();
    struct fc_stream *s;
    int rc = stream_resolve(h, &s);
    if (rc)
        return rc;
    struct op *o = op_new(OP_COPY, 1);
    if (!o) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    struct seg *g = &o->segs[0];
    g->dst = dst;
    g->src = src;
    g->n = n;
    if (n != 0) { /* validated at enqueue */
        pthread_rwlock_rdlock(&g_rlock);
        if (classify_side(dst, n, dst_mode, &g->dst_dev) || classify_side(src, n, src_mode, &g->src_dev))
            rc = CUDA_ERROR_INVALID_VALUE;
        pthread_rwlock_unlock(&g_rlock);
    }
    if (rc || n == 0) {
        free(o);
        goto out;
    }
    rc = submit(s, o);
out:
    if (s)
        stream_put(s);
    if (rc == CUDA_SUCCESS)
        ADD(c_copy_calls, 1);
    return rc;
}

/* cuMemcpyPeerAsync: a device-to-device copy (all "devices" share the host address space). */
static int do_peer_copy(CUdeviceptr dst, CUcontext dctx, CUdeviceptr src, CUcontext sctx, size_t n, CUstream h)
{
    NEED_CTX();
    if (!ctx_lookup(dctx) || !ctx_lookup(sctx))
        return CUDA_ERROR_INVALID_CONTEXT;
    return do_copy((uintptr_t)dst, (uintptr_t)src, n, SIDE_DEVICE, SIDE_DEVICE, h);
}

/* Batched copy, both ABIs. failIdx may be NULL (13.0 ABI). */
static int do_batch(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count, CUmemcpyAttributes *attrs,
                    size_t *attrsIdxs, size_t numAttrs, size_t *failIdx, CUstream h)
{
    size_t fail = SIZE_MAX;
    int rc = CUDA_SUCCESS;
    struct fc_stream *s = NULL;
    struct op *o = NULL;
    if (!LOAD(g_initialized)) {
        rc = CUDA_ERROR_NOT_INITIALIZED;
        goto out;
    }
    if (!t_ctx) {
        rc = CUDA_ERROR_INVALID_CONTEXT;
        goto out;
    }
    if (is_null_stream(h)) { /* the real driver rejects the NULL/legacy stream */
        rc = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    if (count == 0 || !dsts || !srcs || !sizes || numAttrs == 0 || !attrs || !attrsIdxs || numAttrs > count ||
        attrsIdxs[0] != 0) {
        rc = CUDA_ERROR_INVALID_VALUE;
        goto out;
    }
    for (size_t i = 0; i < numAttrs; i++) {
        if ((i > 0 && attrsIdxs[i] <= attrsIdxs[i - 1]) || attrsIdxs[i] >= count ||
            attrs[i].srcAccessOrder < 1 || attrs[i].srcAccessOrder > 3) {
            rc = CUDA_ERROR_INVALID_VALUE;
            goto out;
        }
    }
    if ((rc = stream_resolve(h, &s)) != CUDA_SUCCESS)
        goto out;
    if (!(o = op_new(OP_COPY, count))) {
        rc = CUDA_ERROR_OUT_OF_MEMORY;
        goto out;
    }
    pthread_rwlock_rdlock(&g_rlock);
    for (size_t i = 0; i < count && rc == CUDA_SUCCESS; i++) {
        struct seg *g = &o->segs[i];
        g->dst = (uintptr_t)dsts[i];
        g->src = (uintptr_t)srcs[i];
        g->n = sizes[i];
        if (g->n != 0 && (classify_side(g->dst, g->n, SIDE_UNIFIED, &g->dst_dev) ||
                          classify_side(g->src, g->n, SIDE_UNIFIED, &g->src_dev))) {
            rc = CUDA_ERROR_INVALID_VALUE;
            fail = i;
        }
    }
    pthread_rwlock_unlock(&g_rlock);
    if (rc == CUDA_SUCCESS) {
        /* A host side must not span two separately pinned regions (as with the real driver). */
        pthread_mutex_lock(&g_pin_mu);
        for (size_t i = 0; i < count && rc == CUDA_SUCCESS; i++) {
            struct seg *g = &o->segs[i];
            if (g->n != 0 && ((!g->dst_dev && pin_count_overlapping(g->dst, g->n) > 1) ||
                              (!g->src_dev && pin_count_overlapping(g->src, g->n) > 1))) {
                rc = CUDA_ERROR_INVALID_VALUE;
                fail = i;
            }
        }
        pthread_mutex_unlock(&g_pin_mu);
    }
    if (rc == CUDA_SUCCESS) {
        rc = stream_enqueue(s, o); /* all copies as one stream operation */
        o = NULL;
    }
out:
    free(o);
    if (s)
        stream_put(s);
    if (rc == CUDA_SUCCESS)
        ADD(c_batch_calls, 1);
    else if (failIdx)
        *failIdx = fail;
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Events                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

static void event_publish(struct fc_event *e)
{
    pthread_mutex_lock(&g_events_mu);
    e->next = g_events;
    g_events = e;
    pthread_mutex_unlock(&g_events_mu);
    ADD(c_events, 1);
}

static int do_event_create(CUevent *out, unsigned flags)
{
    NEED_CTX();
    if (!out || (flags & ~7u))
        return CUDA_ERROR_INVALID_VALUE;
    if ((flags & CU_EVENT_INTERPROCESS) && !(flags & CU_EVENT_DISABLE_TIMING))
        return CUDA_ERROR_INVALID_VALUE;
    struct fc_event *e = calloc(1, sizeof *e);
    if (!e)
        return CUDA_ERROR_OUT_OF_MEMORY;
    e->magic = EVENT_MAGIC;
    e->flags = flags;
    e->owner = 1;
    e->refs = 1;
    e->pid = getpid();
    if (flags & CU_EVENT_INTERPROCESS) {
        /* The counters live in a shm object so another process can open the event. */
        snprintf(e->name, sizeof e->name, "/fakecuda-ev-%d-%llu", (int)e->pid, (unsigned long long)ADD(g_seq, 1));
        int fd = shm_open(e->name, O_CREAT | O_EXCL | O_RDWR, 0600);
        void *p = MAP_FAILED;
        if (fd >= 0) {
            if (ftruncate(fd, EV_SHM_SIZE) == 0)
                p = mmap(NULL, EV_SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            close(fd);
            if (p == MAP_FAILED)
                shm_unlink(e->name);
        }
        if (p == MAP_FAILED) {
            free(e);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        e->ipc = 1;
        e->st = p;
    } else {
        e->st = calloc(1, sizeof *e->st);
        if (!e->st) {
            free(e);
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    event_publish(e);
    *out = e;
    return CUDA_SUCCESS;
}

static int do_event_destroy(CUevent h)
{
    NEED_CTX();
    struct fc_event *e = NULL;
    pthread_mutex_lock(&g_events_mu);
    for (struct fc_event **pp = &g_events; *pp; pp = &(*pp)->next)
        if (*pp == h) {
            e = *pp;
            *pp = e->next;
            break;
        }
    pthread_mutex_unlock(&g_events_mu);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    if (e->ipc && e->owner)
        shm_unlink(e->name); /* processes that opened it keep their mapping */
    ADD(c_events, -1);
    event_put(e); /* queued operations that still use it hold references */
    return CUDA_SUCCESS;
}

static int do_event_record(CUevent h, CUstream hs)
{
    NEED_CTX();
    struct fc_event *e = event_get(h);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fc_stream *s;
    int rc = stream_resolve(hs, &s);
    if (rc) {
        event_put(e);
        return rc;
    }
    struct op *o = op_new(OP_SIGNAL, 0);
    if (!o) {
        event_put(e);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        o->ev = e; /* the op owns our reference */
        o->value = __atomic_add_fetch(&e->st->recorded, 1, __ATOMIC_ACQ_REL);
        rc = submit(s, o);
    }
    if (s)
        stream_put(s);
    return rc;
}

static int do_event_query(CUevent h)
{
    NEED_CTX();
    struct fc_event *e = event_get(h);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    uint64_t rec = __atomic_load_n(&e->st->recorded, __ATOMIC_ACQUIRE);
    int rc = __atomic_load_n(&e->st->completed, __ATOMIC_ACQUIRE) >= rec ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
    event_put(e);
    return rc;
}

static int do_event_sync(CUevent h)
{
    NEED_CTX();
    struct fc_event *e = event_get(h);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    event_wait(e->st, __atomic_load_n(&e->st->recorded, __ATOMIC_ACQUIRE));
    event_put(e);
    return CUDA_SUCCESS;
}

static int do_stream_wait_event(CUstream hs, CUevent h, unsigned flags)
{
    NEED_CTX();
    if (flags & ~1u) /* CU_EVENT_WAIT_DEFAULT = 0, CU_EVENT_WAIT_EXTERNAL = 1 */
        return CUDA_ERROR_INVALID_VALUE;
    struct fc_event *e = event_get(h);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fc_stream *s;
    int rc = stream_resolve(hs, &s);
    if (rc) {
        event_put(e);
        return rc;
    }
    struct op *o = op_new(OP_WAIT, 0);
    if (!o) {
        event_put(e);
        rc = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        o->ev = e;
        o->value = __atomic_load_n(&e->st->recorded, __ATOMIC_ACQUIRE); /* the record current at this call */
        rc = submit(s, o);
    }
    if (s)
        stream_put(s);
    if (rc == CUDA_SUCCESS)
        ADD(c_stream_waits, 1);
    return rc;
}

static int do_ipc_get_event_handle(CUipcEventHandle *h, CUevent ev)
{
    NEED_CTX();
    if (!h)
        return CUDA_ERROR_INVALID_VALUE;
    struct fc_event *e = event_get(ev);
    if (!e)
        return CUDA_ERROR_INVALID_HANDLE;
    int rc = CUDA_SUCCESS;
    if (!e->ipc) {
        rc = CUDA_ERROR_INVALID_VALUE;
    } else {
        struct ipc_event_wire w;
        memset(&w, 0, sizeof w);
        w.magic = IPC_EVENT_MAGIC;
        w.pid = (int32_t)e->pid;
        snprintf(w.name, sizeof w.name, "%s", e->name);
        memcpy(h, &w, sizeof w);
    }
    event_put(e);
    return rc;
}

static int do_ipc_open_event_handle(CUevent *out, CUipcEventHandle h)
{
    NEED_CTX();
    if (!out)
        return CUDA_ERROR_INVALID_VALUE;
    struct ipc_event_wire w;
    memcpy(&w, &h, sizeof w);
    if (w.magic != IPC_EVENT_MAGIC || memchr(w.name, 0, sizeof w.name) == NULL ||
        strlen(w.name) >= NAME_LEN)
        return CUDA_ERROR_INVALID_HANDLE;
    int fd = shm_open(w.name, O_RDWR, 0);
    if (fd < 0)
        return CUDA_ERROR_INVALID_HANDLE;
    struct stat st;
    void *p = MAP_FAILED;
    if (fstat(fd, &st) == 0 && st.st_size >= EV_SHM_SIZE)
        p = mmap(NULL, EV_SHM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
        return CUDA_ERROR_INVALID_HANDLE;
    struct fc_event *e = calloc(1, sizeof *e);
    if (!e) {
        munmap(p, EV_SHM_SIZE);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    e->magic = EVENT_MAGIC;
    e->flags = CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS;
    e->st = p;
    e->ipc = 1;
    e->owner = 0;
    e->refs = 1;
    e->pid = (pid_t)w.pid;
    memcpy(e->name, w.name, strlen(w.name) + 1); /* length checked above */
    event_publish(e);
    *out = e;
    return CUDA_SUCCESS;
}

/* ------------------------------------------------------------------------------------------------ */
/* cuGetProcAddress                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

EXPORT CUresult cuMemcpyBatchAsync(CUdeviceptr *, CUdeviceptr *, size_t *, size_t, CUmemcpyAttributes *, size_t *,
                                   size_t, size_t *, CUstream);
EXPORT CUresult cuMemcpyBatchAsync_v2(CUdeviceptr *, CUdeviceptr *, size_t *, size_t, CUmemcpyAttributes *,
                                      size_t *, size_t, CUstream);
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *, CUdevice);

/* A symbol of this library (not of a dependency such as libc). */
static void *self_symbol(const char *name)
{
    if (!g_self || strncmp(name, "cu", 2) != 0)
        return NULL;
    void *f = dlsym(g_self, name);
    Dl_info info;
    if (!f || !dladdr(f, &info) || info.dli_fbase != g_self_base)
        return NULL;
    return f;
}

static int do_get_proc_address(const char *sym, void **pfn, int cuda_version, cuuint64_t flags, int *status)
{
    (void)flags;
    /* Like the real driver this works before cuInit (it is how cuInit itself is looked up). */
    if (!sym || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    int st = PROC_SUCCESS;
    if (strcmp(sym, "cuMemcpyBatchAsync") == 0) {
        if (!LOAD(g_batch_available))
            st = PROC_SYMBOL_NOT_FOUND;
        else if (cuda_version >= 13000)
            *pfn = (void *)cuMemcpyBatchAsync_v2;
        else if (cuda_version >= 12080)
            *pfn = (void *)cuMemcpyBatchAsync;
        else
            st = PROC_VERSION_NOT_SUFFICIENT;
    } else if (strcmp(sym, "cuDeviceGetUuid") == 0) {
        *pfn = (void *)cuDeviceGetUuid_v2;
    } else {
        /* The plain name, else its _v2 (e.g. "cuMemAlloc" -> cuMemAlloc_v2, as the driver maps it). */
        *pfn = self_symbol(sym);
        if (!*pfn && strlen(sym) < 120) {
            char v2[128];
            snprintf(v2, sizeof v2, "%s_v2", sym);
            *pfn = self_symbol(v2);
        }
        if (!*pfn)
            st = PROC_SYMBOL_NOT_FOUND;
    }
    if (status)
        *status = st;
    return *pfn ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

/* ------------------------------------------------------------------------------------------------ */
/* Exported driver entry points (names and signatures of libcuda.so.1)                               */
/* ------------------------------------------------------------------------------------------------ */

EXPORT CUresult cuInit(unsigned int flags) { API(do_init(flags)); }
EXPORT CUresult cuDriverGetVersion(int *v) { API(do_driver_version(v)); }
EXPORT CUresult cuGetErrorName(CUresult e, const char **p) { API(do_error_text(e, p, 1)); }
EXPORT CUresult cuGetErrorString(CUresult e, const char **p) { API(do_error_text(e, p, 0)); }
EXPORT CUresult cuGetProcAddress_v2(const char *sym, void **pfn, int ver, cuuint64_t flags, int *status)
{
    API(do_get_proc_address(sym, pfn, ver, flags, status));
}

EXPORT CUresult cuDeviceGetCount(int *n) { API(do_device_count(n)); }
EXPORT CUresult cuDeviceGet(CUdevice *d, int ordinal) { API(do_device_get(d, ordinal)); }
EXPORT CUresult cuDeviceGetUuid(CUuuid *u, CUdevice d) { API(do_device_uuid(u, d)); }
EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *u, CUdevice d) { API(do_device_uuid(u, d)); }
EXPORT CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) { API(do_device_attribute(v, attr, d)); }
EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice d) { API(do_device_name(name, len, d)); }
EXPORT CUresult cuDeviceGetPCIBusId(char *s, int len, CUdevice d) { API(do_device_pci_bus_id(s, len, d)); }

EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { API(do_primary_retain(c, d)); }
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { API(do_primary_release(d)); }
EXPORT CUresult cuCtxSetCurrent(CUcontext c) { API(do_ctx_set(c)); }
EXPORT CUresult cuCtxGetCurrent(CUcontext *c) { API(do_ctx_get(c)); }
EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c) { API(do_ctx_push(c)); }
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *c) { API(do_ctx_pop(c)); }
EXPORT CUresult cuCtxGetDevice(CUdevice *d) { API(do_ctx_device(d)); }
EXPORT CUresult cuCtxSynchronize(void) { API(do_ctx_sync()); }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { API(do_mem_alloc(p, n)); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { API(do_mem_free(p)); }
EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr p)
{
    API(do_address_range(base, size, p));
}
EXPORT CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) { API(do_pointer_attribute(data, attr, p)); }

EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle *h, CUdeviceptr p) { API(do_ipc_get_mem_handle(h, p)); }
EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *p, CUipcMemHandle h, unsigned int flags)
{
    API(do_ipc_open_mem_handle(p, h, flags));
}
EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr p) { API(do_ipc_close_mem_handle(p)); }
EXPORT CUresult cuIpcGetEventHandle(CUipcEventHandle *h, CUevent e) { API(do_ipc_get_event_handle(h, e)); }
EXPORT CUresult cuIpcOpenEventHandle(CUevent *e, CUipcEventHandle h) { API(do_ipc_open_event_handle(e, h)); }

EXPORT CUresult cuMemHostAlloc(void **pp, size_t n, unsigned int flags) { API(do_host_alloc(pp, n, flags)); }
EXPORT CUresult cuMemFreeHost(void *p) { API(do_free_host(p)); }
EXPORT CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned int flags) { API(do_host_register(p, n, flags)); }
EXPORT CUresult cuMemHostUnregister(void *p) { API(do_host_unregister(p)); }
EXPORT CUresult cuMemHostGetDevicePointer_v2(CUdeviceptr *d, void *p, unsigned int flags)
{
    API(do_host_device_pointer(d, p, flags));
}

EXPORT CUresult cuStreamCreate(CUstream *s, unsigned int flags) { API(do_stream_create(s, flags)); }
EXPORT CUresult cuStreamCreateWithPriority(CUstream *s, unsigned int flags, int priority)
{
    (void)priority; /* priorities are not simulated */
    API(do_stream_create(s, flags));
}
EXPORT CUresult cuStreamDestroy_v2(CUstream s) { API(do_stream_destroy(s)); }
EXPORT CUresult cuStreamSynchronize(CUstream s) { API(do_stream_sync(s)); }
EXPORT CUresult cuStreamQuery(CUstream s) { API(do_stream_query(s)); }
EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) { API(do_stream_wait_event(s, e, flags)); }

EXPORT CUresult cuEventCreate(CUevent *e, unsigned int flags) { API(do_event_create(e, flags)); }
EXPORT CUresult cuEventDestroy_v2(CUevent e) { API(do_event_destroy(e)); }
EXPORT CUresult cuEventRecord(CUevent e, CUstream s) { API(do_event_record(e, s)); }
EXPORT CUresult cuEventQuery(CUevent e) { API(do_event_query(e)); }
EXPORT CUresult cuEventSynchronize(CUevent e) { API(do_event_sync(e)); }

EXPORT CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s)
{
    API(do_copy((uintptr_t)dst, (uintptr_t)src, n, SIDE_HOST, SIDE_DEVICE, s));
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s)
{
    API(do_copy((uintptr_t)dst, (uintptr_t)src, n, SIDE_DEVICE, SIDE_HOST, s));
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)
{
    API(do_copy((uintptr_t)dst, (uintptr_t)src, n, SIDE_DEVICE, SIDE_DEVICE, s));
}
EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s)
{
    API(do_copy((uintptr_t)dst, (uintptr_t)src, n, SIDE_UNIFIED, SIDE_UNIFIED, s));
}
EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dctx, CUdeviceptr src, CUcontext sctx, size_t n,
                                  CUstream s)
{
    API(do_peer_copy(dst, dctx, src, sctx, n, s));
}

/* 12.8 ABI (with failIdx) under the plain name, 13.0 ABI under _v2, as a 13.x driver exports them. */
EXPORT CUresult cuMemcpyBatchAsync(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                                   CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, size_t *failIdx,
                                   CUstream s)
{
    API(do_batch(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, failIdx, s));
}
EXPORT CUresult cuMemcpyBatchAsync_v2(CUdeviceptr *dsts, CUdeviceptr *srcs, size_t *sizes, size_t count,
                                      CUmemcpyAttributes *attrs, size_t *attrsIdxs, size_t numAttrs, CUstream s)
{
    API(do_batch(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, NULL, s));
}

/* ------------------------------------------------------------------------------------------------ */
/* Control API for tests                                                                             */
/* ------------------------------------------------------------------------------------------------ */

EXPORT int fakecuda_inject(const char *symbol, int result, int skip, int count)
{
    return inject_set(symbol, result, skip, count);
}

static void load_control_defaults(void)
{
    g_default_copy_delay_us = (int)env_ll("FAKECUDA_COPY_DELAY_US", 0);
    g_default_batch_available = env_ll("FAKECUDA_NO_BATCH", 0) ? 0 : 1;
    g_default_pin_limit = env_ll("FAKECUDA_PIN_LIMIT", -1);
}

/* Clears injections and restores the controls to their start-up values (from the environment). */
EXPORT void fakecuda_reset(void)
{
    pthread_mutex_lock(&g_inj_mu);
    for (int i = 0; i < MAX_INJECT; i++)
        if (g_inj[i].used)
            inject_drop(&g_inj[i]);
    pthread_mutex_unlock(&g_inj_mu);
    STORE(g_copy_delay_us, g_default_copy_delay_us);
    STORE(g_batch_available, g_default_batch_available);
    STORE(g_pin_limit, g_default_pin_limit);
}

EXPORT long long fakecuda_counter(const char *name)
{
    static const struct {
        const char *name;
        long long *v;
    } k[] = {
        {"ipc_opens", &c_ipc_opens},       {"ipc_closes", &c_ipc_closes},     {"open_mappings", &c_open_mappings},
        {"pinned_bytes", &c_pinned_bytes}, {"batch_calls", &c_batch_calls},   {"copy_calls", &c_copy_calls},
        {"stream_waits", &c_stream_waits}, {"streams", &c_streams},           {"events", &c_events},
        {"device_allocs", &c_device_allocs},
    };
    for (size_t i = 0; name && i < sizeof k / sizeof k[0]; i++)
        if (strcmp(name, k[i].name) == 0)
            return LOAD(*k[i].v);
    return -1;
}

EXPORT void fakecuda_set_copy_delay_us(int us) { STORE(g_copy_delay_us, us < 0 ? 0 : us); }
EXPORT void fakecuda_set_batch_available(int on) { STORE(g_batch_available, on ? 1 : 0); }
EXPORT void fakecuda_set_pin_limit(long long bytes) { STORE(g_pin_limit, bytes < 0 ? -1 : bytes); }

EXPORT int fakecuda_mark_vmm(unsigned long long dptr)
{
    pthread_rwlock_wrlock(&g_rlock);
    struct range *r = range_containing((uintptr_t)dptr);
    int rc = 1;
    if (r && r->kind == R_OWN) {
        r->vmm = 1;
        rc = 0;
    }
    pthread_rwlock_unlock(&g_rlock);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Load and exit                                                                                     */
/* ------------------------------------------------------------------------------------------------ */

__attribute__((constructor)) static void fakecuda_load(void)
{
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&g_rlock, &a);
    pthread_rwlockattr_destroy(&a);

    g_version = (int)env_ll("FAKECUDA_VERSION", 13000);
    load_control_defaults();
    fakecuda_reset();
    inject_parse_env();

    Dl_info info;
    if (dladdr((void *)fakecuda_load, &info) && info.dli_fname) {
        g_self_base = info.dli_fbase;
        g_self = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    }
}

/* Unlinks the shm objects this process created (a process killed with SIGKILL leaves them behind).
 * Mappings stay valid in processes that opened them. */
__attribute__((destructor)) static void fakecuda_unload(void)
{
    pid_t me = getpid();
    pthread_rwlock_rdlock(&g_rlock);
    for (struct range *r = g_ranges; r; r = r->next)
        if (r->kind == R_OWN && r->pid == me)
            shm_unlink(r->name);
    pthread_rwlock_unlock(&g_rlock);
    pthread_mutex_lock(&g_events_mu);
    for (struct fc_event *e = g_events; e; e = e->next)
        if (e->ipc && e->owner && e->pid == me)
            shm_unlink(e->name);
    pthread_mutex_unlock(&g_events_mu);
}
