/* A fake of wintun.dll (0.14.1 exports) and of the four kernel32 waits the
 * binding uses, for driving client/wintun.py on Linux. It plays the OS side:
 * the test injects packets into the receive ring and takes what the binding
 * sent out of the send ring. Rings keep WinTun's layout rules: packets are a
 * 4-byte size then data, 4-byte aligned, never split (a trailing area past the
 * capacity holds a packet that runs over the end), offsets wrap at the capacity.
 * Errors are reported as Windows error codes in errno, which ctypes captures as
 * it captures GetLastError() on Windows. Written for these tests only. */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ERROR_FILE_NOT_FOUND 2
#define ERROR_HANDLE_EOF 38
#define ERROR_INVALID_PARAMETER 87
#define ERROR_BUFFER_OVERFLOW 111
#define ERROR_NO_MORE_ITEMS 259
#define MIN_RING 0x20000u
#define MAX_RING 0x4000000u
#define TRAILING 0x10000u
#define MAX_ADAPTERS 8
#define WAIT_TIMEOUT 258u
#define INFINITE 0xFFFFFFFFu

typedef void (*logger_fn)(int level, uint64_t timestamp, const uint16_t *message);

/* ---- events (kernel32 stand-ins) ---- */
typedef struct { int signaled, manual; } event_t;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;

void *CreateEventW(void *attributes, int manual_reset, int initial, void *name) {
    (void)attributes; (void)name;
    event_t *event = calloc(1, sizeof *event);
    event->manual = manual_reset;
    event->signaled = initial;
    return event;
}

static void signal_locked(event_t *event) {
    event->signaled = 1;
    pthread_cond_broadcast(&changed);
}

int SetEvent(void *handle) {
    pthread_mutex_lock(&lock);
    signal_locked(handle);
    pthread_mutex_unlock(&lock);
    return 1;
}

uint32_t WaitForMultipleObjects(uint32_t count, void **handles, int wait_all, uint32_t ms) {
    (void)wait_all;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&lock);
    for (;;) {
        for (uint32_t i = 0; i < count; i++) {
            event_t *event = handles[i];
            if (event->signaled) {
                if (!event->manual) event->signaled = 0;
                pthread_mutex_unlock(&lock);
                return i;
            }
        }
        if (ms == INFINITE) pthread_cond_wait(&changed, &lock);
        else if (pthread_cond_timedwait(&changed, &lock, &deadline)) {
            pthread_mutex_unlock(&lock);
            return WAIT_TIMEOUT;
        }
    }
}

int CloseHandle(void *handle) { free(handle); return 1; }

/* ---- adapters ---- */
typedef struct {
    int used;
    uint16_t name[128];
    uint8_t guid[16];
    uint64_t luid;
} adapter_t;
typedef struct { adapter_t *adapter; int created; } adapter_handle_t;

static adapter_t adapters[MAX_ADAPTERS];
static logger_fn logger;
static char fail_function[64];
static int fail_code;
static int creates, opens, closes_removed;

/* The Windows error code to fail `function` with this time, or 0. */
static int should_fail(const char *function) {
    int code = 0;
    if (fail_code && strcmp(function, fail_function) == 0) {
        code = fail_code;
        fail_code = 0;
    }
    return code;
}

static void log_ascii(int level, const char *text) {
    uint16_t message[256];
    size_t i = 0;
    for (; text[i] && i < 255; i++) message[i] = (uint8_t)text[i];
    message[i] = 0;
    if (logger) logger(level, 132000000000000000ull, message);
}

static int wide_equal(const uint16_t *a, const uint16_t *b) {
    while (*a && *a == *b) { a++; b++; }
    return *a == *b;
}

void WintunSetLogger(logger_fn new_logger) { logger = new_logger; }

void *WintunCreateAdapter(const uint16_t *name, const uint16_t *type, const uint8_t *guid) {
    (void)type;
    int code = should_fail("WintunCreateAdapter");
    if (code) {
        log_ascii(2, "Failed to create adapter");  /* logs first, as WinTun does */
        errno = code;
        return NULL;
    }
    for (int i = 0; i < MAX_ADAPTERS; i++) {
        if (adapters[i].used) continue;
        adapter_t *adapter = &adapters[i];
        adapter->used = 1;
        size_t n = 0;
        while (name[n] && n < 127) { adapter->name[n] = name[n]; n++; }
        adapter->name[n] = 0;
        if (guid) memcpy(adapter->guid, guid, 16);
        adapter->luid = (0x6ull << 48) | ((uint64_t)(i + 1) << 24);  /* IF_TYPE_PROP_VIRTUAL-ish */
        creates++;
        log_ascii(0, "Creating adapter");
        adapter_handle_t *handle = calloc(1, sizeof *handle);
        handle->adapter = adapter;
        handle->created = 1;
        return handle;
    }
    errno = ERROR_INVALID_PARAMETER;
    return NULL;
}

