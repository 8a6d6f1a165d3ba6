"""Portable learners: save and load meta-trained meta variables.

A learner is stored as two files (what `experiments.meta_train` writes into
its workdir, and what ships in this package as NAME.msgpack + NAME.json):

    params.msgpack   flax.serialization.to_bytes(params)
    learner.json     {"format": "vsml_jax.learner/1",
                      "learner": "vsml" | "meta_rnn" | "hebbian",
                      "config": {fields of the learner's config dataclass},
                      "flags": {how it was trained, e.g. "pool": 4, ...},
                      "input": {"pool": 4, ...}, ...}

(`vsml_jax.training.checkpointing` writes this format; `save_learner` here
uses it.)

`load_learner(spec)` accepts such a directory or "pretrained:NAME" (files
shipped in this package) and rebuilds the Learner: the config from the JSON,
a params template from the learner's `init_params`, then
`flax.serialization.from_bytes`. Because VS-ML's meta variables do not depend
on the layer widths, a VS-ML learner can be loaded with another input size
(`input_size=784` for one trained on 7x7-pooled images) and another number of
classes (`num_classes=26` for one meta-trained on 10). The same holds for any
learner whose meta variables keep their shapes (the learned Hebbian rule);
one whose shapes change (the Meta RNN: its weights read D inputs and write C
logits) is refused with a LearnerFileError.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np
from absl import logging
from flax import serialization

from vsml_jax.baselines import hebbian, meta_rnn
from vsml_jax.config import VSMLConfig
from vsml_jax.learners import Learner, vsml_learner

PREFIX = "pretrained:"
# The format tag vsml_jax.training.checkpointing writes (kept here as a string
# so that loading a learner does not import orbax; a test checks they agree).
LEARNER_FORMAT = "vsml_jax.learner/1"
PARAMS_FILE = "params.msgpack"
LEARNER_FILE = "learner.json"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIDE = 28  # MNIST / Fashion-MNIST images are 28 x 28

# learner name -> (config class, config -> Learner)
LEARNER_TYPES: Dict[str, Tuple[type, Callable[[Any], Learner]]] = {
    "vsml": (VSMLConfig, vsml_learner),
    "meta_rnn": (meta_rnn.MetaRNNConfig, meta_rnn.learner_from_config),
    "hebbian": (hebbian.HebbianConfig, hebbian.learner_from_config),
}


class LearnerFileError(ValueError):
    """A learner checkpoint is missing, unknown or does not match its config."""


@dataclasses.dataclass
class LoadedLearner:
    """A learner ready to run.

    Attributes:
      learner: the Learner (config possibly with an overridden input size).
      params: its meta variables.
      info: the parsed learner.json.
      source: where it came from (directory or "pretrained:NAME").
      pool: the image pooling it was trained with (flags["pool"], else
        inferred from its input size), None if unknown.
    """
    learner: Learner
    params: Any
    info: Dict[str, Any]
    source: str
    pool: Optional[int]


def available() -> List[str]:
    """Names usable as "pretrained:NAME" (a NAME.msgpack with a NAME.json here)."""
    names = []
    for fn in sorted(os.listdir(PACKAGE_DIR)):
        stem, ext = os.path.splitext(fn)
        if ext == ".json" and os.path.isfile(os.path.join(PACKAGE_DIR, stem + ".msgpack")):
            names.append(stem)
    return names


def resolve(spec: str) -> Tuple[str, str]:
    """(params path, json path) for a directory or "pretrained:NAME"."""
    if spec.startswith(PREFIX):
        name = spec[len(PREFIX):]
        names = available()
        if name not in names:
            listed = ", ".join(names) if names else "none are installed"
            raise LearnerFileError(
                f"unknown pretrained learner {name!r}; available: {listed}. Use "
                f"pretrained:NAME with one of those, or pass a directory written by "
                f"experiments.meta_train (holding {PARAMS_FILE} and {LEARNER_FILE}).")
        return (os.path.join(PACKAGE_DIR, name + ".msgpack"),
                os.path.join(PACKAGE_DIR, name + ".json"))
    if not os.path.isdir(spec):
        raise LearnerFileError(
            f"checkpoint {spec!r} is not a directory. Pass the workdir of "
            f"experiments.meta_train (with {PARAMS_FILE} and {LEARNER_FILE}) or "
            f"pretrained:NAME (available: {', '.join(available()) or 'none'}).")
    paths = (os.path.join(spec, PARAMS_FILE), os.path.join(spec, LEARNER_FILE))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise LearnerFileError(
            f"checkpoint directory {spec!r} lacks {', '.join(map(os.path.basename, missing))};"
            " a portable learner needs both files (experiments.meta_train writes them "
            "at the end of a run).")
    return paths


def infer_pool(input_size: int) -> Optional[int]:
    """The pooling p with (28 / p)^2 == input_size, or None if there is none."""
    side = math.isqrt(input_size)
    if side * side != input_size or side == 0 or IMAGE_SIDE % side:
        return None
    return IMAGE_SIDE // side


def config_from_info(info: Dict[str, Any], where: str) -> Tuple[str, Any]:
    """(learner name, config object) from a parsed learner.json."""
    name = info.get("learner", info.get("name"))
    if name not in LEARNER_TYPES:
        raise LearnerFileError(f"{where}: learner {name!r} is unknown; known learners: "
                               f"{', '.join(LEARNER_TYPES)} (key \"learner\").")
    cls, _ = LEARNER_TYPES[name]
    fields = info.get("config")
    if not isinstance(fields, dict):
        raise LearnerFileError(f"{where}: no \"config\" object with the fields of "
                               f"{cls.__name__}.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise LearnerFileError(f"{where}: config fields {unknown} are not fields of "
                               f"{cls.__name__} (written by another version of vsml_jax?).")
    try:
        return name, cls(**fields)
    except (TypeError, ValueError) as e:
        raise LearnerFileError(f"{where}: invalid {cls.__name__}: {e}") from e


def _resized_config(name: str, cfg: Any, input_size: Optional[int],
                    num_classes: Optional[int]) -> Any:
    """cfg with another input size and/or class count (None: keep)."""
    d = int(input_size) if input_size is not None else cfg.input_size
    c = int(num_classes) if num_classes is not None else cfg.num_classes
    if (d, c) == (cfg.input_size, cfg.num_classes):
        return cfg
    if isinstance(cfg, VSMLConfig):
        return cfg.replace(layer_sizes=(d,) + tuple(cfg.layer_sizes[1:-1]) + (c,))
    return dataclasses.replace(cfg, num_inputs=d, num_classes=c)


def _param_shapes(learner: Learner) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(path, shape)] of a learner's meta variables, computed without data."""
    shapes = jax.eval_shape(learner.init_params, jax.random.key(0))
    return [(jax.tree_util.keystr(path), tuple(leaf.shape))
            for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]]


