/* A C worker for fdsupervisor (or systemd): greets each connection on each stream socket.
 *
 * Build: cc -O2 -o hello hello.c $(pkg-config --cflags --libs libsystemd)
 * It reads its sockets with sd_listen_fds_with_names(), as under systemd.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <systemd/sd-daemon.h>

int main(void) {
    char **names = NULL;
    int n = sd_listen_fds_with_names(1, &names);
    if (n <= 0) {
        fprintf(stderr, "hello: no sockets passed (%s)\n", n < 0 ? strerror(-n) : "LISTEN_FDS unset");
        return 1;
    }
    struct pollfd fds[64];
    if (n > 64)
        n = 64;
    for (int i = 0; i < n; i++) {
        fds[i].fd = SD_LISTEN_FDS_START + i;
        fds[i].events = POLLIN;
    }
    fprintf(stderr, "hello: ready pid=%d sockets=%d\n", (int) getpid(), n);
    for (;;) {
        if (poll(fds, (nfds_t) n, -1) < 0)
            continue;
        for (int i = 0; i < n; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            int conn = accept(fds[i].fd, NULL, NULL);
            if (conn < 0)
                continue;
            char line[300];
            int len = snprintf(line, sizeof line, "hello from %d on %s\n", (int) getpid(), names[i]);
            if (write(conn, line, (size_t) len) < 0)
                perror("hello: write");
            close(conn);
        }
    }
}
