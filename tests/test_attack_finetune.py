"""The downstream fine-tuning loop: each ADAPT method trains what it should, in the base space."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resalign.errors import ConfigError
from resalign.eval.protocol.attack import parse_escape
from resalign.eval.protocol.finetune import Finetuner, FinetuneSpec, Stage
from resalign.eval.protocol.pairs import Pairs, contaminate, encode_pairs


@pytest.fixture(scope="module")
def bundle(tiny_sd_dir):
    from resalign.models.bundle import T2IBundle

    return T2IBundle.load(tiny_sd_dir)


def _data(n=6, seed=0, word="dog"):
    rng = np.random.default_rng(seed)
    return Pairs(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), [f"a photo of a {word}"] * n, word)


def _run(bundle, adapt, steps=3, lr=1e-2, **kw):
    spec = FinetuneSpec(adapt=adapt, steps=steps, lr=lr, num_class_images=2, **kw)
    seen = {}
    ft = Finetuner(bundle, spec, [Stage(_data(), steps, "dog")], seed=0)
    out = ft.run(eval_every=2, on_eval=lambda step, p: seen.__setitem__(step, {k: v.clone() for k, v in p.items()}))
    return ft, seen, out


EXPECTED = {
    "full": lambda n: True,
    "dreambooth": lambda n: True,
    "custom_diffusion": lambda n: ".attn2.to_k." in n or ".attn2.to_v." in n,
    "lora": lambda n: n.endswith("weight") and any(f".{t}.weight" in n for t in ("to_q", "to_k", "to_v", "to_out.0")),
    "loha": lambda n: EXPECTED["lora"](n),
    "lokr": lambda n: EXPECTED["lora"](n),
    "svdiff": None,  # every Conv2d / Linear weight
}


@pytest.mark.parametrize("adapt", list(EXPECTED))
def test_method_changes_exactly_its_weights(bundle, adapt):
    before = {n: p.detach().clone() for n, p in bundle.unet.named_parameters()}
    ft, seen, out = _run(bundle, adapt)
    assert sorted(seen) == [0, 2, 3]  # step 0, every 2 steps, and the end
    assert set(out) == set(before)
    tol = 1e-5 if adapt == "svdiff" else 0.0  # SVD reconstruction rounding
    for n, p in before.items():  # step 0 is the released model
        assert torch.allclose(seen[0][n], p, atol=tol, rtol=0), n
        assert torch.equal(bundle.unet.get_parameter(n), p)  # the bundle is never modified
    changed = {n for n in before if not torch.allclose(out[n], before[n], atol=1e-4, rtol=0)}
    if adapt == "svdiff":
        mods = dict(bundle.unet.named_modules())
        want = {n for n in before if n.endswith(".weight")
                and isinstance(mods[n.rsplit(".", 1)[0]], (torch.nn.Linear, torch.nn.Conv2d))}
    else:
        want = {n for n in before if EXPECTED[adapt](n)}
    assert changed and changed <= want
    if adapt in ("lora", "loha", "lokr", "custom_diffusion"):
        assert changed == want
    assert len(ft.log.losses) == 3 and all(np.isfinite(ft.log.losses))


def test_attack_lora_is_the_simulated_lora_adapt(bundle):
    """``attack --adapt lora`` and Alg. 2's simulated LoRA ADAPT: one adapter, the same θ_FT for the same
    seed and data (one pair, so every batch is that pair; ε and t drawn in order from the seed)."""
    from resalign.components import DenoiseBatch, FinetuneConfig
    from resalign.core.functional import FunctionalUNet
    from resalign.losses._common import denoising_loss
    from resalign.registry import get_registry

    data, seed, steps = _data(n=1), 5, 3
    spec = FinetuneSpec(adapt="lora", steps=steps, lr=1e-2)
    ft = Finetuner(bundle, spec, [Stage(data, steps)], seed=seed)
    downstream = ft.run()

    adapter = get_registry().create("adapter", "lora", {"rank": 4, "alpha": 4.0})
    assert type(ft.adapter) is type(adapter)
    ctx, theta = ft.context()
    assert isinstance(ctx.model, FunctionalUNet)
    enc = encode_pairs(bundle, data)
    batch = DenoiseBatch(x0=enc.x0, cond=enc.cond)
    noise = torch.Generator().manual_seed(seed)
    cfg = FinetuneConfig(adapter="lora", lr=1e-2, steps=steps, optimizer="adamw", max_grad_norm=1.0, weight_decay=1e-2)
    simulated = adapter.adapt(theta, lambda p: denoising_loss(ctx, p, batch, noise), cfg,
                              generator=torch.Generator().manual_seed(seed))
    assert simulated.losses == ft.log.losses
    targets = adapter.targets(theta)
    for k, v in theta.items():
        delta = downstream[k] - v
        torch.testing.assert_close(delta, simulated.theta_ft[k] - v, atol=1e-6, rtol=0)
        if k in targets:  # a rank-4 update of each attention projection
            assert 0 < torch.linalg.matrix_rank(delta.reshape(delta.shape[0], -1).double(), rtol=1e-3) <= 4
        else:
            assert torch.equal(downstream[k], v)


def test_escape_term_pushes_weights_away(bundle):
    def distance(escape):
        spec = FinetuneSpec(adapt="full", steps=4, lr=1e-3, escape_p=2 if escape else None, escape_lambda=50.0)
        out = Finetuner(bundle, spec, [Stage(_data(), 4)], seed=3).run()
        return sum(float(((out[n] - p) ** 2).sum()) for n, p in bundle.unet.named_parameters()) ** 0.5

    assert distance(True) > 1.5 * distance(False)
    assert parse_escape("p=1,lambda=0.5") == (1, 0.5) and parse_escape("p=2") == (2, 0.5)
    for bad in ("p=3", "q=1", "p=x", "lambda=0.5"):
        with pytest.raises(ConfigError):
            parse_escape(bad)


def test_contamination_replaces_the_stated_share():
    benign, harmful = _data(20, 0, "dog"), _data(7, 1, "nude")
    mixed = contaminate(benign, harmful, 0.25, seed=0)
    assert len(mixed) == 20 and mixed.prompts.count("a photo of a nude") == 5
    for img, prompt in zip(mixed.images, mixed.prompts):
        pool = harmful.images if prompt.endswith("nude") else benign.images
        assert any(np.array_equal(img, p) for p in pool)
    assert contaminate(benign, harmful, 0.0).prompts == benign.prompts
    with pytest.raises(ConfigError):
        contaminate(benign, harmful, 1.5)


def test_stages_run_in_order_and_bad_specs_fail_early(bundle):
    spec = FinetuneSpec(adapt="full", steps=4, lr=1e-4)
    ft = Finetuner(bundle, spec, [Stage(_data(word="dog"), 2, "dogs"), Stage(_data(word="cat"), 3, "cats")])
    ft.run()
    assert ft.log.stages == ["dogs", "dogs", "cats", "cats", "cats"]
    for bad in (dict(adapt="dora"), dict(optimizer="lion"), dict(lr=-1.0), dict(escape_p=3)):
        with pytest.raises(ConfigError):
            FinetuneSpec(**bad).validate()
    with pytest.raises(Exception, match="no image-caption pairs"):
        Finetuner(bundle, spec, [Stage(Pairs(np.zeros((0, 16, 16, 3), np.uint8), []), 2)])
