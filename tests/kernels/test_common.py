"""pallas_kernels/common.py: the FFI form of a Triton launch and the launch switch's check (the launch itself needs
a GPU)."""

import zlib

import pytest

from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import func

from pallas_kernels import common


def test_a_legacy_triton_call_becomes_an_ffi_call_with_the_same_opaque():
  opaque = zlib.compress(bytes(range(256)) * 4)  # any bytes, NULs and non-UTF-8 included
  with mlir.make_ir_context(), ir.Location.unknown():
    module = ir.Module.create()
    with ir.InsertionPoint(module.body):
      vector = ir.RankedTensorType.get([4], ir.F32Type.get())
      function = func.FuncOp("f", ([vector], [vector]))
      with ir.InsertionPoint(function.add_entry_block()):
        call = mlir.custom_call("triton_kernel_call", result_types=[vector],
                                operands=[function.arguments[0]], backend_config=opaque, api_version=2)
        func.ReturnOp(call.results)
    common.as_ffi_call(call.results[0].owner)
    attributes = call.operation.attributes
    assert ir.StringAttr(attributes["call_target_name"]).value == "triton_kernel_call_ffi"
    assert ir.IntegerAttr(attributes["api_version"]).value == 4
    assert ir.StringAttr(ir.DictAttr(attributes["backend_config"])["opaque"]).value_bytes == opaque
    assert module.operation.verify()


def test_an_unknown_launch_is_one_clear_error_before_any_gpu_work(monkeypatch):
  monkeypatch.setattr(common, "TRITON_LAUNCH", "graph")
  with pytest.raises(ValueError, match="FAT5_TRITON_LAUNCH must be one of"):
    common.triton_call(kernel=None, out_shape=None, grid=(1,), num_warps=4, num_stages=2, interpret=False)
