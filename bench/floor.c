/*
 * floor - the least any TFTP server can do per one-block RRQ, as a yardstick
 * for the "small" scenario: read the request, open and read FILE (whatever
 * was asked for), send it as DATA 1 from a new socket on 127.0.0.1, wait for
 * one datagram (the ACK), close.  No parsing, no checks, no retransmission:
 * not a server, only a measure of what the machine allows.
 *
 *   gcc -O2 -o bench/build/floor bench/floor.c
 *   bench/build/floor PORT FILE &
 *   bench/build/tftpbench -p PORT -f small.bin -n 3000 -c 1 -b 0 -w 0 -S -e 300
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: floor PORT FILE\n");
        return 2;
    }
    int port = atoi(argv[1]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(s, (void *)&a, sizeof a)) { perror("bind"); return 1; }
    char req[1024], pkt[516], ack[64];
    for (;;) {
        struct sockaddr_in peer; socklen_t pl = sizeof peer;
        if (recvfrom(s, req, sizeof req, 0, (void *)&peer, &pl) < 4) continue;
        int t = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in l = {.sin_family = AF_INET};
        inet_pton(AF_INET, "127.0.0.1", &l.sin_addr);
        bind(t, (void *)&l, sizeof l);
        int fd = open(argv[2], O_RDONLY);
        ssize_t n = fd < 0 ? 0 : pread(fd, pkt + 4, 512, 0);
        if (fd >= 0) close(fd);
        if (n < 0) n = 0;
        pkt[0] = 0; pkt[1] = 3; pkt[2] = 0; pkt[3] = 1;
        sendto(t, pkt, 4 + n, 0, (void *)&peer, pl);
        recv(t, ack, sizeof ack, 0);
        close(t);
    }
}
