"""The settings of a meta-test (`EvaluateConfig`, the flags of
experiments.evaluate) and their checks: each raises SettingsError naming the
setting and the fix, before anything runs (`vsml_jax.runs.evaluate`)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from vsml_jax.baselines import nonparametric
from vsml_jax.runs.common import SettingsError, check_choices, check_ranges

GD_KINDS = ("adam", "sgd", "tanh_sgd")
NONPARAMETRIC_KINDS = nonparametric.METHODS
CHECKPOINT_KINDS = ("meta_rnn", "hebbian", "vsml")
SPLITS = ("train", "test")
# 1-nearest neighbour and Parzen keep every example of every seed's stream in memory.
NEAREST_NEIGHBOUR_MAX_BYTES = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Everything that defines a meta-test (the flags of experiments.evaluate).

    `split` None is the flag's default: "test", or with `test_every` > 0 the
    split other than `test_split` (the streams never contain the held-out
    images). `pool` -1 takes the pooling `checkpoint` was trained with.
    `tanh_sgd_lr` is "" (sweep `lrs`), a number, or "clone".
    """
    checkpoint: Optional[str] = None
    label: Optional[str] = None
    datasets: Tuple[str, ...] = ("mnist", "fashion_mnist")
    data_dir: Optional[str] = None
    download: bool = False
    baselines: Tuple[str, ...] = ("adam",)
    episode_length: int = 1000
    seeds: int = 10
    seed_offset: int = 0
    split: Optional[str] = None
    pool: int = -1
    input_size: int = 0
    shuffle_pixels: int = -1
    stream_batch: int = 0
    lrs: Tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
    sweep_seeds: int = 3
    sweep_seed_offset: int = 1_000_000
    sweep_split: str = "train"
    sweep_length: int = 0
    tanh_sgd_lr: str = ""
    tanh_sgd_init_scale: float = 1.0
    test_every: int = 0
    test_examples: int = 1000
    test_split: str = "test"
    gd_hidden: Tuple[int, ...] = ()
    parzen_bandwidth: float = nonparametric.DEFAULT_BANDWIDTH
    checkpoints: Tuple[int, ...] = (100, 500, 1000, 2000)
    window: int = 100
    chunk_size: int = 1000
    with_replacement: bool = False

    def __post_init__(self):
        check_choices(self, {"split": SPLITS, "sweep_split": SPLITS, "test_split": SPLITS})
        check_ranges(self, {
            "episode_length": (1, None), "seeds": (1, None), "seed_offset": (0, None),
            "pool": (-1, None), "input_size": (0, None), "shuffle_pixels": (-1, None),
            "stream_batch": (0, None), "sweep_seeds": (1, None),
            "sweep_seed_offset": (0, None), "sweep_length": (0, None),
            "tanh_sgd_init_scale": (0, None), "test_every": (0, None),
            "test_examples": (1, None), "window": (1, None), "chunk_size": (1, None),
            "parzen_bandwidth": (None, None, "positive")})
        if self.pool == 0:
            raise ValueError("--pool=0: give a pooling factor (1, 2 or 4) or -1 (the "
                             "--checkpoint's).")
        _check_ints("checkpoints", self.checkpoints, "step counts >= 1, e.g. 100,500")
        _check_ints("gd_hidden", self.gd_hidden, "layer sizes >= 1, e.g. 100 or 100,50")
        check_dataset_specs(self.datasets)
        baselines = parse_baselines(self.baselines)
        if not self.checkpoint and not baselines:
            raise ValueError("nothing to evaluate: give --checkpoint and/or --baselines.")
        if (self.seed_offset < self.sweep_seed_offset + self.sweep_seeds
                and self.sweep_seed_offset < self.seed_offset + self.seeds):
            raise ValueError("the sweep seeds overlap the reported seeds; move "
                             "--sweep_seed_offset past --seed_offset + --seeds.")
        if self.pool > 0 or self.input_size:  # else the checkpoint's pool (meta_test)
            resolve_input_size(self.input_size, self.pool)
        tanh_fixed = self.tanh_sgd_lr.strip() != ""
        if tanh_fixed:
            fixed_tanh_sgd_lr(self, None, check_only=True)
        for lr in self.lrs:
            if (isinstance(lr, bool) or not isinstance(lr, numbers.Real)
                    or not math.isfinite(lr) or lr < 0):
                raise ValueError(f"--lrs={','.join(map(str, self.lrs))}: give learning "
                                 "rates as finite numbers >= 0.")
        if not self.lrs and any(k in ("adam", "sgd") or (k == "tanh_sgd" and not tanh_fixed)
                                for _, k, _ in baselines):
            raise ValueError("--lrs is empty; give the learning rate(s) of the "
                             "online-backprop baselines.")
        if self.test_every and self.split == self.test_split:
            raise ValueError(
                f"--split={self.split} and --test_split={self.test_split}: the streams "
                "would contain the held-out images; draw the streams from another split "
                "(e.g. --split=train) or leave --split unset.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def stream_split(self) -> str:
        """The split the streams come from: with held-out tests never the test split."""
        if self.split is not None:
            return self.split
        if self.test_every:
            return "train" if self.test_split != "train" else "test"
        return "test"


def _check_ints(name: str, values: Sequence[Any], want: str) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"--{name}={','.join(map(str, values))}: give {want}.")


