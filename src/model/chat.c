/* chat.c: the chat templates of the families pdserve serves, written out in C.
 *
 * tokenizer_config.json carries a Jinja template; pdserve does not run Jinja. It
 * recognises the family from markers in the template text and renders as that
 * template does, including the variants a family ships with (Llama 3 vs 3.1/3.2's
 * default system message with dates, Qwen2.5's default system message, Qwen3's
 * <think> blocks). Anything else is refused with a clear message, never guessed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/tokenizer_internal.h"
#include "util/util.h"

/* Appends a string literal (its length counted by the compiler). */
#define PUT_LIT(b, lit) tbuf_put((b), lit, sizeof(lit) - 1)

static const char QWEN_DEFAULT_SYSTEM[] = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

/* Called once at load time: fills t->chat and the variant flags. */
void chat_detect(tokenizer *t) {
    const char *tpl = t->chat_template;
    t->chat = CHAT_FORMAT_NONE;
    if (!tpl) return;
    if (strstr(tpl, "<|start_header_id|>")) t->chat = CHAT_FORMAT_LLAMA3;
    else if (strstr(tpl, "<|im_start|>")) t->chat = CHAT_FORMAT_CHATML;
    else if (strstr(tpl, "[INST]")) t->chat = CHAT_FORMAT_LLAMA2;
    t->llama31_system = t->chat == CHAT_FORMAT_LLAMA3 && strstr(tpl, "Cutting Knowledge Date") != NULL;
    const char *d = strstr(tpl, "date_string = \"");
    if (d) {
        d += strlen("date_string = \"");
        const char *e = strchr(d, '"');
        if (e && e - d < 64) t->date_string = xstrndup(d, (size_t)(e - d));
    }
}

chat_format tokenizer_chat_format(const tokenizer *t) { return t->chat; }

/* Python's str.isspace, which Jinja's trim and str.strip use. */
static bool py_space(uint32_t cp) { return tok_is_space(cp) || (cp >= 0x1c && cp <= 0x1f); }

static void put_stripped(tbuf *b, const char *s, bool left, bool right) {
    size_t n = strlen(s), a = 0, e = n;
    int l;
    while (left && a < e && py_space(utf8_decode_at((const unsigned char *)s + a, e - a, &l))) a += (size_t)l;
    while (right && e > a) {
        size_t k = e - 1;
        while (k > a && ((unsigned char)s[k] & 0xc0) == 0x80) k--;
        if (!py_space(utf8_decode_at((const unsigned char *)s + k, e - k, &l))) break;
        e = k;
    }
    tbuf_put(b, s + a, e - a);
}

/* Strips only the character c on the left / right (Python's str.lstrip(c)). */
static void put_strip_char(tbuf *b, const char *s, size_t n, char c, bool left, bool right) {
    size_t a = 0, e = n;
    while (left && a < e && s[a] == c) a++;
    while (right && e > a && s[e - 1] == c) e--;
    tbuf_put(b, s + a, e - a);
}

static const char *tok_text(const tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids && t->tok[id] ? t->tok[id] : "";
}

static bool role_known(const char *r) {
    return r && (!strcmp(r, "system") || !strcmp(r, "user") || !strcmp(r, "assistant"));
}

/* Text after the literal "Cutting Knowledge Date: " in the template, up to the
 * end of its string literal (the template writes the line break as \n). */
static void put_knowledge_date(tbuf *b, const char *tpl) {
    const char *k = strstr(tpl, "Cutting Knowledge Date: ");
    if (!k) return;
    k += strlen("Cutting Knowledge Date: ");
    size_t n = strcspn(k, "\\\"'\n");
    tbuf_put(b, k, n);
}

