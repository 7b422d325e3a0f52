/* fuzz_kv_message.c: libFuzzer target for the KV medium's outside input (kv_msg.c): the
 * frame header parser over every prefix of the input (need-more must never turn into an
 * error once the bytes complete a valid header, and a parsed header must respect every
 * cap), re-encoding what was parsed (must give the same bytes), and the ticket parser.
 * Run: ./build-fuzz/fuzz_kv_message -max_total_time=60 fuzz/corpus/kv_message */
#include <stdint.h>
#include <string.h>

#include "kv/kv.h"
#include "util/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256];
    kv_msg_header h;
    size_t off = 0;
    /* A stream of frames: headers only (payloads are skipped by their length). */
    while (off < size) {
        int n = kv_msg_parse(data + off, size - off, &h, err, sizeof err);
        if (n <= 0) {
            PD_ASSERT(n == 0 || err[0]);
            break;
        }
        PD_ASSERT(n == KV_MSG_HEADER_BYTES && h.payload_bytes <= KV_MSG_MAX_PAYLOAD &&
                  h.n_blocks <= KV_MSG_MAX_BLOCKS && h.layer <= KV_MSG_MAX_LAYERS);
        uint8_t again[KV_MSG_HEADER_BYTES];
        kv_msg_encode(&h, again);
        PD_ASSERT(memcmp(again, data + off, KV_MSG_HEADER_BYTES) == 0);
        off += (size_t)n;
        if (h.payload_bytes > size - off) break;
        off += (size_t)h.payload_bytes;
    }
    /* The same bytes as ticket text. */
    char text[KV_TICKET_TEXT_MAX + 8];
    size_t m = size < sizeof text - 1 ? size : sizeof text - 1;
    memcpy(text, data, m);
    text[m] = 0;
    kv_ticket t;
    if (kv_ticket_parse(text, &t, err, sizeof err) == 0) {
        char back[KV_TICKET_TEXT_MAX];
        PD_ASSERT(kv_ticket_format(&t, back, sizeof back) > 0);
        kv_ticket u;
        PD_ASSERT(kv_ticket_parse(back, &u, err, sizeof err) == 0 && memcmp(&t, &u, sizeof t) == 0);
    }
    return 0;
}
