import json, os, sys
import jax, jax.numpy as jnp
import triton, triton.language as tl
sys.path.insert(0, os.getcwd())
from pallas_kernels import triton_attention as ta
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from benchmarks.attention import time_ms, make_inputs, materialized_bias
OUT = os.environ.get("OUT", "/tmp")

@triton.jit
def merged(ds, shift, lut_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr):
  u = tl.arange(0, BLOCK_K)
  j = u[None, :] + tl.arange(0, BLOCK_Q)[:, None]
  rotated = tl.gather(ds, j % BLOCK_K, axis=1)
  ahead = j < BLOCK_K
  s0 = tl.sum(tl.where(ahead, rotated, 0.0), 0)
  s1 = tl.sum(tl.where(ahead, 0.0, rotated), 0)
  ids = tl.arange(0, NUM_BUCKETS_PADDED)[None, :]
  b0 = tl.load(lut_ptr + tl.minimum(tl.maximum(shift + u, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE)
  b1 = tl.load(lut_ptr + tl.minimum(tl.maximum(shift + u - BLOCK_K, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE)
  return tl.sum(tl.where(b0[:, None] == ids, s0[:, None], 0.0) + tl.where(b1[:, None] == ids, s1[:, None], 0.0), 0)

@triton.jit
def dotted(ds, shift, lut_ptr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, NUM_BUCKETS_PADDED: tl.constexpr, MAX_DISTANCE: tl.constexpr):
  u = tl.arange(0, BLOCK_K)
  j = u[None, :] + tl.arange(0, BLOCK_Q)[:, None]
  rotated = tl.gather(ds, j % BLOCK_K, axis=1)
  ahead = j < BLOCK_K
  joined = tl.reshape(tl.join(tl.where(ahead, rotated, 0.0), tl.where(ahead, 0.0, rotated)), (BLOCK_Q, 2 * BLOCK_K))
  n = tl.arange(0, 2 * BLOCK_K)
  d = shift + n // 2 - (n % 2) * BLOCK_K
  b = tl.load(lut_ptr + tl.minimum(tl.maximum(d, -MAX_DISTANCE), MAX_DISTANCE) + MAX_DISTANCE)
  one_hot = (b[:, None] == tl.arange(0, NUM_BUCKETS_PADDED)[None, :]).to(tl.float32)
  return tl.sum(tl.dot(joined, one_hot, input_precision="tf32"), 0)

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
    print("R", json.dumps(r), flush=True)
  except Exception as e:
    r["error"] = str(e)[-600:]; print("ERR", name, r["error"], flush=True)
  res.append(r); json.dump(res, open(f"{OUT}/probe4_{sys.argv[1]}.json", "w"), indent=1)
def ours(impl, t5, causal=False, bs=None):
  return lambda q, k, v, t: flash_attention(q, k, v, rpe_table=t if t5 else None, rpe_bidirectional=not causal, causal=causal, impl=impl, block_sizes=bs)
variant = sys.argv[1]
if variant != "base":
  ta._diagonal_bucket_sums = dict(merged=merged, dotted=dotted)[variant]
def grads(fn, S=1024):
  s = make_inputs(jax.random.PRNGKey(7), 2, S, 4, 64)[0]
  f = jax.jit(lambda q, k, v, t, ct: jax.vjp(fn, q, k, v, t)[1](ct))
  return f(s["q"], s["k"], s["v"], s["table"], s["ct"])
g = grads(ours("triton", True))
ref = grads(lambda q, k, v, t: flash_attention_reference(q, k, v, rpe_table=t))
print(variant, "dtable rel err", float(jnp.linalg.norm(g[3] - ref[3]) / jnp.linalg.norm(ref[3])), flush=True)
for S in (1024, 2048):
  if variant == "base":
    bench("cudnn_t5", S, lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, bias=materialized_bias(t, q.shape[1], False).astype(q.dtype), implementation="cudnn"))
  bench("triton_t5_" + variant, S, ours("triton", True))
if variant == "base":
  for bs in (BlockSizes(128, 128, 64, 32, 8, 2, 4, 2), BlockSizes(128, 128, 64, 64, 8, 2, 4, 2), BlockSizes(128, 128, 64, 64, 8, 2, 4, 3), BlockSizes(128, 64, 64, 64, 8, 3, 8, 2), BlockSizes(128, 64, 64, 32, 8, 3, 4, 3)):
    bench(f"d128_{bs.block_q}x{bs.block_k}w{bs.num_warps}s{bs.num_stages}_bwd{bs.block_q_bwd}x{bs.block_k_bwd}w{bs.num_warps_bwd}s{bs.num_stages_bwd}", 1024, ours("triton", True, bs=bs), D=128)
print("DONE")
