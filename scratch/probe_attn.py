import json, os, sys, time
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from benchmarks.attention import time_ms, make_inputs
OUT = os.environ.get("OUT", "/tmp")
res = {"checks": [], "speed": []}
def log(*a):
  print(*a, flush=True)
# 1. correctness triton fwd vs pallas fwd
key = jax.random.PRNGKey(0)
for dtype, D, S, Sk, mode, causal, seg in [
    (jnp.float32, 64, 333, 333, "t5", False, False), (jnp.float32, 64, 333, 333, "t5", True, False),
    (jnp.float32, 32, 200, 200, "none", False, True), (jnp.float32, 128, 333, 333, "t5", False, True),
    (jnp.float32, 64, 1000, 1000, "t5", True, True), (jnp.float32, 64, 200, 333, "none", False, True),
    (jnp.bfloat16, 64, 1024, 1024, "t5", False, False), (jnp.bfloat16, 128, 1024, 1024, "t5", False, False)]:
  ks = jax.random.split(key, 6); key = ks[0]
  B, H = 2, 3
  q = jax.random.normal(ks[1], (B, S, H, D), dtype); k = jax.random.normal(ks[2], (B, Sk, H, D), dtype)
  v = jax.random.normal(ks[3], (B, Sk, H, D), dtype); table = jax.random.normal(ks[4], (32, H))
  kw = dict(causal=causal, return_lse=True)
  if mode == "t5": kw.update(rpe_table=table, rpe_bidirectional=not causal)
  if seg:
    qs = (jnp.arange(S)[None] * 3 // S + 1) * jnp.ones((B, 1), jnp.int32); qs = qs.at[:, -7:].set(0)
    kvs = (jnp.arange(Sk)[None] * 3 // Sk + 1) * jnp.ones((B, 1), jnp.int32)
    kw.update(q_segment_ids=qs, kv_segment_ids=kvs)
  try:
    o1, l1 = flash_attention(q, k, v, impl="pallas", **kw)
    o2, l2 = flash_attention(q, k, v, impl="triton", **kw)
    fin = jnp.isfinite(l1)
    r = dict(dtype=str(jnp.dtype(dtype)), D=D, S=S, Sk=Sk, mode=mode, causal=causal, seg=seg,
             out=float(jnp.max(jnp.abs(o1.astype(jnp.float32) - o2.astype(jnp.float32)))),
             lse=float(jnp.max(jnp.where(fin, jnp.abs(l1 - l2), 0))), lse_inf_match=bool(jnp.all(fin == jnp.isfinite(l2))))
  except Exception as e:
    r = dict(D=D, S=S, mode=mode, error=str(e)[-1500:])
  log("CHECK", r); res["checks"].append(r)
# 2. speed
def fwd(name, S, D, causal, bs, impl):
  B, H = 16, 12
  sets = make_inputs(jax.random.PRNGKey(S), B, S, H, D)
  if name == "cudnn_none":
    f = jax.jit(lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"))
  else:
    t5 = name == "t5"
    f = jax.jit(lambda q, k, v, t: flash_attention(q, k, v, rpe_table=t if t5 else None, rpe_bidirectional=not causal,
                                                   causal=causal, block_sizes=bs, impl=impl))
  try:
    ms, spread = time_ms(lambda s: f(s["q"], s["k"], s["v"], s["table"]), sets)
  except Exception as e:
    log("ERR", name, S, D, bs, impl, str(e)[-800:]); return
  tf = 4 * B * S * S * H * D / (2 if causal else 1) / ms / 1e9
  r = dict(name=name, S=S, D=D, causal=causal, impl=impl, bs=None if bs is None else [bs.block_q, bs.block_k, bs.num_warps, bs.num_stages], ms=ms, tflops=tf)
  log("SPEED", r); res["speed"].append(r)
  json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)
B = lambda bq, bk, w, s: BlockSizes(bq, bk, 64, 64, w, s, 4, 3)
for S in (1024, 2048, 4096):
  fwd("cudnn_none", S, 64, False, None, None)
  fwd("t5", S, 64, False, None, "pallas")
  fwd("none", S, 64, False, None, "triton")
  for bs in (B(128, 64, 4, 3), B(128, 64, 4, 2), B(128, 64, 4, 4), B(128, 64, 8, 3), B(128, 128, 8, 2), B(128, 128, 8, 3), B(64, 64, 4, 3), B(128, 32, 4, 3)):
    fwd("t5", S, 64, False, bs, "triton")
for S in (1024, 2048):
  fwd("cudnn_none", S, 64, True, None, None)
  fwd("t5", S, 64, True, None, "pallas")
  fwd("t5", S, 64, True, None, "triton")
  fwd("cudnn_none", S, 128, False, None, None)
  fwd("t5", S, 128, False, None, "pallas")
  for bs in (B(128, 128, 8, 2), B(128, 64, 4, 3), B(128, 64, 8, 3), B(128, 128, 8, 3)):
    fwd("t5", S, 128, False, bs, "triton")
log("DONE")
