/* LD_PRELOAD shim for bench/ingest.py: DCMTK storescp made durable the way FIONA is, so the
   bench can show what flushing each object costs on the disk it runs on, apart from FIONA's
   own overhead. storescp writes each object straight to its final name and closes it before it
   sends the C-STORE response; here fclose first fsyncs the file, then the folder that names it
   (on an ext4 without a journal the file's fsync does not make its name durable), so the
   response leaves only once both are on disk. Files opened read-only pass through untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

int fclose(FILE *stream) {
    static int (*real_fclose)(FILE *);
    if (!real_fclose)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    int fd = fileno(stream);
    int flags = fd >= 0 ? fcntl(fd, F_GETFL) : -1;
    struct stat st;
    if (flags >= 0 && (flags & O_ACCMODE) != O_RDONLY && fstat(fd, &st) == 0
            && S_ISREG(st.st_mode)) {
        char link[64], path[4096];
        fflush(stream);
        fsync(fd);
        snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(link, path, sizeof path - 1);
        if (n > 0) {
            path[n] = '\0';
            int dir = open(dirname(path), O_RDONLY | O_DIRECTORY);
            if (dir >= 0) {
                fsync(dir);
                close(dir);
            }
        }
    }
    return real_fclose(stream);
}