void *WintunOpenAdapter(const uint16_t *name) {
    for (int i = 0; i < MAX_ADAPTERS; i++) {
        if (adapters[i].used && wide_equal(adapters[i].name, name)) {
            adapter_handle_t *handle = calloc(1, sizeof *handle);
            handle->adapter = &adapters[i];
            opens++;
            return handle;
        }
    }
    errno = ERROR_FILE_NOT_FOUND;
    return NULL;
}

void WintunCloseAdapter(void *handle) {
    adapter_handle_t *h = handle;
    if (!h) return;
    if (h->created) { memset(h->adapter, 0, sizeof *h->adapter); closes_removed++; }
    free(h);
}

int WintunDeleteDriver(void) {
    for (int i = 0; i < MAX_ADAPTERS; i++)
        if (adapters[i].used) { errno = 5; return 0; }  /* ERROR_ACCESS_DENIED: in use */
    return 1;
}

void WintunGetAdapterLUID(void *handle, uint64_t *luid) {
    *luid = ((adapter_handle_t *)handle)->adapter->luid;
}

uint32_t WintunGetRunningDriverVersion(void) { return (0u << 16) | 14u; }

/* ---- rings and sessions ---- */
typedef struct {
    uint32_t capacity, head, tail, reserved;  /* reserved: allocated, not yet sent */
    uint32_t wraps;
    uint8_t *data;
} ring_t;
typedef struct {
    ring_t receive, send;   /* receive: OS -> client; send: client -> OS */
    uint32_t receive_cursor;  /* next packet ReceivePacket hands out */
    int outstanding;          /* received, not yet released */
    int ended;
    event_t *read_event;
} session_t;

static session_t *current;

static uint32_t align4(uint32_t n) { return (n + 3u) & ~3u; }
static uint32_t used(const ring_t *r, uint32_t tail) { return (tail - r->head) & (r->capacity - 1); }
static uint32_t advance(ring_t *r, uint32_t at, uint32_t n) {
    uint32_t next = (at + n) & (r->capacity - 1);
    if (next < at) r->wraps++;
    return next;
}

/* Room for a packet of `size` at the ring's write end, or -1. One byte stays free
 * so that head == tail means empty. */
static int reserve(ring_t *r, uint32_t at, uint32_t size) {
    uint32_t need = 4 + align4(size);
    if (used(r, at) + need >= r->capacity) return -1;
    return (int)at;
}

void *WintunStartSession(void *adapter, uint32_t capacity) {
    (void)adapter;
    int code = should_fail("WintunStartSession");
    if (code) { errno = code; return NULL; }
    if (capacity < MIN_RING || capacity > MAX_RING || (capacity & (capacity - 1))) {
        errno = ERROR_INVALID_PARAMETER;
        return NULL;
    }
    session_t *s = calloc(1, sizeof *s);
    s->receive.capacity = s->send.capacity = capacity;
    s->receive.data = calloc(1, capacity + TRAILING + 4);
    s->send.data = calloc(1, capacity + TRAILING + 4);
    s->read_event = CreateEventW(NULL, 0, 0, NULL);  /* auto-reset, as WinTun's */
    current = s;
    return s;
}

void WintunEndSession(void *session) {
    session_t *s = session;
    if (current == s) current = NULL;
    free(s->receive.data);
    free(s->send.data);
    free(s->read_event);
    free(s);
}

void *WintunGetReadWaitEvent(void *session) { return ((session_t *)session)->read_event; }

uint8_t *WintunReceivePacket(void *session, uint32_t *size) {
    session_t *s = session;
    pthread_mutex_lock(&lock);
    if (s->ended) { pthread_mutex_unlock(&lock); errno = ERROR_HANDLE_EOF; return NULL; }
    ring_t *r = &s->receive;
    if (s->receive_cursor == r->tail) {
        pthread_mutex_unlock(&lock);
        errno = ERROR_NO_MORE_ITEMS;
        return NULL;
    }
    uint8_t *at = r->data + s->receive_cursor;
    memcpy(size, at, 4);
    s->receive_cursor = advance(r, s->receive_cursor, 4 + align4(*size));
    s->outstanding++;
    pthread_mutex_unlock(&lock);
    return at + 4;
}

