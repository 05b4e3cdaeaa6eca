"""Property-based tests of every parser of user input: whatever the input, the only exceptions that
escape are resalign's own (:class:`ResAlignError` subclasses), each with a one-line message."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resalign.errors import ResAlignError

MANY = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)

#: Characters that matter to the formats parsed here, mixed with arbitrary text.
SYNTAX = "=.,[]{}\"'#:\n\r\t \\-+_0123456789eEnaifINFtrul\x00\ufeff"
texts = st.text(alphabet=st.sampled_from(SYNTAX), max_size=40) | st.text(max_size=30)
scalars = (st.integers(-3, 2**40) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
           | st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)

RUN_KEYS = ["preset", "model", "loss", "loss_options", "regularizer", "regularizer_options", "solver",
            "solver_options", "adapt", "params", "params_options", "beta", "alpha", "alpha_schedule", "alpha_end",
            "gamma", "curvature", "gamma_rule", "max_ft_loss_growth", "outlier_factor", "J", "outer_steps",
            "outer_lr", "weight_decay", "max_grad_norm", "harm_batch", "preserve_batch", "ft_size", "pool", "data",
            "seed", "device", "dtype", "threads", "checkpoint_every", "keep_checkpoints", "fixed_ft_data"]
NESTED_KEYS = ["pool.lrs", "pool.steps", "pool.optimizers", "pool.batch_size", "pool.max_lr_steps",
               "pool.lrs_by_optimizer.adam", "pool.adapters", "pool.adapter_options.lora.rank",
               "pool.adapter_options.lora", "pool.adapter_options", "regularizer_options",
               "solver_options.K", "solver_options.omega", "solver_options.tol", "loss_options.cap",
               "params_options.rank", "params_options.alpha", "data.sample_steps", "data.guidance",
               "data.gen_steps", "data.gen_guidance",
               "data.images_per_prompt", "data.concept", "data.harmful", "data.preserve"]
keys = st.sampled_from(RUN_KEYS + NESTED_KEYS) | st.text(max_size=8)
#: TOML values the way a user types them after ``KEY=``.
toml_values = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-3", "1e400", "true", "[1, 2]", "[]",
                               "{a = 1}", "\"x\"", "'cpu'", "cuda:9", "tpu", "[[1]]", "[0.0]", "0x10",
                               "1979-05-27", "\"\"\"a\nb\"\"\"", "1\nbeta = 2"]) | texts


def _only_own_errors(fn, *args, **kwargs):
    """Call ``fn``; a ResAlignError is fine (with a one-line message), anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except ResAlignError as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return None


@pytest.fixture(scope="module")
def registry():
    from resalign.registry import get_registry

    return get_registry()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="resalign-fuzz-") as tmp:
        yield Path(tmp)


def _load_and_validate(raw, config_file, registry):
    from resalign.settings.checks import validate
    from resalign.settings.run import load_run_config

    cfg = load_run_config(raw, config_file)
    validate(cfg, registry)
    return cfg


# --------------------------------------------------------------------------- TOML config files


@MANY
@given(text=texts | st.binary(max_size=40).map(lambda b: b.decode("latin-1")), raw_bytes=st.binary(max_size=24))
def test_toml_config_file_of_any_text(text, raw_bytes, scratch, registry):
    path = scratch / "config.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + raw_bytes)
    _only_own_errors(_load_and_validate, {}, path, registry)


def _toml_safe(v):
    if isinstance(v, dict):
        return {str(k): _toml_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_toml_safe(x) for x in v]
    return v


@MANY
@given(table=st.dictionaries(keys, values, max_size=5))
def test_toml_config_file_of_any_table(table, scratch, registry):
    import tomli_w

    path = scratch / "table.toml"
    try:
        path.write_text(tomli_w.dumps(_toml_safe(table)), encoding="utf-8", errors="surrogatepass")
    except (TypeError, ValueError, UnicodeEncodeError):
        return  # not representable as TOML
    cfg = _only_own_errors(_load_and_validate, {}, path, registry)
    if cfg is not None:  # what validates is finite and in range
        for name in ("beta", "alpha", "gamma", "outer_lr", "weight_decay", "outlier_factor"):
            assert math.isfinite(getattr(cfg, name)), name


# --------------------------------------------------------------------------- --set KEY=VALUE


@MANY
@given(items=st.lists(st.tuples(keys, toml_values).map(lambda kv: f"{kv[0]}={kv[1]}") | texts, max_size=4))
def test_set_items(items, registry):
    from resalign.cli.run import apply_set_items

    raw = _only_own_errors(apply_set_items, {}, items)
    if raw is not None:
        _only_own_errors(_load_and_validate, raw, None, registry)


