r"""Figure 5: the cloned backprop learning on MNIST and Fashion-MNIST.

    python -m experiments.fig5 --checkpoint=pretrained:backprop_clone \
        --out_dir=/tmp/fig5 --steps=3000 --seeds=3

A cloned learner (a VS-ML network whose LSTM cells were trained on random data
to implement backprop, `experiments.clone`) learns online from a stream of
training images, one per step, with no gradient computed anywhere. Next to it
runs explicit online SGD on the same network, y = tanh(x) W + b from W = 0,
b = 0 (`vsml_jax.baselines.online_gd.tanh_linear_learner`), at the clone's
effective learning rate (rule_lr x error_scale, from its learner.json) unless
--sgd_lr is given. Every `eval_every` steps both are tested on `test_examples`
images of the test split (predictions only; the test images never change the
learner). Optionally an improved clone (meta-trained from the clone, e.g. by
CMA-ES: `experiments.meta_train --init_checkpoint=...`) is drawn as well.

Writes out_dir/fig5.json (all curves, per seed) and out_dir/fig5.png (mean
and std over seeds of the test accuracy vs steps, one panel per dataset).
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vsml_jax import data as vdata
from vsml_jax import pretrained
from vsml_jax.baselines import online_gd
from vsml_jax.network import error_message, forward_pass

flags.DEFINE_string("checkpoint", "pretrained:backprop_clone",
                    "The cloned learner: a workdir of experiments.clone or pretrained:NAME.")
flags.DEFINE_string("improved_checkpoint", None, "Optional: a learner meta-trained from "
                    "the clone (drawn as 'clone + meta-training').")
flags.DEFINE_list("datasets", ["mnist", "fashion_mnist"], "Datasets.")
flags.DEFINE_integer("pool", 1, "Average pooling of the images (1: 28x28 = 784 inputs).")
flags.DEFINE_integer("steps", 3000, "Training examples per stream (one per step).")
flags.DEFINE_integer("eval_every", 500, "Test every this many steps.")
flags.DEFINE_integer("test_examples", 1000, "Test images per evaluation (first n of the "
                     "test split).")
flags.DEFINE_integer("seeds", 3, "Streams (seeds) per dataset and method.")
flags.DEFINE_float("sgd_lr", 0.0, "Learning rate of the SGD baseline (0: the clone's "
                   "effective rate rule_lr x error_scale).")
flags.DEFINE_float("error_scale", 0.0, "Override the clone's error_scale (0: keep).")
flags.DEFINE_string("data_dir", os.environ.get("VSML_DATA_DIR"), "IDX data folder.")
flags.DEFINE_string("out_dir", None, "Where fig5.json and fig5.png go.")
FLAGS = flags.FLAGS


def load_clone(spec: str, input_size: int):
    """(Learner, params, effective learning rate) of a cloned learner."""
    loaded = pretrained.load_learner(spec, input_size=input_size)
    learner, params = loaded.learner, loaded.params
    cfg = learner.config
    if FLAGS.error_scale > 0:
        from vsml_jax.learners import vsml_learner
        cfg = cfg.replace(error_scale=FLAGS.error_scale)
        learner, params = vsml_learner(cfg), params.replace(cfg=cfg)
    clone = loaded.info.get("clone") or {}
    rate = float(clone.get("lr", float("nan"))) * cfg.error_scale
    return learner, params, rate


def vsml_test_logits(params, state, x):
    """[N, C] predictions of a VS-ML learner's current state (predict pass only)."""
    cfg = params.cfg
    zeros = jnp.zeros((cfg.num_classes,), jnp.float32)
    msg = error_message(cfg, zeros, zeros)
    one = lambda xi: forward_pass(params, state.layers, xi, msg)[1]
    # One image at a time: vmapping over images multiplies the [A, B, 4H]
    # temporaries and runs several times slower on CPU.
    return jax.lax.map(one, x)


def sgd_test_logits(cfg):
    return lambda params, state, x: online_gd.apply_net(cfg, state.net, x)