def _check_resizable(spec: str, name: str, cfg: Any, new_cfg: Any,
                     pool: Optional[int]) -> None:
    """LearnerFileError unless new_cfg's meta variables have cfg's shapes."""
    build = LEARNER_TYPES[name][1]
    before, after = _param_shapes(build(cfg)), _param_shapes(build(new_cfg))
    if before == after:
        return
    diff = next(f"{p}: {a} -> {b}" for (p, a), (_, b) in zip(before, after) if a != b)
    problems, fixes = [], []
    if new_cfg.input_size != cfg.input_size:
        problems.append(f"cannot run on {new_cfg.input_size} inputs (trained on "
                        f"{cfg.input_size})")
        fixes.append(f"feed it {cfg.input_size} inputs (the pooling it was trained "
                     f"with: pool={pool})" if pool else
                     f"feed it {cfg.input_size} inputs (input_size={cfg.input_size})")
    if new_cfg.num_classes != cfg.num_classes:
        problems.append(f"cannot run on {new_cfg.num_classes} classes (trained for "
                        f"{cfg.num_classes})")
        fixes.append(f"use it on data sets with {cfg.num_classes} classes, or "
                     f"meta-train a {name} learner on a {new_cfg.num_classes}-class data "
                     f"set (experiments.meta_train --learner={name} --dataset=SPEC)")
    raise LearnerFileError(
        f"{spec}: the {name} learner {' and '.join(problems)}: the shapes of its meta "
        f"variables depend on them ({diff}). To fix it, {'; or '.join(fixes)}; or use a "
        "VS-ML learner, whose meta variables fit any input size and class count.")