# --------------------------------------------------------------------------- the KEY=VALUE parser

finite_scalars = (st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
                  | st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=8))
finite_values = st.recursive(finite_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=4), inner, max_size=3), max_leaves=6)
key_parts = st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,6}", fullmatch=True)


def _toml(v) -> str:
    """``v`` written as one TOML value on one line (inline tables and arrays)."""
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(map(_toml, v)) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml(x)}" for k, x in v.items()) + "}"


@MANY
@given(value=finite_values, pad=st.sampled_from(["", " ", "\t "]))
def test_parse_value_reads_every_toml_value_back(value, pad):
    from resalign.config import parse_value

    assert parse_value(pad + _toml(value) + pad, "--set") == value


@MANY
@given(text=texts)
def test_parse_value_of_any_text(text):
    """Any text is one TOML value, a string (when it is not TOML), or a one-line error naming the flag."""
    import tomllib

    from resalign.config import parse_value
    from resalign.errors import ConfigError

    try:
        value = parse_value(text, "--flag 'item'")
    except ConfigError as exc:
        assert str(exc).startswith("--flag 'item': ") and "\n" not in str(exc)
        return
    try:
        tomllib.loads(f"v = {text.strip()}")
    except tomllib.TOMLDecodeError:
        assert value == text.strip()
    assert not (isinstance(value, float) and not math.isfinite(value))


@MANY
@given(sign=st.sampled_from(["", "+", "-"]), word=st.sampled_from(["nan", "NaN", "inf", "Infinity", "INF"]),
       inside=st.booleans())
def test_parse_value_refuses_non_finite_numbers(sign, word, inside):
    from resalign.config import parse_value
    from resalign.errors import ConfigError

    text = f"[1, {sign}{word}]" if inside and word.islower() else sign + word
    with pytest.raises(ConfigError, match="expected a finite number"):
        parse_value(text, "--set")


@MANY
@given(parts=st.lists(key_parts, min_size=1, max_size=4), value=finite_values)
def test_parse_item_splits_dotted_keys(parts, value):
    from resalign.config import parse_item, parse_items

    item = ".".join(parts) + "=" + _toml(value)
    assert parse_item(item, "--set") == (parts, value)
    table = parse_items([item], "--set")
    for k in parts[:-1]:
        table = table[k]
    assert table[parts[-1]] == value


