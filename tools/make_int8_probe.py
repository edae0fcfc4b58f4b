"""Write ``edge/classify/int8_probe.onnx``: the 8-bit arithmetic check OpenVINO runs on each station.

One quantized 1x1 convolution (QDQ, as in the bundles' INT8 models): 64 input channels of 1.0 (8-bit +127,
unsigned 255 once shifted) times weights of +-127, so every pair of products sums to +-64,770. Exact 32-bit
sums give +-64 (on the output's 0.6 grid: +-64.2). Kernels that add pairs of products in 16 bits, as the fast
8-bit kernels of x86 CPUs with AVX2 but no VNNI do, saturate each pair at 32,767 and read about half
(+-32.4). Needs ``onnx`` (the workstation's ``export`` extra); the station only reads the file.

    python tools/make_int8_probe.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CHANNELS, OUTPUTS, SIDE = 64, 8, 4
OUT_SCALE = 0.6


def build():  # noqa: ANN201 - an onnx.ModelProto
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((OUTPUTS, CHANNELS, 1, 1), 127, np.int8)
    w[OUTPUTS // 2 :] = -127
    consts = {
        "x_scale": np.float32(1 / 255),
        "x_zero": np.int8(-128),  # x = 1.0 -> +127; unsigned kernels shift it to 255
        "w": w,
        "w_scale": np.float32(1 / 127),
        "w_zero": np.int8(0),
        "y_scale": np.float32(OUT_SCALE),
        "y_zero": np.int8(0),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, SIDE, SIDE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, OUTPUTS, SIDE, SIDE])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hemaedge")
    model.ir_version = 7  # readable by every ONNX Runtime and OpenVINO a station may have
    onnx.checker.check_model(model)
    return model


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "edge" / "classify" / "int8_probe.onnx"
    out.write_bytes(build().SerializeToString())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