def parse_baselines(specs: Sequence[str], taken: Tuple[str, ...] = ()
                    ) -> List[Tuple[str, str, str]]:
    """[(method label, kind, path or "")] from the `baselines` entries.

    An entry is KIND or KIND:PATH, optionally prefixed by "LABEL=" (the name in
    tables and plots). Labels are unique, also against `taken` (the
    --checkpoint learner's label): a second "vsml" becomes "vsml_2".
    SettingsError for an entry that is not understood.
    """
    out, labels = [], set(taken)
    for spec in specs:
        name, _, rest = spec.rpartition("=")
        kind, _, path = rest.partition(":")
        if not ((kind in GD_KINDS + NONPARAMETRIC_KINDS and not path)
                or (kind in CHECKPOINT_KINDS and path)):
            raise SettingsError(
                f"--baselines entry {spec!r} is not understood; use "
                f"{', '.join(GD_KINDS + NONPARAMETRIC_KINDS)} "
                f"or KIND:PATH with KIND in {', '.join(CHECKPOINT_KINDS)} (e.g. "
                "meta_rnn:/path/to/meta_train/workdir), optionally as LABEL=KIND[:PATH].")
        if name and name in labels:
            raise SettingsError(f"--baselines: the label {name!r} is used twice.")
        label, n = name or kind, 2
        while label in labels:
            label, n = f"{kind}_{n}", n + 1
        labels.add(label)
        out.append((label, kind, path))
    return out


def check_example_memories(baselines, seeds: int, examples: int,
                           input_size: int) -> None:
    """SettingsError if a memory baseline's (nearest_neighbour, parzen)
    memories would not fit."""
    kinds = [kind for _, kind, _ in baselines if kind in nonparametric.MEMORY_METHODS]
    if not kinds:
        return
    size = seeds * examples * input_size * 4
    if size > NEAREST_NEIGHBOUR_MAX_BYTES:
        raise SettingsError(
            f"the {kinds[0]} baseline would hold {seeds} seeds x {examples:,} "
            f"examples x {input_size} float32 inputs = {size / 2**30:.1f} GiB; use fewer "
            "--seeds, a shorter --episode_length or a larger --pool, or drop it from "
            "--baselines.")


def check_dataset_specs(datasets: Sequence[str]) -> None:
    """SettingsError for a `datasets` entry that is no data set spec."""
    from vsml_jax.data import split_spec
    if not datasets:
        raise SettingsError("--datasets is empty; name at least one data set.")
    for spec in datasets:
        try:
            split_spec(spec)
        except ValueError as e:
            raise SettingsError(f"--datasets: {e}") from e


