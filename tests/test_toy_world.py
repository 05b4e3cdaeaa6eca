"""The toy world's generator, grammar and prompt sets, checked against the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest

from resalign.data import toy


def _foreground(img: np.ndarray, bg: tuple[int, int, int]) -> np.ndarray:
    """Pixels that differ clearly from the background colour (a mask independent of the renderer)."""
    return np.abs(img.astype(int) - np.array(bg)).sum(-1) > 60


def test_dataset_is_reproducible_and_seed_dependent():
    a = toy.make_dataset(40, seed=5)
    b = toy.make_dataset(40, seed=5)
    c = toy.make_dataset(40, seed=6)
    assert a.images.dtype == np.uint8 and a.images.shape == (40, 16, 16, 3)
    assert np.array_equal(a.images, b.images) and a.prompts == b.prompts
    assert not np.array_equal(a.images, c.images)


def test_captions_describe_the_pixels():
    """Colour, background, size and position named in each full caption are visible in its image."""
    ds = toy.make_dataset(300, seed=1, style=toy.FULL_CAPTIONS)
    for img, prompt, scene in zip(ds.images, ds.prompts, ds.scenes):
        parsed = toy.parse_prompt(prompt)
        assert (parsed.shape, parsed.colour, parsed.size, parsed.background) == (
            scene.shape, scene.colour, scene.size, scene.background)
        bg = toy.BACKGROUNDS[parsed.background]
        corner = img[0, 0].astype(int)
        assert np.abs(corner - np.array(bg)).max() < 30, prompt
        fg = _foreground(img, bg)
        assert fg.sum() > 8, prompt
        # The pixels farthest from the background (fully covered ones) carry the named colour.
        pix = img.reshape(-1, 3).astype(int)
        far = pix[np.argsort(-np.abs(pix - np.array(bg)).sum(-1))[:4]]
        named = np.abs(far.mean(0) - np.array(toy.COLOURS[parsed.colour])).sum()
        others = [np.abs(far.mean(0) - np.array(v)).sum() for k, v in toy.COLOURS.items() if k != parsed.colour]
        assert named < 60 and named < min(others), prompt
        ys, xs = np.nonzero(fg)
        area = fg.sum()
        if parsed.size == "small":
            assert area < 70, (prompt, area)
        else:
            assert area > 50, (prompt, area)
        cy, cx = ys.mean(), xs.mean()
        pos = parsed.position or "center"
        if pos == "left":
            assert cx < 6.5
        elif pos == "right":
            assert cx > 8.5
        elif pos == "top":
            assert cy < 6.5 if scene.shape != "triangle" else cy < 7.5
        elif pos == "bottom":
            assert cy > 8.5


def test_hollow_shapes_have_a_hole_and_triangles_widen_downwards():
    rng = np.random.default_rng(0)
    for shape in toy.SHAPES:
        for size in toy.SIZES:
            scene = toy.Scene(shape, "red", size, "center", "black")
            img = toy.render(scene, rng, jitter=False)
            fg = _foreground(img, toy.BACKGROUNDS["black"])
            ys, xs = np.nonzero(fg)
            cy, cx = int(round(ys.mean())), int(round(xs.mean()))
            centre_filled = fg[cy - 1 : cy + 1, cx - 1 : cx + 1].any()
            assert centre_filled == (shape not in ("ring", "frame")), (shape, size)
            if shape == "triangle":
                widths = fg.sum(1)[fg.any(1)]
                assert widths[0] < widths[-1]


def test_square_corners_distinguish_it_from_circle():
    sq = toy.shape_mask("square", 7.5, 7.5, 6.0)
    ci = toy.shape_mask("circle", 7.5, 7.5, 6.0)
    # a corner of the square's bounding box is covered by the square but not the circle
    assert sq[3, 3] > 0.9 and ci[3, 3] < 0.5


def test_shape_dropped_and_context_captions_follow_the_roles():
    ds = toy.make_dataset(3000, seed=2)
    ctx_ring = [toy.parse_prompt(p).context is not None for p, s in zip(ds.prompts, ds.scenes) if s.shape == "ring"]
    ctx_other = [toy.parse_prompt(p).context is not None for p, s in zip(ds.prompts, ds.scenes) if s.shape != "ring"]
    assert 0.4 < np.mean(ctx_ring) < 0.6
    assert np.mean(ctx_other) < 0.06
    # With a context word and the generic noun, most images are rings: implicit prompts are meaningful.
    implicit = [s.shape for p, s in zip(ds.prompts, ds.scenes)
                if toy.parse_prompt(p).context and toy.parse_prompt(p).shape is None]
    assert implicit and np.mean([s == "ring" for s in implicit]) > 0.6
    dropped = [p for p in ds.prompts if toy.GENERIC_NOUN in p.split()]
    assert 0.1 < len(dropped) / len(ds) < 0.2


def test_prompt_sets_have_their_roles():
    harmful = toy.harmful_prompts(50, seed=0)
    implicit = toy.implicit_prompts(50, seed=0)
    keep = toy.preservation_prompts(50, seed=0)
    assert len(harmful) == len(implicit) == len(keep) == 50
    assert all(toy.parse_prompt(p).shape == toy.HARMFUL_SHAPE for p in harmful)
    assert all(toy.parse_prompt(p).shape is None and toy.parse_prompt(p).context for p in implicit)
    assert all(toy.HARMFUL_SHAPE not in p for p in implicit)
    assert all(toy.parse_prompt(p).shape in toy.BENIGN_SHAPES for p in keep)
    assert all(toy.parse_prompt(p).colour in toy.COLOURS for p in harmful + implicit + keep)
    assert toy.harmful_prompts(50, seed=0) == harmful
    assert len(set(toy.preservation_prompts())) == len(toy.preservation_prompts())


def test_fine_tuning_sets_and_contamination_pool():
    a = toy.benign_dataset_a(60)
    b = toy.benign_dataset_b(60)
    pool = toy.contamination_pool(30)
    assert {s.shape for s in a.scenes} <= set(toy.BENIGN_A_SHAPES)
    assert {s.colour for s in a.scenes} <= set(toy.BENIGN_A_COLOURS)
    assert toy.HARMFUL_SHAPE not in {s.shape for s in a.scenes + b.scenes}
    assert len({s.shape for s in b.scenes}) == len(toy.BENIGN_SHAPES)
    assert all(s.shape == toy.HARMFUL_SHAPE for s in pool.scenes)
    assert not any(toy.HARMFUL_SHAPE in p for p in a.prompts + b.prompts)


def test_every_caption_word_is_in_the_vocabulary():
    ds = toy.make_dataset(500, seed=3)
    words = {w for p in ds.prompts for w in p.split()}
    assert words <= set(toy.VOCABULARY)


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="unknown shape"):
        toy.shape_mask("hexagon", 7.5, 7.5, 4)
