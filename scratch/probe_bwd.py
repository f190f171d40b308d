import json, os, sys
import jax, jax.numpy as jnp
sys.path.insert(0, os.getcwd())
from pallas_kernels.flash_attention import BlockSizes, flash_attention
from benchmarks.attention import time_ms, make_inputs, materialized_bias
from jax.experimental.pallas.ops.gpu import attention as jax_pallas
OUT = os.environ.get("OUT", "/tmp")
res = []
def bench(name, S, D, causal, fn, bwd=True):
  B, H = 16, 12
  sets = make_inputs(jax.random.PRNGKey(S), B, S, H, D)
  fl = 4 * B * S * S * H * D / (2 if causal else 1)
  r = dict(name=name, S=S, D=D, causal=causal)
  try:
    f = jax.jit(fn)
    r["fwd_ms"] = time_ms(lambda s: f(s["q"], s["k"], s["v"], s["table"]), sets)[0]
    r["fwd_tf"] = fl / r["fwd_ms"] / 1e9
    if bwd:
      def run(q, k, v, t, ct):
        o, vjp = jax.vjp(fn, q, k, v, t); return o, vjp(ct)
      g = jax.jit(run)
      r["fb_ms"] = time_ms(lambda s: g(s["q"], s["k"], s["v"], s["table"], s["ct"]), sets)[0]
      r["fb_tf"] = 3.5 * fl / r["fb_ms"] / 1e9
  except Exception as e:
    r["error"] = str(e)[-600:]
  print("R", json.dumps(r), flush=True); res.append(r)
  json.dump(res, open(f"{OUT}/probe_bwd.json", "w"), indent=1)
def ours(impl, t5, causal, bs=None):
  return lambda q, k, v, t: flash_attention(q, k, v, rpe_table=t if t5 else None, rpe_bidirectional=not causal,
                                            causal=causal, impl=impl, block_sizes=bs)
Bb = lambda bq, bk, w, s: BlockSizes(128, 64, bq, bk, 4, 3, w, s)
for S in (1024, 2048, 4096):
  c = False
  bench("cudnn_t5", S, 64, c, lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, bias=materialized_bias(t, q.shape[1], c).astype(q.dtype), implementation="cudnn"))
  bench("cudnn_none", S, 64, c, lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), bwd=False)
  bench("pallas_none", S, 64, c, lambda q, k, v, t: jax_pallas.mha(q, k, v, segment_ids=None, causal=c))
  bench("pallas_t5", S, 64, c, ours("pallas", True, c))
  bench("triton_t5", S, 64, c, ours("triton", True, c))
  bench("triton_none", S, 64, c, ours("triton", False, c))
  if S == 1024:
    for bs in (Bb(64, 64, 4, 2), Bb(64, 64, 8, 3), Bb(128, 64, 8, 3), Bb(64, 128, 8, 3), Bb(128, 128, 8, 2), Bb(64, 32, 4, 3), Bb(32, 64, 4, 3)):
      bench(f"triton_t5_bwd{bs.block_q_bwd}x{bs.block_k_bwd}w{bs.num_warps_bwd}s{bs.num_stages_bwd}", S, 64, c, ours("triton", True, c, bs))
for S in (1024, 2048):
  bench("cudnn_t5", S, 64, True, lambda q, k, v, t: jax.nn.dot_product_attention(q, k, v, bias=materialized_bias(t, q.shape[1], True).astype(q.dtype), is_causal=True, implementation="cudnn"))
  bench("pallas_t5", S, 64, True, ours("pallas", True, True))
  bench("triton_t5", S, 64, True, ours("triton", True, True))
  bench("pallas_t5", S, 128, False, ours("pallas", True, False))
  bench("triton_t5", S, 128, False, ours("triton", True, False))
print("DONE")
