/*
 * An LD_PRELOAD shim for the fault tests: makes the disk and the clock misbehave on command.
 *
 * The test maps the same control file (path in EPS_SHIM_CTL) and writes to it; the shim reads it on
 * every intercepted call, so faults are armed and disarmed while the process runs. Layout (native
 * endianness, see tests/common/shim.rs):
 *
 *   0  int64  realtime_offset_ms   added to CLOCK_REALTIME (and _COARSE): a wall clock that steps
 *   8  int32  fail_fdatasync       the next N matching fdatasync calls fail with EIO
 *  12  int32  fail_fsync           the next N matching fsync calls fail with EIO
 *  16  int32  fail_pwrite          the next N matching pwrite calls write half and then fail (ENOSPC)
 *  20  int32  stall_sync_ms        each matching fsync/fdatasync sleeps this long first
 *  24  int32  syncs_seen           count of matching fsync/fdatasync calls (written by the shim)
 *  28  int32  stalled_now          1 while a matching sync is stalled (written by the shim)
 *  32  int32  fail_rename          the next N matching renames fail with EIO
 *  36  int32  count_syncs          when 1, syncs_seen counts matching syncs even with no fault armed
 *  40  int32  stall_partial_write_ms  each matching pwrite writes a part of its bytes (never ending in a
 *                                  newline, so the file's last line is torn), sets stalled_now and sleeps
 *                                  this long, then writes the rest: a SIGKILL meanwhile leaves a torn tail
 *  44  int32  fail_create          the next N opens with O_CREAT of a matching path fail with ENOSPC
 *  48  int32  fail_write           the next N matching write(2) calls write half and then fail (ENOSPC), as
 *                                  fail_pwrite does for pwrite (for files written with write, such as the
 *                                  dead-letter file of versions that appended to it)
 *  52  int32  stall_read_ms        each matching read(2) or pread(2) sleeps this long first (stalled_now is 1 meanwhile):
 *                                  a slow disk under a start-up that reads the log
 *  64  char[64] filter             only fds whose path contains this text are affected ("" = all)
 *
 * "Matching" means the file descriptor's path (from /proc/self/fd) contains the filter (a filter ending
 * in '$' must end the path). The path is
 * only looked up while something is armed, so an idle shim costs one load per call. With
 * EPS_SHIM_TRACE set to a file, every fsync and fdatasync appends "fsync|fdatasync <path>" to it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct ctl {
    int64_t realtime_offset_ms;
    int32_t fail_fdatasync;
    int32_t fail_fsync;
    int32_t fail_pwrite;
    int32_t stall_sync_ms;
    int32_t syncs_seen;
    int32_t stalled_now;
    int32_t fail_rename;
    int32_t count_syncs;
    int32_t stall_partial_write_ms;
    int32_t fail_create;
    int32_t fail_write;
    int32_t stall_read_ms;
    char pad[64 - 56];
    char filter[64];
};

static struct ctl *ctl;
static __thread int pwrite_fail_pending;
static __thread int write_fail_pending_fd = -1;
static int trace_fd = -1;

__attribute__((constructor)) static void shim_init(void) {
    const char *trace = getenv("EPS_SHIM_TRACE");
    if (trace) trace_fd = open(trace, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    const char *path = getenv("EPS_SHIM_CTL");
    if (!path) return;
    int fd = open(path, O_RDWR);
    if (fd < 0) return;
    void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED) ctl = p;
}

static int armed(void) {
    return ctl && (__atomic_load_n(&ctl->fail_fdatasync, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->fail_fsync, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->fail_pwrite, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->stall_sync_ms, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->fail_rename, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->count_syncs, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->fail_create, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->fail_write, __ATOMIC_SEQ_CST) > 0 ||
                   __atomic_load_n(&ctl->stall_partial_write_ms, __ATOMIC_SEQ_CST) > 0);
}

static void trace_sync(const char *what, int fd) {
    if (trace_fd < 0) return;
    char link[64], line[4200];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, line + 100, sizeof line - 102);
    if (n < 0) return;
    line[100 + n] = 0;
    int len = snprintf(line, 100, "%s ", what);
    memmove(line + len, line + 100, (size_t)n + 1);
    line[len + n] = '\n';
    ssize_t w = write(trace_fd, line, (size_t)(len + n + 1));
    (void)w;
}

static int path_matches(const char *path) {
    char filter[65];
    memcpy(filter, ctl->filter, 64);
    filter[64] = 0;
    size_t n = strlen(filter);
    if (n > 0 && filter[n - 1] == '$') {
        size_t len = strlen(path);
        return len >= n - 1 && memcmp(path + len - (n - 1), filter, n - 1) == 0;
    }
    return n == 0 || strstr(path, filter) != NULL;
}

static int fd_matches(int fd) {
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return path_matches(target);
}

/* Takes one from *counter if it is positive: true when this call must fail. */
static int take(int32_t *counter) {
    int32_t n = __atomic_load_n(counter, __ATOMIC_SEQ_CST);
    while (n > 0) {
        if (__atomic_compare_exchange_n(counter, &n, n - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return 1;
    }
    return 0;
}

static int sync_fault(int fd, int32_t *fail_counter) {
    if (!armed() || !fd_matches(fd)) return 0;
    __atomic_add_fetch(&ctl->syncs_seen, 1, __ATOMIC_SEQ_CST);
    int32_t stall = __atomic_load_n(&ctl->stall_sync_ms, __ATOMIC_SEQ_CST);
    if (stall > 0) {
        __atomic_store_n(&ctl->stalled_now, 1, __ATOMIC_SEQ_CST);
        struct timespec ts = {stall / 1000, (long)(stall % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        __atomic_store_n(&ctl->stalled_now, 0, __ATOMIC_SEQ_CST);
    }
    if (take(fail_counter)) {
        errno = EIO;
        return -1;
    }
    return 0;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    trace_sync("fdatasync", fd);
    if (sync_fault(fd, ctl ? &ctl->fail_fdatasync : NULL)) return -1;
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    trace_sync("fsync", fd);
    if (sync_fault(fd, ctl ? &ctl->fail_fsync : NULL)) return -1;
    return real(fd);
}

static ssize_t pwrite_common(ssize_t (*real)(int, const void *, size_t, off_t), int fd, const void *buf,
                             size_t count, off_t offset) {
    if (pwrite_fail_pending) {
        pwrite_fail_pending = 0;
        errno = ENOSPC;
        return -1;
    }
    int32_t partial_stall = ctl ? __atomic_load_n(&ctl->stall_partial_write_ms, __ATOMIC_SEQ_CST) : 0;
    if (partial_stall > 0 && count > 1 && fd_matches(fd)) {
        /* A write interrupted half-way: a prefix ending inside a line (neither at nor just before a
         * newline) lands, then a stall. */
        const char *bytes = buf;
        size_t part = count / 2;
        while (part > 1 && (bytes[part - 1] == '\n' || bytes[part] == '\n')) part--;
        ssize_t n = real(fd, buf, part, offset);
        if (n <= 0) return n;
        __atomic_store_n(&ctl->stalled_now, 1, __ATOMIC_SEQ_CST);
        struct timespec ts = {partial_stall / 1000, (long)(partial_stall % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        __atomic_store_n(&ctl->stalled_now, 0, __ATOMIC_SEQ_CST);
        ssize_t rest = real(fd, bytes + n, count - (size_t)n, offset + n);
        return rest < 0 ? n : n + rest;
    }
    if (armed() && count > 1 && fd_matches(fd) && take(&ctl->fail_pwrite)) {
        /* A full disk mid-write: half the bytes land, the rest is refused on the next call. */
        ssize_t n = real(fd, buf, count / 2, offset);
        if (n > 0) pwrite_fail_pending = 1;
        else errno = ENOSPC;
        return n > 0 ? n : -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite64");
    return pwrite_common(real, fd, buf, count, offset);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pwrite");
    return pwrite_common(real, fd, buf, count, offset);
}

/* The read stall, shared by read(2) and pread(2). */
static void stall_read(int fd) {
    int32_t stall = ctl ? __atomic_load_n(&ctl->stall_read_ms, __ATOMIC_SEQ_CST) : 0;
    if (stall > 0 && fd_matches(fd)) {
        __atomic_store_n(&ctl->stalled_now, 1, __ATOMIC_SEQ_CST);
        struct timespec ts = {stall / 1000, (long)(stall % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        __atomic_store_n(&ctl->stalled_now, 0, __ATOMIC_SEQ_CST);
    }
}

/* read(2): a slow disk. Only the stall's own load when nothing is armed; the path is looked up only then. */
ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "read");
    stall_read(fd);
    return real(fd, buf, count);
}

/* pread(2), as read(2) above: the log's start-up reads its segments with pread in 1 MiB chunks. */
ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread64");
    stall_read(fd);
    return real(fd, buf, count, offset);
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real) real = dlsym(RTLD_NEXT, "pread");
    stall_read(fd);
    return real(fd, buf, count, offset);
}

/* write(2): a full disk mid-write, as for pwrite; the refusal of the rest goes to the same fd only (other
 * writes of the thread, such as log lines to stderr, are untouched). */
ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real) real = dlsym(RTLD_NEXT, "write");
    if (write_fail_pending_fd >= 0 && write_fail_pending_fd == fd) {
        write_fail_pending_fd = -1;
        errno = ENOSPC;
        return -1;
    }
    if (armed() && count > 1 && fd_matches(fd) && take(&ctl->fail_write)) {
        ssize_t n = real(fd, buf, count / 2);
        if (n > 0) write_fail_pending_fd = fd;
        else errno = ENOSPC;
        return n > 0 ? n : -1;
    }
    return real(fd, buf, count);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = dlsym(RTLD_NEXT, "rename");
    if (armed() && path_matches(to) && take(&ctl->fail_rename)) {
        errno = EIO;
        return -1;
    }
    return real(from, to);
}

int clock_gettime(clockid_t clk, struct timespec *tp) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(clk, tp);
    if (r == 0 && ctl && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE)) {
        int64_t off = __atomic_load_n(&ctl->realtime_offset_ms, __ATOMIC_SEQ_CST);
        if (off) {
            int64_t ns = (int64_t)tp->tv_nsec + (off % 1000) * 1000000LL;
            tp->tv_sec += off / 1000 + ns / 1000000000LL;
            ns %= 1000000000LL;
            if (ns < 0) {
                ns += 1000000000LL;
                tp->tv_sec -= 1;
            }
            tp->tv_nsec = ns;
        }
    }
    return r;
}

/* Creating a file: open/open64/openat/openat64 with O_CREAT on a matching path (a full directory). */
static int create_fault(const char *path, int flags) {
    if (!(flags & O_CREAT) || !ctl || !armed() || !path_matches(path)) return 0;
    if (take(&ctl->fail_create)) {
        errno = ENOSPC;
        return 1;
    }
    return 0;
}

#define OPEN_WRAPPER(name)                                                   \
    int name(const char *path, int flags, ...) {                             \
        static int (*real)(const char *, int, ...);                          \
        if (!real) real = dlsym(RTLD_NEXT, #name);                           \
        mode_t mode = 0;                                                     \
        if (flags & (O_CREAT | O_TMPFILE)) {                                 \
            va_list ap;                                                      \
            va_start(ap, flags);                                             \
            mode = va_arg(ap, mode_t);                                       \
            va_end(ap);                                                      \
        }                                                                    \
        if (create_fault(path, flags)) return -1;                            \
        return real(path, flags, mode);                                      \
    }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

#define OPENAT_WRAPPER(name)                                                 \
    int name(int dirfd, const char *path, int flags, ...) {                  \
        static int (*real)(int, const char *, int, ...);                     \
        if (!real) real = dlsym(RTLD_NEXT, #name);                           \
        mode_t mode = 0;                                                     \
        if (flags & (O_CREAT | O_TMPFILE)) {                                 \
            va_list ap;                                                      \
            va_start(ap, flags);                                             \
            mode = va_arg(ap, mode_t);                                       \
            va_end(ap);                                                      \
        }                                                                    \
        if (create_fault(path, flags)) return -1;                            \
        return real(dirfd, path, flags, mode);                               \
    }
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)