def learning_curve(learner, params, test_logits, train, test, seed: int) -> Dict:
    """Test accuracy every eval_every steps of one stream (seed)."""
    key = jax.random.PRNGKey(seed)
    idx = jax.random.permutation(key, train.images.shape[0])[:FLAGS.steps]
    xs, ys = train.images[idx], jax.nn.one_hot(train.labels[idx], 10)
    x_test = test.images[:FLAGS.test_examples]
    y_test = test.labels[:FLAGS.test_examples]
    state = learner.init_state(jax.random.fold_in(key, 1))
    unroll = jax.jit(learner.unroll)
    acc_fn = jax.jit(lambda p, s: jnp.mean(jnp.argmax(test_logits(p, s, x_test), -1)
                                           == y_test))
    steps, test_acc, online_acc = [0], [float(acc_fn(params, state))], []
    for start in range(0, FLAGS.steps, FLAGS.eval_every):
        stop = min(start + FLAGS.eval_every, FLAGS.steps)
        state, out = unroll(params, state, (xs[start:stop], ys[start:stop]))
        steps.append(stop)
        test_acc.append(float(acc_fn(params, state)))
        online_acc.append(float(jnp.mean(out.correct)))
    return {"steps": steps, "test_acc": test_acc, "online_acc": online_acc}


def plot(results: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = list(results)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6),
                             squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for method, runs in results[ds].items():
            steps = np.asarray(runs[0]["steps"])
            acc = np.asarray([r["test_acc"] for r in runs])
            mean, std = acc.mean(0), acc.std(0)
            line, = ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25,
                            color=line.get_color())
        ax.set_title({"mnist": "MNIST", "fashion_mnist": "Fashion MNIST"}.get(ds, ds))
        ax.set_xlabel("training examples (one per step)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv):
    del argv
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required.")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    results: Dict[str, Dict[str, List[Dict]]] = {}
    meta = {}
    for ds in FLAGS.datasets:
        train = vdata.make_dataset(ds, "train", data_dir=FLAGS.data_dir, pool=FLAGS.pool)
        test = vdata.make_dataset(ds, "test", data_dir=FLAGS.data_dir, pool=FLAGS.pool)
        d = train.images.shape[1]
        clone, clone_params, rate = load_clone(FLAGS.checkpoint, d)
        sgd_lr = FLAGS.sgd_lr or rate
        if not np.isfinite(sgd_lr):
            raise app.UsageError(f"{FLAGS.checkpoint} has no clone learning rate in its "
                                 "learner.json; pass --sgd_lr.")
        sgd = online_gd.tanh_linear_learner(d, 10, learning_rate=sgd_lr, init_scale=0.0)
        methods = {"cloned backprop": (clone, clone_params, vsml_test_logits),
                   f"SGD (lr {sgd_lr:g})": (sgd, None, sgd_test_logits(sgd.config))}
        if FLAGS.improved_checkpoint:
            imp, imp_params, _ = load_clone(FLAGS.improved_checkpoint, d)
            methods["clone + meta-training"] = (imp, imp_params, vsml_test_logits)
        meta[ds] = {"sgd_lr": sgd_lr, "clone_rate": rate, "input_size": d}
        results[ds] = {}
        for name, (learner, params, test_logits) in methods.items():
            runs = []
            for seed in range(FLAGS.seeds):
                t0 = time.time()
                runs.append(learning_curve(learner, params, test_logits, train, test, seed))
                logging.info("%s %s seed %d: test acc %s (%.0f s)", ds, name, seed,
                             [round(a, 3) for a in runs[-1]["test_acc"]], time.time() - t0)
            results[ds][name] = runs
            final = [r["test_acc"][-1] for r in runs]
            logging.info("%s %s: final test acc %.4f +- %.4f over %d seeds", ds, name,
                         np.mean(final), np.std(final), len(final))
    summary = {ds: {m: {"final_test_acc_mean": float(np.mean([r["test_acc"][-1] for r in rs])),
                        "final_test_acc_std": float(np.std([r["test_acc"][-1] for r in rs])),
                        "online_acc_last_chunk_mean": float(np.mean([r["online_acc"][-1]
                                                                     for r in rs]))}
                    for m, rs in res.items()} for ds, res in results.items()}
    with open(os.path.join(FLAGS.out_dir, "fig5.json"), "w") as f:
        json.dump({"flags": {k: FLAGS[k].value for k in (
            "checkpoint", "improved_checkpoint", "datasets", "pool", "steps", "eval_every",
            "test_examples", "seeds", "sgd_lr", "error_scale")},
            "methods": meta, "summary": summary, "curves": results}, f, indent=1)
    plot(results, os.path.join(FLAGS.out_dir, "fig5.png"))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
