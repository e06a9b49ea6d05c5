/* The benchmark filter on Sendmail's C libmilter: inspect every event, add one header.
 *
 * Usage: c_libmilter_filter PORT [HEADER-NAME]
 * Built by bench/run.py with: gcc -O2 -o c_libmilter_filter c_libmilter_filter.c -lmilter -lpthread
 *
 * Each callback looks at its argument and continues; end of message adds
 * "HEADER-NAME: 1" (X-Bench by default), like bench/filters.py and the other peers.
 */

#include <libmilter/mfapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct counts {
    size_t recipients, headers, body_bytes, client_length;
};

static const char *header_name = "X-Bench";

static struct counts *counts_of(SMFICTX *ctx) {
    return (struct counts *)smfi_getpriv(ctx);
}

static sfsistat on_connect(SMFICTX *ctx, char *hostname, _SOCK_ADDR *address) {
    struct counts *c = calloc(1, sizeof *c);
    if (c == NULL) return SMFIS_TEMPFAIL;
    c->client_length = hostname ? strlen(hostname) : 0;
    (void)address;
    smfi_setpriv(ctx, c);
    return SMFIS_CONTINUE;
}

static sfsistat on_helo(SMFICTX *ctx, char *name) {
    (void)ctx;
    return name ? SMFIS_CONTINUE : SMFIS_TEMPFAIL;
}

static sfsistat on_mail(SMFICTX *ctx, char **args) {
    struct counts *c = counts_of(ctx);
    if (c == NULL || args[0] == NULL) return SMFIS_TEMPFAIL;
    c->recipients = c->headers = c->body_bytes = 0;
    return SMFIS_CONTINUE;
}

static sfsistat on_rcpt(SMFICTX *ctx, char **args) {
    struct counts *c = counts_of(ctx);
    if (c == NULL || args[0] == NULL) return SMFIS_TEMPFAIL;
    c->recipients++;
    return SMFIS_CONTINUE;
}

static sfsistat on_header(SMFICTX *ctx, char *name, char *value) {
    struct counts *c = counts_of(ctx);
    if (c == NULL || name == NULL || value == NULL) return SMFIS_TEMPFAIL;
    c->headers++;
    return SMFIS_CONTINUE;
}

static sfsistat on_eoh(SMFICTX *ctx) {
    (void)ctx;
    return SMFIS_CONTINUE;
}

static sfsistat on_body(SMFICTX *ctx, unsigned char *chunk, size_t length) {
    struct counts *c = counts_of(ctx);
    if (c == NULL || chunk == NULL) return SMFIS_TEMPFAIL;
    c->body_bytes += length;
    return SMFIS_CONTINUE;
}

static sfsistat on_eom(SMFICTX *ctx) {
    if (smfi_addheader(ctx, (char *)header_name, "1") != MI_SUCCESS) return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static sfsistat on_close(SMFICTX *ctx) {
    free(counts_of(ctx));
    smfi_setpriv(ctx, NULL);
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PORT [HEADER-NAME]\n", argv[0]);
        return 2;
    }
    if (argc > 2) header_name = argv[2];
    static char connection[64];
    snprintf(connection, sizeof connection, "inet:%s@127.0.0.1", argv[1]);
    struct smfiDesc description = {
        .xxfi_name = "bench",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS,
        .xxfi_connect = on_connect,
        .xxfi_helo = on_helo,
        .xxfi_envfrom = on_mail,
        .xxfi_envrcpt = on_rcpt,
        .xxfi_header = on_header,
        .xxfi_eoh = on_eoh,
        .xxfi_body = on_body,
        .xxfi_eom = on_eom,
        .xxfi_close = on_close,
    };
    if (smfi_setconn(connection) == MI_FAILURE || smfi_register(description) == MI_FAILURE) {
        fprintf(stderr, "c_libmilter_filter: cannot set up %s\n", connection);
        return 1;
    }
    smfi_settimeout(600);
    smfi_setbacklog(256);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
