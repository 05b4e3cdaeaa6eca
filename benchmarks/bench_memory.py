"""Memory of one ResAlign outer step (the ``sd`` preset) on Stable-Diffusion-shaped UNets, and its SD-1.5
(or, with ``--arch sdxl``, SDXL) projection.

Usage::

    python benchmarks/bench_memory.py [--widths 32,64,96] [--latents 8] [--J 1,3] [--optimizers adam,sgd]
                                      [--adapters full,lora] [--checkpointing] [--offload] [--json out.json]
                                      [--merge a.json,...] [--arch sd15|sdxl]

``--arch sdxl`` measures SDXL-shaped UNets instead: SDXL's config (three levels, transformer depths
1, 2 and 10, linear projections, 64-wide heads, cross-attention on 77 × 2048 hidden states of both
text encoders, the ``text_time`` added embedding of a 1280-wide pooled embedding and 6 time ids)
with block widths (w, 2w, 4w) and those text widths scaled by w / 320, conditioned by a :class:`~resalign.components.Conditioning`, under the
``sdxl`` preset; the projection is SDXL's UNet (2.6 B parameters) at 128 × 128 latents (1024 px),
in fp32 and with bf16 autocast (saved activations counted with the UNet in bf16, plus autocast's
bf16 copy of W, half a copy of fp32 W).

Each measurement runs in a fresh process (a process's resident set never shrinks back to what it
was): an SD-1.5 UNet config (four levels, two layers each, cross-attention on 77 × 768 text
embeddings) with block widths (w, 2w, 4w, 4w), random init, on random latents of the given size; the
``sd`` preset's settings (full θ, Gauss–Newton curvature on ``curvature_samples`` pairs, Richardson
K = 5, harm/preserve/fine-tuning batches of 4) with a pool of one configuration (the optimizer and
ADAPT method asked for, 2 steps: memory does not grow with the step count). Two outer steps run;
the second (outer AdamW moments and Richardson's warm-start vector already exist) is measured. A
thread samples the resident set size every millisecond and keeps the peak of each stage:

* ``losses`` — L_harm(θ) and R(θ) with their graphs (Eq. 3's first two terms);
* ``adapt`` — the simulated fine-tuning θ_FT = ADAPT(θ, D_FT, C);
* ``problem`` — L_FT before/after, g = ∇L_harm(θ_FT), the health checks;
* ``solve`` — Richardson: the curvature's graph, λ_max, the K products;
* ``pullback`` — the VJP of W(θ) with the mean hypergradient; ``update`` — the outer AdamW step.

``--offload`` keeps the outer AdamW moments in host memory between updates (``offload_outer_state``)
and puts every host-held tensor (those moments, the finished hypergradients, Richardson's warm-start
eigenvector) in shared memory (``RESALIGN_HOST_MEMORY=shared``): the peaks count the anonymous
pages only, which is what one accelerator would hold, and the host side is printed apart.

Copies of W in a stage = (peak − resident set before the UNet was built) / (4 bytes × parameters),
activations included. The fit, per stage over every size, is peak = a + c · 4P + b · A with A the
activation bytes that one training step's graph saves at batch 1 (counted with saved-tensor hooks):
c is the stage's copies of W, b its activation multiple. SD-1.5's P and A (64 × 64 latents, 512 px)
are counted on the meta device from its config, so the projection needs no weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

#: glibc returns freed blocks above 64 KiB to the system at once (its adaptive threshold would keep
#: them mapped), so the resident set follows the tensors alive rather than its own high-water mark
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
STAGES = ("losses", "adapt", "problem", "solve", "pullback", "update")
SD15 = {"width": 320, "latent": 64}
SDXL = {"width": 320, "latent": 128}
#: SDXL's text widths: both encoders' hidden states side by side, the second's pooled projection
SDXL_TEXT, SDXL_POOLED, SDXL_TIME_DIM = 2048, 1280, 256


def unet_config(width: int, latent: int) -> dict:
    """SD-1.5's UNet2DConditionModel config with block widths (w, 2w, 4w, 4w)."""
    return dict(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def sdxl_text_widths(width: int) -> tuple[int, int, int]:
    """(hidden-state width, pooled width, time-id features) of an SDXL-shaped UNet of block width w:
    SDXL's (2048, 1280, 256) at w = 320, scaled with w below it (multiples of 64, 64 and 8)."""
    if width >= 320:
        return SDXL_TEXT, SDXL_POOLED, SDXL_TIME_DIM
    return (max(64, SDXL_TEXT * width // 320 // 64 * 64), max(64, SDXL_POOLED * width // 320 // 64 * 64),
            max(8, SDXL_TIME_DIM * width // 320 // 8 * 8))


def sdxl_unet_config(width: int, latent: int) -> dict:
    """SDXL's UNet2DConditionModel config with block widths (w, 2w, 4w) (SDXL: w = 320), its text
    widths scaled with w (:func:`sdxl_text_widths`)."""
    text, pooled, time_dim = sdxl_text_widths(width)
    return dict(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=tuple(max(1, c // 64) for c in (width, 2 * width, 4 * width)),
        use_linear_projection=True, cross_attention_dim=text, norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled,
    )


def arch_config(arch: str, width: int, latent: int) -> dict:
    return sdxl_unet_config(width, latent) if arch == "sdxl" else unet_config(width, latent)


def random_cond(arch: str, n: int, generator=None, device="cpu", zeros: bool = False, width: int = 320):
    """Text conditioning of ``n`` samples: (n, 77, 768) hidden states, or the Conditioning of an
    SDXL-shaped UNet of block width ``width``."""
    import torch

    from resalign.components import Conditioning

    def make(*shape):
        return torch.zeros(*shape, device=device) if zeros else torch.randn(*shape, generator=generator).to(device)

    if arch != "sdxl":
        return make(n, 77, 768)
    text, pooled, _ = sdxl_text_widths(width)
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device).expand(n, 6)
    return Conditioning(make(n, 77, text), make(n, pooled), ids)


def rss() -> int:
    """The process's anonymous resident pages: what an accelerator would hold. Host-held tensors
    (``--offload``) sit in shared memory and are counted apart (:func:`host_rss`)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * 4096


def host_rss() -> int:
    """Resident shared memory (``RssShmem``): the host side under ``--offload``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


class StagePeaks:
    """The resident set's peak per stage, sampled by a thread; ``stage`` names the current one."""

    def __init__(self):
        self.stage, self.peaks, self.host_peaks, self._stop = None, {}, {}, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            stage = self.stage
            if stage is not None:
                self.peaks[stage] = max(self.peaks.get(stage, 0), rss())
                self.host_peaks[stage] = max(self.host_peaks.get(stage, 0), host_rss())
            time.sleep(0.001)

    def set(self, stage):
        if self.stage is not None:  # the last sample of the stage that ends
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss())
        self.stage = stage

    def stop(self):
        self.set(None)
        self._stop = True
        self._thread.join()


def activation_bytes(unet, latent: int, device: str = "cpu", arch: str = "sd15") -> int:
    width = unet.config.block_out_channels[0]
    """Bytes of the tensors one training step's graph saves at batch 1 (parameters excluded)."""
    import torch

    params = {id(p) for p in unet.parameters()}
    seen: dict[tuple, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if device != "meta" else (id(base),)
            seen[key] = base.untyped_storage().nbytes() if device != "meta" else base.numel() * base.element_size()
        return t

    from resalign.components import unet_kwargs

    unet.requires_grad_(True)
    dtype = next(unet.parameters()).dtype
    x = torch.zeros(1, 4, latent, latent, device=device, dtype=dtype)
    cond = random_cond(arch, 1, device=device, zeros=True, width=width).to(dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, torch.tensor([500], device=device), **unet_kwargs(cond), return_dict=False)[0]
    del out
    unet.requires_grad_(False)
    return int(sum(seen.values()))


def sd15_counts(arch: str = "sd15") -> dict:
    """SD-1.5's (SDXL's) parameter count and activation bytes at 64 × 64 (128 × 128) latents, on the
    meta device; ``activation_bytes_bf16`` counts them with the UNet in bf16."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    full = SDXL if arch == "sdxl" else SD15
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch_config(arch, full["width"], full["latent"]))
    with sdpa_kernel(SDPBackend.MATH):
        act = activation_bytes(unet, full["latent"], device="meta", arch=arch)
        act16 = activation_bytes(unet.to(torch.bfloat16), full["latent"], device="meta", arch=arch)
    return {"params": sum(p.numel() for p in unet.parameters()), "activation_bytes": act,
            "activation_bytes_bf16": act16}


def child(args) -> None:
    """One measurement (one process): print a JSON line of peaks per stage."""
    base = rss()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from resalign.adapters.base import MergedAdapter
    from resalign.components import DiffusionContext
    from resalign.core.functional import FunctionalUNet
    from resalign.core.meta import (
        ConfigPool,
        MethodSettings,
        PairSet,
        ResAlign,
        TrainingData,
    )
    from resalign.core.params import Parameterization
    from resalign.models.diffusion import NoiseSchedule
    from resalign.settings.presets import PRESETS
    from resalign.registry import get_registry

    before_model, host_before = rss(), host_rss()
    unet = UNet2DConditionModel(**arch_config(args.arch, args.width, args.latent)).requires_grad_(False).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        act = activation_bytes(unet, args.latent, arch=args.arch)
    model = FunctionalUNet(unet, checkpointing=args.checkpointing)
    schedule = NoiseSchedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                          beta_start=0.00085, beta_end=0.012))
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        return PairSet(torch.randn(n, 4, args.latent, args.latent, generator=g),
                       random_cond(args.arch, n, g, width=args.width), [f"p{i}" for i in range(n)])

    ctx = DiffusionContext(model, model.base_params(), schedule, random_cond(args.arch, 1, g, width=args.width))
    data = TrainingData(harmful=pairs(8), preserve=pairs(8), finetune=pairs(8))
    sd = PRESETS["sdxl" if args.arch == "sdxl" else "sd"].run
    extra = {"curvature_samples": sd["curvature_samples"]} if "curvature_samples" in sd else {}
    settings = MethodSettings(beta=sd["beta"], alpha=sd["alpha"], J=args.J, outer_lr=sd["outer_lr"],
                              harm_batch=sd["harm_batch"], preserve_batch=sd["preserve_batch"], ft_size=sd["ft_size"],
                              curvature=sd["curvature"], max_ft_loss_growth=None, outlier_factor=0.0, outer_steps=2,
                              offload_outer_state=args.offload, **extra)
    pool = ConfigPool(lrs=[1e-5], steps=[2], optimizers=[args.optimizer], finetune_losses=["denoise"],
                      adapters=[args.adapter], batch_size=1, max_lr_steps=0.0,
                      adapter_options={"lora": {"rank": 4, "alpha": 4.0}})
    reg = get_registry()
    trainer = ResAlign(ctx, Parameterization(args.params or sd["params"], ctx.theta0), harmful_loss=reg.create("harmful-loss", "ga"),
                       regularizer=reg.create("regularizer", "distill"), solver=reg.create("solver", "richardson"),
                       pool=pool, data=data, settings=settings, registry=reg)
    peaks = StagePeaks()

    def staged(obj, name, during, after):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            peaks.set(during)
            try:
                return fn(*a, **kw)
            finally:
                peaks.set(after)
        setattr(obj, name, wrapper)

    staged(MergedAdapter, "adapt", "adapt", "problem")
    staged(trainer.solver, "solve", "solve", "problem")
    staged(trainer, "hypergradient", "losses", "pullback")
    staged(trainer.optimizer, "step", "update", None)
    trainer.outer_step()  # the outer moments and the warm-start vector now exist
    peaks.peaks.clear()
    peaks.set("losses")
    t0 = time.perf_counter()
    trainer.outer_step()
    seconds = time.perf_counter() - t0
    peaks.stop()
    print(json.dumps({"arch": args.arch, "params_kind": args.params or sd["params"], "width": args.width, "latent": args.latent, "J": args.J, "optimizer": args.optimizer,
                      "checkpointing": args.checkpointing, "offload": args.offload,
                      "adapter": args.adapter, "params": n_params, "activation_bytes": act, "seconds": seconds,
                      "base_rss": before_model, "process_rss_at_start": base,
                      "peaks": {k: v - before_model for k, v in peaks.peaks.items()},
                      "host_peaks": {k: v - host_before for k, v in peaks.host_peaks.items()}}))


def show(row: dict) -> None:
    copies = {k: round(v / (4 * row["params"]), 2) for k, v in row["peaks"].items()}
    print(f"w={row['width']:<4} latent={row['latent']:<3} P={row['params'] / 1e6:6.1f}M  J={row['J']} "
          f"{row['optimizer']:<4} {row['adapter']:<4} peak {max(row['peaks'].values()) / 2**30:5.2f} GiB  "
          f"copies of W per stage {copies}  ({row['seconds']:.0f} s)", flush=True)
    if row.get("offload"):
        host = {k: round(v / (4 * row["params"]), 2) for k, v in row["host_peaks"].items()}
        print(f"    held in host memory per stage (copies of W) {host}", flush=True)


def fit(rows: list[dict], stage: str):
    """Least squares peak = a + c·4P + b·A over the rows; returns (a, c, b)."""
    import numpy as np

    x = np.array([[1.0, 4.0 * r["params"], r["activation_bytes"]] for r in rows])
    y = np.array([r["peaks"][stage] for r in rows], dtype=float)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(float(c) for c in coef)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", default="32,64,96", help="block widths w of (w, 2w, 4w, 4w); SD-1.5 is 320")
    ap.add_argument("--latents", default="8", help="latent sizes (comma-separated), every width")
    ap.add_argument("--extra", default="32x16", help="further WIDTHxLATENT points (separate P from activations)")
    ap.add_argument("--J", default="1,3")
    ap.add_argument("--optimizers", default="adam,sgd")
    ap.add_argument("--adapters", default="full,lora")
    ap.add_argument("--json", default=None, help="write every measurement and the fit here")
    ap.add_argument("--merge", default=None, help="also fit the measurements of these earlier --json files (comma-separated)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute the UNet blocks in the backward passes")
    ap.add_argument("--offload", action="store_true",
                    help="outer AdamW moments in host memory between updates (offload_outer_state); host-held "
                         "tensors in shared memory, so that the peaks count only what an accelerator holds")
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sdxl"],
                    help="UNet shape measured and projected: SD-1.5's (512 px) or SDXL's (1024 px)")
    ap.add_argument("--params", default=None, choices=["full", "xattn", "lora"], help="θ (default: the preset's)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--latent", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="adam", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", default="full", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.J = int(args.J)
        child(args)
        return

    points = [(int(w), int(lat)) for w in args.widths.split(",") if w for lat in args.latents.split(",")]
    points += [tuple(int(v) for v in p.split("x")) for p in args.extra.split(",") if p]
    runs = [(w, lat, int(j), o, a) for (w, lat) in points for j in args.J.split(",")
            for o in args.optimizers.split(",") for a in args.adapters.split(",")]
    rows = [r for f in (args.merge or "").split(",") if f for r in json.loads(Path(f).read_text())["rows"]]
    for w, lat, j, o, a in runs:
        cmd = [sys.executable, __file__, "--child", "--width", str(w), "--latent", str(lat), "--J", str(j),
               "--optimizer", o, "--adapter", a, "--arch", args.arch] + (["--params", args.params] if args.params else []) \
            + (["--checkpointing"] if args.checkpointing else []) \
            + (["--offload"] if args.offload else [])
        env = {**MALLOC_ENV, **({"RESALIGN_HOST_MEMORY": "shared"} if args.offload else {})}
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"measurement {w}x{lat} J={j} {o} {a} failed")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        show(row)

    if args.merge:
        print("merged:")
        for row in rows[: len(rows) - len(runs)]:
            show(row)
    rows = [r for r in rows if r.get("arch", "sd15") == args.arch]
    sd = sd15_counts(args.arch)
    name, full = ("SDXL", SDXL) if args.arch == "sdxl" else ("SD-1.5", SD15)
    print(f"{name} UNet: {sd['params'] / 1e6:.0f}M parameters, {sd['activation_bytes'] / 2**30:.2f} GiB of saved "
          f"activations per training step at {full['latent']}x{full['latent']} latents, batch 1 "
          f"({sd['activation_bytes_bf16'] / 2**30:.2f} GiB in bf16; meta device)")
    report = {"rows": rows, "arch": args.arch, "sd15" if args.arch == "sd15" else "sdxl": sd, "fits": {}}
    for j in sorted({r["J"] for r in rows}):
        for o in sorted({r["optimizer"] for r in rows}):
            for a in sorted({r["adapter"] for r in rows}):
                sub = [r for r in rows if (r["J"], r["optimizer"], r["adapter"]) == (j, o, a)]
                if len({(r["params"], r["activation_bytes"]) for r in sub}) < 3:
                    continue
                proj, proj16, parts = {}, {}, {}
                for stage in STAGES:
                    if not all(stage in r["peaks"] for r in sub):
                        continue
                    a0, c, b = fit(sub, stage)
                    proj[stage] = a0 + c * 4 * sd["params"] + b * sd["activation_bytes"]
                    # bf16 autocast: fp32 master weights and state, bf16 saved activations, autocast's bf16 W
                    proj16[stage] = a0 + (c + 0.5) * 4 * sd["params"] + b * sd["activation_bytes_bf16"]
                    parts[stage] = {"copies_of_W": round(c, 2), "activation_multiple": round(b, 2),
                                    "constant_gib": round(a0 / 2**30, 3)}
                peak_stage = max(proj, key=proj.get)
                key = f"J={j} {o} {a}"
                report["fits"][key] = {"stages": parts, "projected_gib": {k: v / 2**30 for k, v in proj.items()},
                                       "projected_bf16_gib": {k: v / 2**30 for k, v in proj16.items()}}
                print(f"{key}: fit per stage (copies of W, activation multiple): "
                      + ", ".join(f"{s} {p['copies_of_W']}/{p['activation_multiple']}" for s, p in parts.items()))
                where = "device memory, host-held tensors apart" if args.offload else "one memory"
                px = 8 * full["latent"]
                print(f"  projected {name} ({px} px, batch 1, fp32, checkpointing {'on' if args.checkpointing else 'off'}, "
                      f"{where}): peak {proj[peak_stage] / 1e9:.1f} GB "
                      f"({proj[peak_stage] / 2**30:.1f} GiB) in stage {peak_stage}")
                peak16 = max(proj16, key=proj16.get)
                print(f"  projected {name} with bf16 autocast (fp32 master weights): peak {proj16[peak16] / 1e9:.1f} GB "
                      f"({proj16[peak16] / 2**30:.1f} GiB) in stage {peak16}")
    for o in sorted({r["optimizer"] for r in rows}):
        for a in sorted({r["adapter"] for r in rows}):
            one, many = report["fits"].get(f"J=1 {o} {a}"), [k for k in report["fits"] if k.endswith(f" {o} {a}")]
            if one is None:
                continue
            for key in many:
                if key.startswith("J=1 ") or args.offload:  # offloaded: the fits already count the device only
                    continue
                gib = max(one["projected_gib"].values())
                # on a GPU a finished hypergradient waits in host memory (core/meta.py): the device holds
                # what J = 1 holds, the host J − 1 vectors more; on this CPU both are one memory
                print(f"  {key} on one GPU (finished hypergradients in host memory): device peak = the J=1 fit's, "
                      f"{gib * 2**30 / 1e9:.1f} GB ({gib:.1f} GiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
