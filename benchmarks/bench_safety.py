"""NudeNet 320n throughput: the nudenet package's ``detect`` loop and ``detect_batch`` vs
resalign's ``nudenet`` scorer vs bare ``session.run`` on the same preprocessed batches (the floor).

    python benchmarks/bench_safety.py [--images 64] [--size 512] [--workers 0] [--batch-size 8] [--repeat 5] [--profile]

Rows:

* the package as shipped: ``NudeDetector()`` with its own default onnxruntime session (default
  options: intra-op threads = onnxruntime's default), ``detect`` per image and ``detect_batch``;
* the package with its session replaced by one with 1 intra-op thread (the scorer's setting when
  it runs several workers);
* the scorer with ``workers`` worker threads (0 = the CPUs this process may use) sharing its
  session (1 intra-op thread), and the floor: bare ``session.run`` calls on the preprocessed
  batches with the same threads, session and batches (preprocessing and decoding excluded);
* the scorer and the floor with 1 worker, same session settings.

Every path runs ``--repeat`` times, interleaved (a scorer next to its floor, the order flipped every
round); the best wall time of each is reported (other jobs on a shared machine only ever slow a run
down), with the least process CPU time per image, and the CPUs other processes kept busy meanwhile
(from /proc/stat). Checks that every path's detections equal the package's ``detect``, prints
images/s and ratios (among them the floor over the package as shipped: the most any scorer of this
model can reach against it), then one JSON line. ``--profile`` adds where a 1-thread session's time
goes, by operator type, and the convolutions' GFLOP/s on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512, help="square image side (SD v1 outputs are 512)")
    p.add_argument("--workers", type=int, default=0, help="scorer workers; 0 = the CPUs available")
    p.add_argument("--batch-size", type=int, default=8, help="scorer batch_size")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per path (best is reported)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one 1-thread session by operator type and print the convolutions' GFLOP/s")
    return p.parse_args()


def sample_images(n, size):
    """n RGB uint8 images (size × size): skimage samples, resized, cycled with flips."""
    import numpy as np
    from PIL import Image
    from skimage import data

    base = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.camera(), data.horse()]
    out = []
    for i in range(n):
        im = base[i % len(base)]
        if im.dtype == bool:
            im = im.astype(np.uint8) * 255
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        im = np.asarray(Image.fromarray(im.astype(np.uint8)).resize((size, size), Image.BILINEAR))
        if (i // len(base)) % 2:
            im = im[:, ::-1]
        out.append(np.ascontiguousarray(im))
    return np.stack(out)


def cpu_busy_seconds():
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def conv_flops_per_image(model_path, size=320):
    """2 × multiply-adds of every Conv node at batch 1 (onnx shape inference)."""
    import numpy as np
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, (1, 3, size, size)):
        dim.ClearField("dim_param")
        dim.dim_value = value
    model = shape_inference.infer_shapes(model)
    infos = list(model.graph.value_info) + list(model.graph.output)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in infos}
    weights = {w.name: list(w.dims) for w in model.graph.initializer}
    macs = sum(
        int(np.prod(shapes[node.output[0]][1:])) * int(np.prod(weights[node.input[1]][1:]))
        for node in model.graph.node
        if node.op_type == "Conv"
    )
    return 2.0 * macs


def profile_session(model_path, blob, runs=4):
    """Kernel time per image by operator type, of a 1-thread session (onnxruntime's profiler)."""
    import collections
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "ort")
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: blob})
        with open(session.end_profiling()) as fh:
            events = json.load(fh)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    images = runs * blob.shape[0]
    return {op: us / images / 1e3 for op, us in per_op.most_common()}  # ms per image


