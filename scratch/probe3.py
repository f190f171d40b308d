import json, os, sys
import jax, jax.numpy as jnp
import triton, triton.language as tl
sys.path.insert(0, os.getcwd())
from pallas_kernels import triton_attention as ta
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from benchmarks.attention import time_ms, make_inputs, materialized_bias
OUT = os.environ.get("OUT", "/tmp")
original = ta._diagonal_bucket_sums

@triton.jit
def zero_sums(ds, shift, lut_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr):
  return tl.zeros((NUM_BUCKETS_PADDED,), tl.float32) + tl.sum(tl.sum(ds, 1), 0)

@triton.jit
def wrapped_sums(ds, shift, lut_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr):
  rows = tl.arange(0, BLOCK_Q)[:, None]
  u = tl.arange(0, BLOCK_K)
  j = u[None, :] + rows
  ahead = j < BLOCK_K
  skewed = tl.gather(ds, j % BLOCK_K, axis=1)
  sums_ahead = tl.sum(tl.where(ahead, skewed, 0.0), 0)
  sums_behind = tl.sum(tl.where(ahead, 0.0, skewed), 0)
  iota = tl.arange(0, NUM_BUCKETS_PADDED)[None, :]
  b1 = tl.load(lut_ptr + tl.minimum(tl.maximum(shift + u, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE)
  b2 = tl.load(lut_ptr + tl.minimum(tl.maximum(shift + u - BLOCK_K, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE)
  return tl.sum(tl.where(b1[:, None] == iota, sums_ahead[:, None], 0.0) + tl.where(b2[:, None] == iota, sums_behind[:, None], 0.0), 0)

res = []
def bench(name, S, fn, causal=False, D=64):
  B, H = 16, 12
  sets = make_inputs(jax.random.PRNGKey(S), B, S, H, D)
  fl = 4 * B * S * S * H * D / (2 if causal else 1)
  r = dict(name=name, S=S, D=D, causal=causal)
  try:
    def run(q, k, v, t, ct):
      o, vjp = jax.vjp(fn, q, k, v, t); return o, vjp(ct)
    g = jax.jit(run)
    r["fb_ms"] = time_ms(lambda s: g(s["q"], s["k"], s["v"], s["table"], s["ct"]), sets)[0]
    r["fb_tf"] = 3.5 * fl / r["fb_ms"] / 1e9
    if name.startswith("check"):
      s = sets[0]
      ref = jax.jit(lambda q, k, v, t, ct: run(q, k, v, t, ct))
    print("R", json.dumps(r), flush=True)
  except Exception as e:
    r["error"] = str(e)[-600:]; print("ERR", name, r["error"], flush=True)
  res.append(r); json.dump(res, open(f"{OUT}/probe3_{sys.argv[1]}.json", "w"), indent=1)
def ours(impl, t5, causal=False, bs=None):
  return lambda q, k, v, t: flash_attention(q, k, v, rpe_table=t if t5 else None, rpe_bidirectional=not causal, causal=causal, impl=impl, block_sizes=bs)
variant = sys.argv[1]
def grads(fn, S=1024):
  s = make_inputs(jax.random.PRNGKey(7), 2, S, 4, 64)[0]
  f = jax.jit(lambda q, k, v, t, ct: jax.vjp(fn, q, k, v, t)[1](ct))
  return f(s["q"], s["k"], s["v"], s["table"], s["ct"])
if variant != "base":
  ta._diagonal_bucket_sums = dict(wrapped=wrapped_sums, zero=zero_sums)[variant]
g = grads(ours("triton", True))
ref = grads(lambda q, k, v, t: __import__("pallas_kernels.flash_attention", fromlist=["x"]).flash_attention_reference(q, k, v, rpe_table=t))
print(variant, "dtable rel err", float(jnp.linalg.norm(g[3] - ref[3]) / jnp.linalg.norm(ref[3])), flush=True)
for S in (1024, 2048):
  if variant == "base":
    bench("cudnn_t5", S, lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, bias=materialized_bias(t, q.shape[1], False).astype(q.dtype), implementation="cudnn"))
    bench("triton_none", S, ours("triton", False))
    bench("triton_t5_causal", S, ours("triton", True, True), causal=True)
    bench("pallas_t5_causal", S, ours("pallas", True, True), causal=True)
  bench("triton_t5_" + variant, S, ours("triton", True))
print("DONE")