def load_learner(spec: str, input_size: Optional[int] = None,
                 num_classes: Optional[int] = None) -> LoadedLearner:
    """Loads a learner from a meta_train workdir or "pretrained:NAME".

    Args:
      spec: directory or "pretrained:NAME".
      input_size: run the learner on this many inputs (None: as trained).
      num_classes: run it on this many classes (None: as trained).
        Both are allowed when the meta variables keep their shapes: for VS-ML
        (they replace layer_sizes[0] and layer_sizes[-1]; V_M depends on
        neither) and the learned Hebbian rule. A learner whose meta variables
        change shape (the Meta RNN) raises LearnerFileError naming the problem
        and the fix.
    Returns:
      LoadedLearner.
    """
    params_path, json_path = resolve(spec)
    try:
        with open(json_path) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise LearnerFileError(f"{json_path}: not valid JSON ({e}).") from e
    if info.get("format", LEARNER_FORMAT) != LEARNER_FORMAT:
        raise LearnerFileError(f"{json_path} has format {info.get('format')!r}; this "
                               f"version of vsml_jax reads {LEARNER_FORMAT!r}.")
    name, cfg = config_from_info(info, json_path)
    pool = (info.get("input") or {}).get("pool", (info.get("flags") or {}).get("pool"))
    pool = int(pool) if pool is not None else infer_pool(cfg.input_size)
    new_cfg = _resized_config(name, cfg, input_size, num_classes)
    if new_cfg != cfg:
        _check_resizable(spec, name, cfg, new_cfg, pool)
        cfg = new_cfg
    learner = LEARNER_TYPES[name][1](cfg)
    # Only the structure and shapes matter to from_bytes: no random numbers needed.
    template = jax.tree_util.tree_map(
        lambda a: np.zeros(a.shape, a.dtype),
        jax.eval_shape(learner.init_params, jax.random.key(0)))
    with open(params_path, "rb") as f:
        raw = f.read()
    try:
        # Decoding alone first: a file that is not a whole msgpack document is
        # damaged (cut short, overwritten), whatever the config says.
        stored = serialization.msgpack_restore(raw)
        if not isinstance(stored, dict):
            raise ValueError(f"holds a {type(stored).__name__}, not a parameter tree")
    except Exception as e:  # msgpack's errors (ExtraData, ValueError, ...) vary by cause
        cause = f"{type(e).__name__}: {e}" if raw else "the file is empty"
        raise LearnerFileError(
            f"{params_path} is damaged ({len(raw)} bytes; {cause}): copy it again from "
            "where it came from, or, for a meta_train/clone workdir, run the same "
            "command again (it rewrites the learner from the newest checkpoint).") from e
    try:
        params = serialization.from_state_dict(template, stored)
    except Exception as e:  # flax raises ValueError/KeyError on another structure
        raise LearnerFileError(
            f"{params_path}: the stored parameters do not match the {name} config in "
            f"{json_path} ({type(e).__name__}: {e}).") from e
    _check_shapes(template, params, f"{params_path}: the stored parameters do not match "
                                    f"the {name} config in {json_path}")
    _note_unfinished(spec, info)
    return LoadedLearner(learner=learner, params=params, info=info, source=spec, pool=pool)


_NOTED = set()


def _note_unfinished(spec: str, info: Dict[str, Any]) -> None:
    """Says so when the learner comes from a run that has not finished.

    A run writes its portable learner at every checkpoint, marked
    "finished": false until its last step, so a stopped, preempted or
    NaN-stopped run can be meta-tested with its newest good checkpoint.
    """
    run = info.get("meta_training") or info.get("cloning") or {}
    if run.get("finished") is False and (spec, run.get("steps")) not in _NOTED:
        _NOTED.add((spec, run.get("steps")))  # once per learner, not per load
        logging.warning("%s is an unfinished run: using the learner of its newest good "
                        "checkpoint (step %s).", spec, run.get("steps"))


def _check_shapes(template: Any, params: Any, problem: str) -> None:
    # from_bytes restores whatever shapes were stored: compare them explicitly.
    want = [tuple(a.shape) for a in jax.tree_util.tree_leaves(template)]
    got = [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(params)]
    if want != got:
        raise LearnerFileError(f"{problem} (stored shapes {got}, the config implies "
                               f"{want}).")


def config_dict(learner: Learner) -> Dict[str, Any]:
    """The learner's config as the JSON object learner.json stores."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(learner.config).items()}


def save_learner(directory: str, learner: Learner, params: Any,
                 flags: Optional[Dict[str, Any]] = None,
                 extra: Optional[Dict[str, Any]] = None) -> Tuple[str, str]:
    """Writes directory/params.msgpack + learner.json (what `load_learner` reads).

    Args:
      directory: created if missing.
      learner: a learner of a kind in LEARNER_TYPES (its config is stored).
      params: its meta variables.
      flags: how it was made (e.g. {"pool": 4}), stored under "flags".
      extra: more JSON fields of learner.json (e.g. "meta_training", "input").
    Returns:
      The two paths.
    """
    from vsml_jax.training import checkpointing  # imports orbax: only when saving

    if learner.name not in LEARNER_TYPES or not dataclasses.is_dataclass(learner.config):
        raise LearnerFileError(f"cannot save learner {learner.name!r}: known learners are "
                               f"{', '.join(LEARNER_TYPES)}.")
    return checkpointing.save_learner_dir(directory, params, config_dict(learner),
                                          {"flags": dict(flags or {}), **(extra or {})},
                                          learner=learner.name)
