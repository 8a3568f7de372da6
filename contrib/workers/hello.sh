#!/bin/sh
# An inetd-style worker for fdsupervisor's accept mode (accept: true, inetd: true):
# the connection is stdin and stdout, the peer in REMOTE_ADDR / REMOTE_PORT.
read -r name
printf 'hello %s, from %s:%s, pid %s\n' "$name" "${REMOTE_ADDR:-?}" "${REMOTE_PORT:-?}" "$$"
