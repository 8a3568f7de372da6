/* A socket-activated worker for bench/activation.py.
 *
 * Takes the listening socket at fd 3 (LISTEN_FDS=1, as systemd-socket-activate
 * and fdsupervisor pass it), and for each connection writes "hi\n" and closes.
 * Serves until it is signalled. The socket may be non-blocking (a supervisor
 * that watches it for traffic may have made it so): poll before accept.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(void) {
    const char *fds = getenv("LISTEN_FDS");
    if (fds == NULL || atoi(fds) < 1)
        return 2;
    struct pollfd listener = {.fd = 3, .events = POLLIN};
    for (;;) {
        if (poll(&listener, 1, -1) < 0 && errno != EINTR)
            return 1;
        int conn = accept(3, NULL, NULL);
        if (conn < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
                errno == ECONNABORTED)
                continue;
            return 1;
        }
        (void)!write(conn, "hi\n", 3);
        close(conn);
    }
}
