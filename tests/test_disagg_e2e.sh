#!/usr/bin/env bash
# test_disagg_e2e.sh: disaggregated serving end to end, every medium this build has:
# `pdserve up --setup dis-gpu | dis-cpu | dis-disk | dis-tcp` (and 2p1d with layer-wise
# transfer over tcp), each driven by the official OpenAI client (tests/node/disagg.mjs):
# 32 concurrent requests (completions, streams, chat, logprobs; prompts of 1 to ~25 KV
# blocks) whose greedy outputs must equal a plain colocated instance's, the router's
# error relay, every instance's KV pool empty afterwards, and after SIGTERM no process,
# shared-memory segment or store file left.
source "$(dirname "${BASH_SOURCE[0]}")/disagg_common.sh"
make_model

# references: one colocated instance, one request at a time
make_references

run_setup dis-gpu --setup dis-gpu
run_setup dis-cpu --setup dis-cpu
run_setup dis-disk --setup dis-disk
run_setup dis-tcp --setup dis-tcp
run_setup 2p1d-tcp-layerwise --setup 2p1d --medium tcp --kv-transfer-mode layerwise --policy round-robin

# dis-nccl without NCCL: a clear error, nothing started
if "$BIN" up --setup dis-nccl --model "$MODEL" --port 0 >"$TMP/nccl.out" 2>&1; then
  grep -q "NCCL" "$TMP/nccl.out" || fail "dis-nccl: expected an error naming NCCL"
else
  grep -q "NCCL" "$TMP/nccl.out" || { cat "$TMP/nccl.out"; fail "dis-nccl: the error does not name NCCL"; }
fi
echo "ok   dis-nccl: $(head -1 "$TMP/nccl.out")"
echo "all disaggregated end-to-end tests passed"