void WintunReleaseReceivePacket(void *session, const uint8_t *packet) {
    session_t *s = session;
    pthread_mutex_lock(&lock);
    ring_t *r = &s->receive;
    uint32_t size;
    memcpy(&size, packet - 4, 4);
    /* Released in order (the binding releases each before the next receive). */
    r->head = advance(r, r->head, 4 + align4(size));
    s->outstanding--;
    pthread_mutex_unlock(&lock);
}

uint8_t *WintunAllocateSendPacket(void *session, uint32_t size) {
    session_t *s = session;
    pthread_mutex_lock(&lock);
    if (s->ended) { pthread_mutex_unlock(&lock); errno = ERROR_HANDLE_EOF; return NULL; }
    ring_t *r = &s->send;
    int at = size > 0xFFFF ? -1 : reserve(r, r->reserved, size);
    if (at < 0) {
        pthread_mutex_unlock(&lock);
        errno = size > 0xFFFF ? ERROR_INVALID_PARAMETER : ERROR_BUFFER_OVERFLOW;
        return NULL;
    }
    uint32_t header = size | 0x80000000u;  /* high bit: allocated, not yet sent */
    memcpy(r->data + at, &header, 4);
    r->reserved = advance(r, r->reserved, 4 + align4(size));
    pthread_mutex_unlock(&lock);
    return r->data + at + 4;
}

void WintunSendPacket(void *session, const uint8_t *packet) {
    session_t *s = session;
    pthread_mutex_lock(&lock);
    ring_t *r = &s->send;
    uint32_t header;
    memcpy(&header, packet - 4, 4);
    header &= 0x7FFFFFFFu;
    memcpy((uint8_t *)packet - 4, &header, 4);
    /* Publish every leading packet that is sent (they may be sent out of order). */
    while (r->tail != r->reserved) {
        memcpy(&header, r->data + r->tail, 4);
        if (header & 0x80000000u) break;
        r->tail = advance(r, r->tail, 4 + align4(header));
    }
    pthread_mutex_unlock(&lock);
}

/* ---- the OS side, driven by the test ---- */
int FakeInjectPacket(const uint8_t *packet, uint32_t size) {
    session_t *s = current;
    if (!s) return -1;
    pthread_mutex_lock(&lock);
    ring_t *r = &s->receive;
    int at = reserve(r, r->tail, size);
    if (at < 0) { pthread_mutex_unlock(&lock); return 0; }  /* full: the OS drops it */
    memcpy(r->data + at, &size, 4);
    memcpy(r->data + at + 4, packet, size);
    r->tail = advance(r, r->tail, 4 + align4(size));
    signal_locked(s->read_event);
    pthread_mutex_unlock(&lock);
    return 1;
}

/* Copies the next packet the client sent into `out`; returns its size, or -1. */
int FakeTakeSentPacket(uint8_t *out, uint32_t room) {
    session_t *s = current;
    if (!s) return -1;
    pthread_mutex_lock(&lock);
    ring_t *r = &s->send;
    if (r->head == r->tail) { pthread_mutex_unlock(&lock); return -1; }
    uint32_t size;
    memcpy(&size, r->data + r->head, 4);
    if (size > room) { pthread_mutex_unlock(&lock); return -2; }
    memcpy(out, r->data + r->head + 4, size);
    r->head = advance(r, r->head, 4 + align4(size));
    pthread_mutex_unlock(&lock);
    return (int)size;
}

void FakeEndSession(void) {  /* the adapter vanished under the session */
    session_t *s = current;
    pthread_mutex_lock(&lock);
    s->ended = 1;
    signal_locked(s->read_event);
    pthread_mutex_unlock(&lock);
}

void FakeFailNext(const char *function, int code) {
    strncpy(fail_function, function, sizeof fail_function - 1);
    fail_code = code;
}

int FakeOutstandingReceives(void) { return current ? current->outstanding : -1; }
uint32_t FakeReceiveWraps(void) { return current ? current->receive.wraps : 0; }
uint32_t FakeSendWraps(void) { return current ? current->send.wraps : 0; }
int FakeCreates(void) { return creates; }
int FakeOpens(void) { return opens; }
int FakeRemoved(void) { return closes_removed; }
int FakeAdapterGuid(const uint16_t *name, uint8_t *out) {
    for (int i = 0; i < MAX_ADAPTERS; i++)
        if (adapters[i].used && wide_equal(adapters[i].name, name)) {
            memcpy(out, adapters[i].guid, 16);
            return 1;
        }
    return 0;
}
uint64_t FakeAdapterLuid(const uint16_t *name) {
    for (int i = 0; i < MAX_ADAPTERS; i++)
        if (adapters[i].used && wide_equal(adapters[i].name, name)) return adapters[i].luid;
    return 0;
}
