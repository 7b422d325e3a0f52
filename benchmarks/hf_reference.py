#!/usr/bin/env python3
"""hf_reference.py: Hugging Face transformers on this GPU at the shapes of
bench_model_cuda.c, the competitor its ratios are taken against. Same card, same
call, run just before it (scripts/gpu/check-model.sh with BENCH=1).

  decode   Llama-3.1-8B shape, random bf16 weights (initialised on the GPU), eager
           model forward of one token per sequence over a DynamicCache that holds ctx
           tokens per sequence (random K/V written into it with cache.update; a
           real prefill only if that API is missing), then torch.argmax of the last
           logits and a copy of the tokens to the host, as our step does. Median of
           the timed steps, after 3 warm-up steps. (B, ctx) = (1, 128), (1, 2048),
           (64, 2048).
  prefill  Llama-3.2-3B shape, one 16,384-token prompt, one forward with sdpa
           attention (PyTorch's flash kernel) and only the last logits row
           (logits_to_keep=1). Median of 3 after a warm-up.

Writes a JSON object of milliseconds (decode_b{B}_ctx{ctx}_ms, prefill_3b_16k_ms)
plus versions to the path given (default hf.json) and prints it.
Usage: python3 benchmarks/hf_reference.py OUT.json
"""

import json
import statistics
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def llama_config(layers, dim, ffn, heads, kv_heads, factor, tie=False):
    """A Llama 3 config (the shapes of src/model/presets.c), in transformers 5's
    spelling (rope_parameters) or 4's (rope_theta + rope_scaling)."""
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    kw = dict(hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim // heads,
              vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
              tie_word_embeddings=tie, bos_token_id=128000, eos_token_id=128001)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = rope
    else:
        kw["rope_theta"] = rope.pop("rope_theta")
        kw["rope_scaling"] = rope
    cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build(cfg):
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(old)
    return model.eval()


def sync_ms(t0):
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def filled_cache(model, cfg, B, ctx):
    """A DynamicCache holding ctx random tokens of K and V per sequence and layer."""
    D = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache(config=cfg) if "config" in DynamicCache.__init__.__code__.co_varnames else DynamicCache()
    try:
        for l in range(cfg.num_hidden_layers):
            k = torch.randn(B, cfg.num_key_value_heads, ctx, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            cache.update(k, v, l)
        assert cache.get_seq_length() == ctx
        return cache, "random K/V via cache.update"
    except Exception as e:  # fall back to a real prefill
        print(f"cache.update failed ({e}); prefilling instead", file=sys.stderr)
        cache = DynamicCache()
        ids = torch.randint(0, cfg.vocab_size, (B, ctx), device="cuda")
        model.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return cache, "prefill"


@torch.no_grad()
def time_decode(model, cfg, B, ctx, steps=20):
    cache, how = filled_cache(model, cfg, B, ctx)
    ids = torch.randint(0, cfg.vocab_size, (B, 1), device="cuda")
    times = []
    for i in range(3 + steps):
        pos = torch.full((B, 1), ctx + i, device="cuda", dtype=torch.long)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True)
        nxt = torch.argmax(out.logits[:, -1, :], dim=-1)
        nxt.cpu()
        t = sync_ms(t0)
        if i >= 3:
            times.append(t)
        ids = nxt[:, None]
    del cache
    torch.cuda.empty_cache()
    return statistics.median(times), how


@torch.no_grad()
def time_prefill(model, cfg, T=16384):
    ids = torch.randint(0, cfg.vocab_size, (1, T), device="cuda")
    def once():
        t0 = time.perf_counter()
        try:
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
            out.logits.argmax(-1).cpu()
        except TypeError:
            model.model(input_ids=ids, use_cache=False)
        return sync_ms(t0)
    once()
    return statistics.median([once() for _ in range(3)])


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "hf.json"
    res = dict(card=torch.cuda.get_device_name(0), torch=torch.__version__,
               transformers=transformers.__version__, attn="sdpa", cache="DynamicCache (eager)")
    model = build(llama_config(32, 4096, 14336, 32, 8, 8.0))
    cfg = model.config
    for B, ctx in [(1, 128), (1, 2048), (64, 2048)]:
        ms, how = time_decode(model, cfg, B, ctx)
        res[f"decode_b{B}_ctx{ctx}_ms"] = ms
        res["decode_cache_fill"] = how
        print(f"HF decode 8B B={B} ctx={ctx}: {ms:.2f} ms", flush=True)
    del model
    torch.cuda.empty_cache()
    model = build(llama_config(28, 3072, 8192, 24, 8, 32.0, tie=True))
    res["prefill_3b_16k_ms"] = time_prefill(model, model.config)
    print(f"HF prefill 3B T=16384: {res['prefill_3b_16k_ms']:.1f} ms", flush=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