static void render_llama3(const tokenizer *t, tbuf *b, const chat_message *m, int n, bool gen) {
    tbuf_put(b, tok_text(t, t->bos_id), strlen(tok_text(t, t->bos_id)));
    int first = 0;
    if (t->llama31_system) {
        const char *sys = "";
        if (n > 0 && !strcmp(m[0].role, "system")) { sys = m[0].content; first = 1; }
        char date[64];
        if (strstr(t->chat_template, "strftime_now")) {
            time_t now = time(NULL);
            struct tm tmv;
            localtime_r(&now, &tmv);
            strftime(date, sizeof(date), "%d %b %Y", &tmv);
        } else snprintf(date, sizeof(date), "%s", t->date_string ? t->date_string : "26 Jul 2024");
        PUT_LIT(b, "<|start_header_id|>system<|end_header_id|>\n\n");
        PUT_LIT(b, "Cutting Knowledge Date: ");
        put_knowledge_date(b, t->chat_template);
        PUT_LIT(b, "\nToday Date: ");
        tbuf_put(b, date, strlen(date));
        PUT_LIT(b, "\n\n");
        put_stripped(b, sys, true, true);
        PUT_LIT(b, "<|eot_id|>");
    }
    for (int i = first; i < n; i++) {
        PUT_LIT(b, "<|start_header_id|>");
        tbuf_put(b, m[i].role, strlen(m[i].role));
        PUT_LIT(b, "<|end_header_id|>\n\n");
        put_stripped(b, m[i].content, true, true);
        PUT_LIT(b, "<|eot_id|>");
    }
    /* the first Llama 3 templates add the assistant header unconditionally */
    if (gen || !strstr(t->chat_template, "add_generation_prompt"))
        PUT_LIT(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void render_chatml_assistant(tbuf *b, const char *content, bool after_last_query, bool last) {
    const char *think_end = strstr(content, "</think>");
    size_t n = strlen(content);
    const char *body = content;
    size_t body_len = n;
    tbuf reasoning = {0};
    if (think_end) {
        /* content = after the last </think>, reasoning = inside the first <think>..</think> */
        const char *last_end = think_end, *p;
        while ((p = strstr(last_end + 1, "</think>"))) last_end = p;
        body = last_end + 8;
        body_len = strlen(body);
        tbuf first = {0};
        put_strip_char(&first, content, (size_t)(think_end - content), '\n', false, true);
        const char *inner = first.p ? first.p : "", *open = inner, *q;
        while ((q = strstr(open, "<think>"))) open = q + 7;
        put_strip_char(&reasoning, open, strlen(open), '\n', true, false);
        free(first.p);
    }
    PUT_LIT(b, "<|im_start|>assistant\n");
    if (after_last_query && (last || reasoning.n)) {
        PUT_LIT(b, "<think>\n");
        put_strip_char(b, reasoning.p ? reasoning.p : "", reasoning.n, '\n', true, true);
        PUT_LIT(b, "\n</think>\n\n");
        put_strip_char(b, body, body_len, '\n', true, false);
    } else if (think_end) {
        put_strip_char(b, body, body_len, '\n', true, false);
    } else {
        tbuf_put(b, body, body_len);
    }
    PUT_LIT(b, "<|im_end|>\n");
    free(reasoning.p);
}

static void render_chatml(const tokenizer *t, tbuf *b, const chat_message *m, int n, bool gen) {
    bool qwen3 = strstr(t->chat_template, "reasoning_content") != NULL;
    bool default_sys = strstr(t->chat_template, QWEN_DEFAULT_SYSTEM) != NULL;
    int first = 0;
    if (n > 0 && !strcmp(m[0].role, "system")) {
        PUT_LIT(b, "<|im_start|>system\n");
        tbuf_put(b, m[0].content, strlen(m[0].content));
        PUT_LIT(b, "<|im_end|>\n");
        first = 1;
    } else if (default_sys) {
        PUT_LIT(b, "<|im_start|>system\n");
        tbuf_put(b, QWEN_DEFAULT_SYSTEM, sizeof(QWEN_DEFAULT_SYSTEM) - 1);
        PUT_LIT(b, "<|im_end|>\n");
    }
    int last_query = n - 1;
    for (int i = n - 1; i >= 0; i--)
        if (!strcmp(m[i].role, "user")) { last_query = i; break; }
    for (int i = first; i < n; i++) {
        if (qwen3 && !strcmp(m[i].role, "assistant")) {
            render_chatml_assistant(b, m[i].content, i > last_query, i == n - 1);
            continue;
        }
        PUT_LIT(b, "<|im_start|>");
        tbuf_put(b, m[i].role, strlen(m[i].role));
        tbuf_putc(b, '\n');
        tbuf_put(b, m[i].content, strlen(m[i].content));
        PUT_LIT(b, "<|im_end|>\n");
    }
    if (gen) PUT_LIT(b, "<|im_start|>assistant\n");
}

static int render_llama2(const tokenizer *t, tbuf *b, const chat_message *m, int n, char *err, size_t errlen) {
    const char *sys = NULL;
    int first = 0;
    if (n > 0 && !strcmp(m[0].role, "system")) { sys = m[0].content; first = 1; }
    const char *bos = tok_text(t, t->bos_id), *eos = tok_text(t, t->eos_id);
    for (int i = first; i < n; i++) {
        bool user = !strcmp(m[i].role, "user");
        if (user != ((i - first) % 2 == 0)) {
            pd_errorf(err, errlen, "Conversation roles must alternate user/assistant/user/assistant/...");
            return -1;
        }
        tbuf content = {0};
        if (i == first && sys) {
            PUT_LIT(&content, "<<SYS>>\n");
            tbuf_put(&content, sys, strlen(sys));
            PUT_LIT(&content, "\n<</SYS>>\n\n");
        }
        tbuf_put(&content, m[i].content, strlen(m[i].content));
        if (user) {
            tbuf_put(b, bos, strlen(bos));
            PUT_LIT(b, "[INST] ");
            put_stripped(b, content.p, true, true);
            PUT_LIT(b, " [/INST]");
        } else {
            tbuf_putc(b, ' ');
            put_stripped(b, content.p, true, true);
            tbuf_putc(b, ' ');
            tbuf_put(b, eos, strlen(eos));
        }
        free(content.p);
    }
    return 0;
}

char *chat_apply(const tokenizer *t, const chat_message *m, int n, bool add_generation_prompt,
                 char *err, size_t errlen) {
    if (t->chat == CHAT_FORMAT_NONE) {
        pd_errorf(err, errlen, "this model's tokenizer has no chat template pdserve knows: %s "
                  "(supported: Llama 3, ChatML/Qwen, Llama 2 [INST])",
                  t->chat_template ? "its tokenizer_config.json template is of another family"
                                   : "tokenizer_config.json has no chat_template");
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        if (!role_known(m[i].role) || !m[i].content) {
            pd_errorf(err, errlen, "message %d has role \"%s\": only system, user and assistant are supported",
                      i, m[i].role ? m[i].role : "(none)");
            return NULL;
        }
    }
    tbuf b = {0};
    tbuf_put(&b, NULL, 0);
    switch (t->chat) {
    case CHAT_FORMAT_LLAMA3: render_llama3(t, &b, m, n, add_generation_prompt); break;
    case CHAT_FORMAT_CHATML: render_chatml(t, &b, m, n, add_generation_prompt); break;
    case CHAT_FORMAT_LLAMA2:
        if (render_llama2(t, &b, m, n, err, errlen)) { free(b.p); return NULL; }
        break;
    case CHAT_FORMAT_NONE: break;
    }
    return b.p;
}
