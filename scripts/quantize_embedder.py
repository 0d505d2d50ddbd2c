"""Make the static int8 embedder (into matcher.face.models.VARIANT_DIR) from the packaged fp32 one.

    python scripts/quantize_embedder.py --lfw ../shared/data/lfw-dev \
        [--out ~/.cache/matcher/models/w600k_mbf_int8.onnx]

Steps, each chosen by measurement (the report of issue 13 has the figures):

1. The fp32 graph as matcher.face.models finds it (sha256-checked), batch made symbolic.
2. PRelu rewritten as ``Relu(x) + slope * Min(x, 0)``: the same function, but ONNX
   Runtime's PRelu kernel broadcasts a (C, 1, 1) slope element by element and took ~45 %
   of the fp32 run time; Relu/Min/Mul/Add take the vectorised paths and Relu fuses into
   QLinearConv.
3. Activation ranges calibrated on aligned 112x112 crops of lfw-dev people who have one
   photo and appear in no pair of pairs.txt (``calibration_identities``); the accuracy
   comparison leaves those people out. The crops are made by matcher.face.pipeline (the served
   detector and alignment) and kept in memory only.
4. Static quantisation, QOperator format, per-channel int8 weights and uint8 activations
   (U8S8, the operand types of VNNI's vpdpbusd), min/max ranges as a moving average over
   batches of 16 (clips rare outliers; the plain min/max lost accuracy); the nodes
   ``keep_fp32`` lists stay fp32.

Prints the output's sha256: pin it as models.EMBEDDER_INT8_SHA256.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from matcher.face.models import EMBEDDER_INT8_FILE, VARIANT_DIR, _with_dynamic_batch, default_pack  # noqa: E402
from matcher.face.pipeline import Pipeline  # noqa: E402

log = logging.getLogger("quantize_embedder")

DEFAULT_OUT = VARIANT_DIR / EMBEDDER_INT8_FILE  # where matcher.face.models looks for it
CALIBRATION_PEOPLE = 400
SEED = 0


# -- calibration data --------------------------------------------------------------------

def calibration_identities(folder: Path, count: int = CALIBRATION_PEOPLE,
                           seed: int = SEED) -> list[str]:
    """``count`` people with exactly one photo in labels.csv and in no pair of pairs.txt.

    A one-photo person adds only impostor pairs to calibrate's statistics and nothing to
    the LFW pairs protocol, so leaving them out of the accuracy comparison costs least.
    """
    with open(folder / "labels.csv", newline="") as f:
        photos = Counter(r["identity"] for r in csv.DictReader(f))
    in_pairs: set[str] = set()
    for line in (folder / "pairs.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            in_pairs.add(parts[0])
        elif len(parts) == 4:
            in_pairs.update((parts[0], parts[2]))
    eligible = sorted(n for n, k in photos.items() if k == 1 and n not in in_pairs)
    if len(eligible) < count:
        raise SystemExit(f"only {len(eligible)} eligible people in {folder}, need {count}")
    return sorted(np.random.default_rng(seed).permutation(eligible)[:count].tolist())


def aligned_crops(folder: Path, identities: list[str], pipeline: Pipeline) -> np.ndarray:
    """(n, 3, 112, 112) float32 embedder inputs: the face nearest the centre of each photo
    of ``identities``, detected and aligned exactly as served."""
    wanted = set(identities)
    with open(folder / "labels.csv", newline="") as f:
        files = [r["file"] for r in csv.DictReader(f) if r["identity"] in wanted]
    blobs = []
    for file in files:
        image = pipeline.decode((folder / file).read_bytes())
        found = pipeline.detect(image)
        if not len(found):
            continue
        centre = np.array([image.shape[1] / 2, image.shape[0] / 2])
        middles = (found.boxes[:, :2] + found.boxes[:, 2:]) / 2
        best = int(np.argmin(((middles - centre) ** 2).sum(axis=1)))
        blobs.append(pipeline.align(image, found.kps[best:best + 1]))
    log.info("%d calibration crops from %d people", len(blobs), len(identities))
    return np.concatenate(blobs)


# -- graph preparation -------------------------------------------------------------------

def rewrite_prelu(model: onnx.ModelProto) -> int:
    """PRelu(x, a) -> Relu(x) + a * Min(x, 0), in place; returns how many were rewritten."""
    graph = model.graph
    zero = numpy_helper.from_array(np.zeros((), np.float32), "prelu_zero")
    graph.initializer.append(zero)
    nodes = []
    count = 0
    for node in graph.node:
        if node.op_type != "PRelu":
            nodes.append(node)
            continue
        x, slope = node.input
        y = node.output[0]
        base = node.name or y
        nodes += [
            helper.make_node("Relu", [x], [f"{base}_pos"], name=f"{base}_relu"),
            helper.make_node("Min", [x, zero.name], [f"{base}_neg"], name=f"{base}_min"),
            helper.make_node("Mul", [f"{base}_neg", slope], [f"{base}_negs"],
                             name=f"{base}_mul"),
            helper.make_node("Add", [f"{base}_pos", f"{base}_negs"], [y], name=f"{base}_add"),
        ]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def split_grouped_conv(model: onnx.ModelProto, name: str) -> None:
    """A grouped conv with 2 input and 2 output channels per group -> two depthwise convs.

    ``out[c] = W[c, c % 2] * in[c] + W[c, 1 - c % 2] * in[c ^ 1]`` (+ bias): a depthwise
    conv of the input plus a depthwise conv of the input with neighbouring channels
    swapped (one Gather). ONNX Runtime has fast depthwise kernels (fp32 and int8) but
    none for 2-channel groups: w600k_mbf's Conv_2 (128 channels, 64 groups, 56x56) was the
    slowest node in fp32 and 3x slower again as QLinearConv.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    index = next(i for i, n in enumerate(graph.node) if n.name == name)
    node = graph.node[index]
    weight = numpy_helper.to_array(inits[node.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    channels, per_group = weight.shape[:2]
    if per_group != 2 or attrs.get("group") * 2 != channels:
        raise ValueError(f"{name} is not a 2-channels-per-group conv: weight {weight.shape}, "
                         f"group {attrs.get('group')}")
    c = np.arange(channels)
    diagonal = weight[c, c % 2][:, None]          # (C, 1, kh, kw)
    across = weight[c, 1 - c % 2][:, None]
    swap = c ^ 1
    x, y = node.input[0], node.output[0]
    graph.initializer.extend([
        numpy_helper.from_array(diagonal.astype(np.float32), f"{name}_w_diag"),
        numpy_helper.from_array(across.astype(np.float32), f"{name}_w_across"),
        numpy_helper.from_array(swap.astype(np.int64), f"{name}_swap")])
    conv_attrs = {**attrs, "group": channels}
    bias = list(node.input[2:3])
    new = [
        helper.make_node("Conv", [x, f"{name}_w_diag", *bias], [f"{name}_diag"],
                         name=f"{name}_diag", **conv_attrs),
        helper.make_node("Gather", [x, f"{name}_swap"], [f"{name}_swapped"],
                         name=f"{name}_gather", axis=1),
        helper.make_node("Conv", [f"{name}_swapped", f"{name}_w_across"], [f"{name}_across"],
                         name=f"{name}_across", **conv_attrs),
        helper.make_node("Add", [f"{name}_diag", f"{name}_across"], [y], name=f"{name}_sum"),
    ]
    del graph.node[index]
    for offset, n in enumerate(new):
        graph.node.insert(index + offset, n)


def fp32_source() -> bytes:
    """The packaged fp32 embedder, sha256-checked, batch made symbolic."""
    return _with_dynamic_batch(default_pack().embedder.verify())


class Crops:
    """onnxruntime CalibrationDataReader over the crops, ``batch`` at a time."""

    def __init__(self, blobs: np.ndarray, input_name: str, batch: int = 16) -> None:
        self._batches = iter([{input_name: blobs[i:i + batch]}
                              for i in range(0, len(blobs), batch)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def quantize(model: onnx.ModelProto, blobs: np.ndarray, out: Path, *, fmt: str,
             exclude: list[str], method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "fp32-pre.onnx"
        onnx.save(model, raw)
        # Shape inference + ORT's basic fusions, as the quantiser expects.
        quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(out), Crops(blobs, model.graph.input[0].name),
            quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax,
                              "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                           "CalibMovingAverage": method == "minmax"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", type=Path, required=True, help="lfw-dev folder (labels.csv, pairs.txt)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--people", type=int, default=CALIBRATION_PEOPLE)
    p.add_argument("--format", choices=("qdq", "qoperator"), default="qoperator",
                   help="QOperator ran 6-8%% faster than QDQ at the same accuracy")
    p.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    p.add_argument("--keep-prelu", action="store_true", help="do not rewrite PRelu")
    p.add_argument("--keep-grouped", action="store_true", help="do not split Conv_2")
    p.add_argument("--save-fp32", type=Path, help="also write the rewritten fp32 graph here")
    p.add_argument("--exclude", nargs="*", default=None,
                   help="node names kept fp32 (default: keep_fp32())")
    p.add_argument("--crops-cache", type=Path,
                   help="keep/reuse the calibration crops here (.npy; never commit it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    if args.crops_cache and args.crops_cache.exists():
        blobs = np.load(args.crops_cache)
    else:
        blobs = aligned_crops(args.lfw, calibration_identities(args.lfw, args.people),
                              Pipeline(threads=2))
        if args.crops_cache:
            np.save(args.crops_cache, blobs)
    # Opset 13 at least: per-channel Q/DQ (the axis attribute) needs it; the file has 11.
    model = onnx.version_converter.convert_version(
        onnx.load_model_from_string(fp32_source()), 13)
    if not args.keep_prelu:
        log.info("rewrote %d PRelu nodes", rewrite_prelu(model))
    if not args.keep_grouped:
        split_grouped_conv(model, "Conv_2")
    if args.save_fp32:
        onnx.save(model, args.save_fp32)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    quantize(model, blobs, args.out, fmt=args.format,
             exclude=keep_fp32(model) if args.exclude is None else args.exclude,
             method=args.method)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out} sha256 {digest}")
    return 0


def keep_fp32(model: onnx.ModelProto) -> list[str]:
    """Nodes left in fp32, each group measured (cosine to fp32 templates on held-out crops,
    CPU ms per face, interleaved):

    - the PRelu rewrite (Relu/Min/Mul/Add): as QLinearMul/QLinearAdd with a quantised
      slope it cost accuracy and no time was saved (median cosine 0.983 -> 0.990);
    - every depthwise conv, including the two halves of the split Conv_2: int8 depthwise
      saved ~0.6 ms a face but lowered the 1st-percentile cosine 0.985 -> 0.991;
    - the first conv (3 input channels: its bias did not fit the int8 scale), the last two
      1x1 convs and the final Gemm: the template itself, for a little accuracy at no cost.
    """
    keep = ["Conv_0", "Conv_91", "Conv_93", "Gemm_96", "Conv_2_gather", "Conv_2_sum"]
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            keep.append(node.name)
        elif node.name.startswith("PRelu_"):  # the rewritten PRelu nodes
            keep.append(node.name)
    return keep

if __name__ == "__main__":
    sys.exit(main())