def main() -> None:
    args = parse_args()
    import numpy as np
    import onnxruntime as ort
    from nudenet import NudeDetector

    from resalign.scorers.nudenet import NudeNetScorer, available_cpus, packaged_detector_path

    images = sample_images(args.images, args.size)
    bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]  # the package treats arrays as BGR
    n = len(images)

    shipped = NudeDetector()  # the package's own session, default options
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    one_thread = NudeDetector()
    one_thread.onnx_session = ort.InferenceSession(
        str(packaged_detector_path()), options, providers=["CPUExecutionProvider"]
    )

    def scorer_for(workers):
        s = NudeNetScorer(
            NudeNetScorer.Config(
                workers=workers, threads=1, batch_size=args.batch_size, providers=("CPUExecutionProvider",)
            )
        )
        s.score(images[:2])  # sessions created outside the timing
        return s

    par = scorer_for(args.workers)
    seq = scorer_for(1)
    workers = par.workers

    def floor_for(scorer):
        blob, _, _ = scorer.preprocess(list(images))
        name = scorer.session.get_inputs()[0].name
        return lambda: scorer.map_batches(
            lambda session, chunk: session.run(None, {name: blob[chunk.start : chunk.stop]})[0], n
        )

    def as_package(result):
        return [
            [{"class": d["label"], "score": d["score"], "box": d["box"]} for d in row["detections"]]
            for row in result.per_image
        ]

    paths = {
        "package_detect_loop_default": lambda: [shipped.detect(im) for im in bgr],
        "package_detect_batch_default": lambda: shipped.detect_batch(bgr),
        "package_detect_loop_1thread": lambda: [one_thread.detect(im) for im in bgr],
        "package_detect_batch_1thread": lambda: one_thread.detect_batch(bgr),
        "resalign_scorer": lambda: as_package(par.score(images)),
        "session_run_floor": floor_for(par),
        "resalign_scorer_1worker": lambda: as_package(seq.score(images)),
        "session_run_floor_1worker": floor_for(seq),
    }
    for fn in paths.values():  # warm-up (first run of each session and batch shape)
        fn()
    best = {k: float("inf") for k in paths}
    cpu = {k: float("inf") for k in paths}
    values = {}
    # a scorer and its floor run back to back; the order flips every round
    order = ["resalign_scorer", "session_run_floor", *[k for k in paths if k.startswith("package")],
             "resalign_scorer_1worker", "session_run_floor_1worker"]
    busy0, own0, wall0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    for r in range(args.repeat):
        for k in order if r % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            values[k] = paths[k]()
            best[k] = min(best[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)

    busy1, own1, wall1 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    # CPUs kept busy by other processes while this ran, on average
    other_load = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)

    reference = values["package_detect_loop_default"]
    identical = all(v == reference for k, v in values.items() if not k.startswith("session_run"))
    ips = {k: n / t for k, t in best.items()}
    for k, v in ips.items():
        print(f"{k:30s} {v:7.2f} images/s  {cpu[k] / n * 1e3:6.2f} CPU ms/image")
    ratios = {
        "scorer_over_detect_loop_default": ips["resalign_scorer"] / ips["package_detect_loop_default"],
        "scorer_over_detect_loop_1thread": ips["resalign_scorer"] / ips["package_detect_loop_1thread"],
        "scorer_over_detect_batch_default": ips["resalign_scorer"] / ips["package_detect_batch_default"],
        "scorer_over_floor": ips["resalign_scorer"] / ips["session_run_floor"],
        "scorer_1worker_over_floor_1worker": (
            ips["resalign_scorer_1worker"] / ips["session_run_floor_1worker"]
        ),
        # the most any scorer that runs this model can reach against the package as shipped:
        # inference alone, at the scorer's layout
        "floor_over_detect_loop_default": ips["session_run_floor"] / ips["package_detect_loop_default"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    profile = None
    if args.profile:
        blob, _, _ = seq.preprocess(list(images[: args.batch_size]))
        per_op = profile_session(packaged_detector_path(), blob)
        total = sum(per_op.values())
        gflop = conv_flops_per_image(packaged_detector_path()) / 1e9
        print(f"1-thread session, kernel time per image: {total:.2f} ms")
        for op, ms in list(per_op.items())[:6]:
            print(f"  {op:14s} {ms:6.2f} ms  {100 * ms / total:5.1f} %")
        conv_gflops = gflop / (per_op.get("Conv", float("nan")) / 1e3)
        print(f"convolutions: {gflop:.3f} GFLOP per image, {conv_gflops:.1f} GFLOP/s on one core")
        profile = {"kernel_ms_per_image": round(total, 2), "conv_gflop_per_image": round(gflop, 3),
                   "conv_gflops_per_core": round(conv_gflops, 1),
                   "ms_per_image_by_op": {op: round(ms, 3) for op, ms in list(per_op.items())[:6]}}
    print(f"identical detections: {identical} ({sum(map(len, reference))} detections)")
    if other_load is not None:
        print(f"other processes kept {other_load:.2f} CPUs busy on average during the timed runs")
    print(
        json.dumps(
            {
                "benchmark": "safety",
                "images": n,
                "size": args.size,
                "workers": workers,
                "threads_per_worker": 1,
                "batch_size": args.batch_size,
                "chunk_sizes": sorted({len(c) for c in par.chunks(n)}),
                "repeat": args.repeat,
                # 0: onnxruntime's default (one thread per physical core)
                "package_intra_op_threads": shipped.onnx_session.get_session_options().intra_op_num_threads,
                "images_per_s": {k: round(v, 2) for k, v in ips.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "cpu_ms_per_image": {k: round(v / n * 1e3, 2) for k, v in cpu.items()},
                "identical_detections": identical,
                "profile": profile,
                "other_load_cpus": None if other_load is None else round(other_load, 2),
                "machine": {
                    "cpus": os.cpu_count(),
                    "cpus_available": available_cpus(),
                    "onnxruntime": ort.__version__,
                    "platform": platform.platform(),
                    "python": sys.version.split()[0],
                },
            }
        )
    )


if __name__ == "__main__":
    main()