@MANY
@given(items=st.lists(st.tuples(keys, toml_values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=3))
def test_parse_items_knows_the_keys_from_dict_knows(items):
    """With a dataclass, parse_items refuses exactly the keys that are not settings (naming the valid ones)."""
    from resalign.config import from_dict, parse_items
    from resalign.errors import ConfigError
    from resalign.settings.run import RunConfig

    try:
        raw = parse_items(items, "--set", cls=RunConfig, what="the run settings")
    except ConfigError as exc:
        assert "\n" not in str(exc)
        if "unknown key" in str(exc):
            assert "valid keys: " in str(exc)
        return
    try:
        from_dict(RunConfig, raw)
    except ConfigError as exc:
        assert "unknown key" not in str(exc), str(exc)


# --------------------------------------------------------------------------- prompt files

I2P_HEADERS = ["prompt", "categories", "evaluation_seed", "evaluation_guidance", "hard", "inappropriate_percentage"]
cells = st.sampled_from(["", "nan", "inf", "-1", "1e400", "7.5", "12", "sexual,violence", "\"a, b\"", "\"",
                         "a\"b", "\x00", "x" * 5]) | st.text(max_size=8)


@st.composite
def csv_texts(draw):
    header = draw(st.lists(st.sampled_from(I2P_HEADERS) | st.text(max_size=5), min_size=0, max_size=5))
    rows = draw(st.lists(st.lists(cells, max_size=6), max_size=4))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return sep.join([",".join(header)] + [",".join(r) for r in rows])


@MANY
@given(body=csv_texts() | texts, suffix=st.sampled_from([".csv", ".txt"]), tail=st.binary(max_size=6),
       categories=st.none() | st.lists(st.sampled_from(["sexual", "violence", ""]), max_size=2),
       limit=st.none() | st.integers(-2, 3))
def test_prompt_files(body, suffix, tail, categories, limit, scratch):
    from resalign.data.prompts import read_prompts

    path = scratch / f"prompts{suffix}"
    path.write_bytes(body.encode("utf-8", "surrogatepass") + tail)
    ps = _only_own_errors(read_prompts, path, categories=categories, limit=limit)
    if ps is not None:
        assert len(ps.prompts) >= 1
        if ps.guidance is not None:
            assert all(math.isfinite(g) for g in ps.guidance)
        if ps.seeds is not None:
            assert all(s >= 0 for s in ps.seeds)


# --------------------------------------------------------------------------- image-caption folders

FILE_NAMES = ["good.png", "bad.png", "missing.png", "sub/good.png", "../good.png", "/etc/hostname", "", "a\x00b",
              "good.png\n", "."]


@st.composite
def metadata_texts(draw, fmt):
    n = draw(st.integers(0, 3))
    names = [draw(st.sampled_from(FILE_NAMES) | st.text(max_size=6)) for _ in range(n)]
    if fmt == "jsonl":
        import json

        lines = []
        for name in names:
            obj = draw(st.sampled_from(["full", "no-prompt", "text", "number", "list", "raw"]))
            if obj == "full":
                lines.append(json.dumps({"file_name": name, "prompt": draw(st.text(max_size=8))}))
            elif obj == "no-prompt":
                lines.append(json.dumps({"file_name": name}))
            elif obj == "text":
                lines.append(json.dumps({"file_name": name, "text": draw(values)}))
            elif obj == "number":
                lines.append(json.dumps({"file_name": draw(values), "prompt": "p"}))
            elif obj == "list":
                lines.append(json.dumps([name]))
            else:
                lines.append(draw(texts))
        return "\n".join(lines)
    header = draw(st.sampled_from(["file_name,prompt", "file_name,text", "file_name", "prompt,file_name",
                                   " file_name , caption", ""]) | st.text(max_size=10))
    rows = [",".join([name, draw(cells)] + draw(st.lists(cells, max_size=2))) for name in names]
    return "\n".join([header] + rows)


@pytest.fixture(scope="module")
def image_folder(scratch):
    from PIL import Image

    root = scratch / "folder"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "good.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "sub" / "good.png")
    (root / "bad.png").write_bytes(b"not an image")
    return root


@MANY
@given(data=st.data(), fmt=st.sampled_from(["jsonl", "csv"]), tail=st.binary(max_size=4),
       size=st.none() | st.just(4))
def test_image_caption_folders(data, fmt, tail, size, image_folder):
    from resalign.data.folders import read_folder

    for m in ("metadata.jsonl", "metadata.csv"):
        (image_folder / m).unlink(missing_ok=True)
    text = data.draw(metadata_texts(fmt))
    (image_folder / f"metadata.{fmt}").write_bytes(text.encode("utf-8", "surrogatepass") + tail)
    folder = _only_own_errors(read_folder, image_folder, size=size)
    if folder is not None:
        assert len(folder.images) == len(folder.prompts) >= 1
        assert all(not Path(n).is_absolute() and ".." not in Path(n).parts for n in folder.file_names)


# --------------------------------------------------------------------------- --escape


@MANY
@given(text=st.none() | texts | st.lists(st.tuples(
    st.sampled_from(["p", "P", " lambda", "lam", "λ", "q", ""]),
    st.sampled_from(["=", "", "=="]),
    st.sampled_from(["1", "2", "3", "0.5", "nan", "inf", "-1", "1e400", "", "x", " 2 ", "٢"]) | texts,
), max_size=3).map(lambda parts: ",".join(k + s + v for k, s, v in parts)))
def test_escape(text):
    from resalign.eval.protocol.attack import parse_escape

    parsed = _only_own_errors(parse_escape, text)
    if parsed is not None:
        p, lam = parsed
        assert p in (1, 2) and math.isfinite(lam) and lam >= 0


# --------------------------------------------------------------------------- --scorer-option


@MANY
@given(items=st.lists(st.tuples(
    st.sampled_from(["nudenet.", "toy-harm.", "", ".", "a.b.", "nudenet"]) | texts,
    st.sampled_from(["threshold", "labels", "", " ", "classifier"]) | texts,
    st.sampled_from(["=", "", "=="]),
    st.sampled_from(["0.45", "NaN", "nan", "Infinity", "-inf", "[1, 2]", "{\"a\": 1}", "{a = 1}", "A,B", "", "true",
                     "null", "[" * 50000, "[nan]", "\"quoted\"", "1\n2"]) | texts,
).map(lambda t: "".join(t)), max_size=3),
    scorers=st.lists(st.sampled_from(["nudenet", "toy-harm"]), max_size=2),
    fallback=st.none() | st.just("toy-harm"))
def test_scorer_options(items, scorers, fallback):
    from resalign.cli.evaluate import scorer_options

    out = _only_own_errors(scorer_options, items, scorers, fallback)
    if out is not None:
        for name, opts in out.items():
            assert name and all(k for k in opts)
            for v in opts.values():
                assert not (isinstance(v, float) and not math.isfinite(v))
