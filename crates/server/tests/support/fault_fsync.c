// An LD_PRELOAD library for the flush-failure tests: `fsync` and `fdatasync` of a file whose
// name ends in "-wal" fail with EIO while the file named by FAULT_FSYNC_FILE holds a positive
// count, which each failure lowers by one. Nothing is flushed then, and the data stays in the
// page cache, as after a real EIO.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int should_fail(int fd) {
    const char *ctl = getenv("FAULT_FSYNC_FILE");
    if (!ctl) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 4) return 0;
    path[n] = 0;
    if (strcmp(path + n - 4, "-wal") != 0) return 0;
    FILE *f = fopen(ctl, "r+");
    if (!f) return 0;
    long left = 0;
    int fail = fscanf(f, "%ld", &left) == 1 && left > 0;
    if (fail) {
        rewind(f);
        if (ftruncate(fileno(f), 0) == 0) fprintf(f, "%ld\n", left - 1);
    }
    fclose(f);
    return fail;
}

int fsync(int fd) {
    static int (*real)(int);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (should_fail(fd)) {
        errno = EIO;
        return -1;
    }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
