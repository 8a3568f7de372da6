/* An inetd-style worker for bench/accept_rate.py: the connection is stdin
 * and stdout; write "hi\n" to it and exit (which closes it). */
#include <unistd.h>

int main(void) {
    return write(1, "hi\n", 3) == 3 ? 0 : 1;
}
