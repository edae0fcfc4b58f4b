"""Write ``edge/classify/int8_probe.onnx``: the 8-bit arithmetic check OpenVINO runs on each station.

Three quantized convolutions (QDQ, as in the bundles' INT8 models), one of each kind the shipped models use: a
pointwise (1x1) one, a full 3x3 one and a depthwise 3x3 one, each with its own quantize/dequantize pairs on the same
input. The input is 64 channels of 1.0 (8-bit +127, unsigned 255 once shifted), the weights +-127, so every pair of
products sums to +-64,770. Exact 32-bit sums give +-64 (on the output's 0.6 grid: 64.2), +-576 (575) and +-9.
Kernels that add pairs of products in 16 bits, as the fast 8-bit kernels of x86 CPUs with AVX2 but no VNNI do,
saturate each pair at 32,767 and read about half. Needs ``onnx`` (the workstation's ``export`` extra); the station
only reads the file.

    python tools/make_int8_probe.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

CHANNELS, SIDE = 64, 6
# name: (weight shape, groups, output scale)
CONVS = {
    "pointwise": ((8, CHANNELS, 1, 1), 1, 0.6),
    "conv3x3": ((8, CHANNELS, 3, 3), 1, 5.0),
    "depthwise": ((CHANNELS, 1, 3, 3), CHANNELS, 0.1),
}


def build():  # noqa: ANN201 - an onnx.ModelProto
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    consts = {"x_scale": np.float32(1 / 255), "x_zero": np.int8(-128), "zero": np.int8(0)}  # 1.0 -> +127
    nodes, outputs = [], []
    for name, (shape, groups, out_scale) in CONVS.items():
        w = np.full(shape, 127, np.int8)
        w[shape[0] // 2 :] = -127
        consts.update(
            {f"{name}_w": w, f"{name}_w_scale": np.float32(1 / 127), f"{name}_y_scale": np.float32(out_scale)}
        )
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], [f"{name}_xq"]),
            helper.make_node("DequantizeLinear", [f"{name}_xq", "x_scale", "x_zero"], [f"{name}_xd"]),
            helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_w_scale", "zero"], [f"{name}_wd"]),
            helper.make_node("Conv", [f"{name}_xd", f"{name}_wd"], [f"{name}_c"], group=groups),
            helper.make_node("QuantizeLinear", [f"{name}_c", f"{name}_y_scale", "zero"], [f"{name}_yq"]),
            helper.make_node("DequantizeLinear", [f"{name}_yq", f"{name}_y_scale", "zero"], [name]),
        ]
        side = SIDE - shape[2] + 1
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, shape[0], side, side]))
    graph = helper.make_graph(
        nodes,
        "int8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, SIDE, SIDE])],
        outputs,
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
