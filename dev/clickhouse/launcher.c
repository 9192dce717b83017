/*
 * meterline-clickhouse: runs ClickHouse (chdb's libchdb.so, ClickHouse built as a library) as a
 * real loopback server speaking the HTTP and native protocols, for development and tests only.
 *
 *   meterline-clickhouse DATA_DIR HTTP_PORT TCP_PORT
 *
 * chdb is an embedded engine; its command-line entry point (`chdb_query_cmdline`, the same as
 * `clickhouse local`) can start the HTTP and TCP servers with `SYSTEM START LISTEN`, and they
 * serve for as long as the command's last query runs. So the last query blocks forever, and the
 * process is a server until it is signalled (SIGTERM stops it). The connection-based API
 * (`chdb_connect` + `chdb_query`) cannot do this: there `SYSTEM START LISTEN` fails with
 * "start_servers_callback is not set". See shared/infrastructure.md.
 *
 * Linked against libchdb.so at build time (with an rpath of $ORIGIN, the library sits next to
 * this binary in the cache) rather than loaded with dlopen: the linker then checks at install
 * time that the library exports the functions below, so a chdb version that renamed them fails
 * `dev/clickhouse.sh install`, not the first server start. The prototypes are declared here
 * because the npm package ships the library without its header.
 *
 * Built by dev/clickhouse.sh install; never linked into a meterline binary.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct chdb_result chdb_result; /* opaque */
extern chdb_result *chdb_query_cmdline(int argc, char **argv);
extern const char *chdb_result_error(chdb_result *result);
extern void chdb_destroy_query_result(chdb_result *result);

/*
 * A query that never ends and costs nothing: one row per second, each row sleeps 1 s, the output
 * is discarded. The settings lift the per-block sleep cap and make every row its own block.
 */
#define BLOCKING_QUERY                                                                             \
    "SELECT sleepEachRow(1) FROM system.numbers FORMAT Null "                                      \
    "SETTINGS function_sleep_max_microseconds_per_block = 0, max_block_size = 1"

static int parse_port(const char *text, const char *what) {
    char *end = NULL;
    errno = 0;
    long port = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || port < 1 || port > 65535) {
        fprintf(stderr, "meterline-clickhouse: %s is not a port number: %s\n", what, text);
        exit(2);
    }
    return (int)port;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s DATA_DIR HTTP_PORT TCP_PORT\n", argv[0]);
        return 2;
    }
    const char *data_dir = argv[1];
    int http_port = parse_port(argv[2], "HTTP_PORT");
    int tcp_port = parse_port(argv[3], "TCP_PORT");

    char path_arg[4096], http_arg[64], tcp_arg[64];
    if (snprintf(path_arg, sizeof path_arg, "--path=%s", data_dir) >= (int)sizeof path_arg) {
        fprintf(stderr, "meterline-clickhouse: DATA_DIR too long\n");
        return 2;
    }
    snprintf(http_arg, sizeof http_arg, "--http_port=%d", http_port);
    snprintf(tcp_arg, sizeof tcp_arg, "--tcp_port=%d", tcp_port);

    char *args[] = {
        "clickhouse",
        path_arg,
        http_arg,
        tcp_arg,
        /* Loopback only: the server's default user can do anything (file() reads any file). */
        "--listen_host=127.0.0.1",
        "--multiquery",
        "--query=SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; " BLOCKING_QUERY,
        NULL,
    };
    int nargs = (int)(sizeof args / sizeof args[0]) - 1;

    fprintf(stderr, "meterline-clickhouse: serving %s on http 127.0.0.1:%d, tcp 127.0.0.1:%d\n",
            data_dir, http_port, tcp_port);
    chdb_result *result = chdb_query_cmdline(nargs, args);

    /* Only reached when the server could not start or the blocking query was stopped. */
    const char *error = result ? chdb_result_error(result) : "chdb returned no result";
    if (error && *error) {
        fprintf(stderr, "meterline-clickhouse: %s\n", error);
    } else {
        fprintf(stderr, "meterline-clickhouse: the server query ended\n");
    }
    if (result) {
        chdb_destroy_query_result(result);
    }
    return 1;
}