def resolve_pool(config: EvaluateConfig, main) -> int:
    """The pooling factor: `pool`, else the checkpoint's (-1 when `input_size` decides)."""
    if config.pool > 0:
        return config.pool
    if config.input_size:
        return -1  # unused: input_size decides
    if main is None:
        raise SettingsError("--pool (1, 2 or 4) or --input_size is needed when no "
                            "--checkpoint is given.")
    if main.pool is None:
        raise SettingsError(f"cannot tell which pooling {main.source} was trained with "
                            "(no flags.pool in learner.json); pass --pool.")
    return main.pool


def resolve_input_size(input_size: int, pool: int) -> int:
    """D: `input_size`, else (28 // pool)^2; SettingsError if not a valid size."""
    from vsml_jax.data import target_side
    try:
        side = target_side(input_size or None, pool)
    except ValueError as e:
        raise SettingsError(f"--input_size / --pool: {e}") from e
    return side * side


def fixed_tanh_sgd_lr(config: EvaluateConfig, main, check_only: bool = False
                      ) -> Optional[float]:
    """tanh_sgd's learning rate from `tanh_sgd_lr` (None: sweep `lrs`).

    With check_only, "clone" is only checked to have a checkpoint to read.
    """
    spec = config.tanh_sgd_lr.strip()
    if not spec:
        return None
    if spec == "clone":
        if not config.checkpoint:
            raise SettingsError("--tanh_sgd_lr=clone needs a cloned learner as "
                                "--checkpoint (e.g. pretrained:backprop_clone).")
        if check_only:
            return None
        from vsml_jax import evaluation
        lr = evaluation.clone_learning_rate(main.info, main.learner.config)
        if not np.isfinite(lr):
            raise SettingsError(f"--tanh_sgd_lr=clone: {main.source} is not a cloned "
                                "learner (its learner.json has no \"clone\": {\"lr\"}); "
                                "pass the rate as a number.")
        return lr
    try:
        lr = float(spec)
    except ValueError:
        raise SettingsError(f"--tanh_sgd_lr={spec!r}: give a number, 'clone' or nothing "
                            "(sweep --lrs).") from None
    if not (lr >= 0 and math.isfinite(lr)):
        raise SettingsError(f"--tanh_sgd_lr={spec}: must be a finite number >= 0.")
    return lr


def check_runs_on_streams(label: str, learner, stream_batch: int, test_every: int) -> None:
    """SettingsError if `learner` cannot take K examples per step or held-out tests."""
    from vsml_jax.config import VSMLConfig
    cfg = learner.config
    if stream_batch and not (isinstance(cfg, VSMLConfig)
                             or getattr(cfg, "native_minibatch", False)):
        raise SettingsError(f"{label}: a {learner.name!r} learner does not define "
                            f"batch-averaged streams; drop --stream_batch={stream_batch} "
                            "or evaluate it in a separate run.")
    if test_every and learner.predict is None:
        raise SettingsError(f"{label}: a {learner.name!r} learner defines no `predict`, so "
                            f"held-out accuracy cannot be measured; drop "
                            f"--test_every={test_every} or evaluate it in a separate run.")


def check_stream_length(dataset: str, data, split: str, length: int, stream_batch: int,
                        with_replacement: bool, log) -> None:
    """SettingsError when a stream needs more examples than its split holds.

    Such a stream would repeat examples (a learner that memorises then scores
    far above chance on data with random labels); `with_replacement` accepts
    it, stated in the log and in summary.json.
    """
    need = length * max(stream_batch, 1)
    have = min([p.size for p in data.parts] or [data.num_examples])
    if need <= have:
        return
    what = (f"--episode_length={length} x --stream_batch={stream_batch} = {need}"
            if stream_batch else f"--episode_length={length}")
    if not with_replacement:
        raise SettingsError(
            f"{dataset}: a stream of {what} examples is longer than the {split} split's "
            f"{have} examples, so examples would repeat. Use --episode_length <= "
            f"{have // max(stream_batch, 1)}, or --with_replacement to draw with "
            "replacement (stated in summary.json).")
    log(f"{dataset}: streams of {need} examples drawn with replacement from {have} "
        "(--with_replacement): examples repeat.")

