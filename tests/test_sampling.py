"""Sampling for SCST and the self-critical loss, on the tiny random captioner of test_decoding."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from caption_pipeline.model.beam_search import END_ID, PAD_ID, START_ID, UNK_ID
from caption_pipeline.model.decoding import compile_function
from caption_pipeline.model.sampling import sample_captions
from caption_pipeline.model.self_critical import (
    SelfCriticalTrainer,
    advantages,
    self_critical_loss,
    sequence_log_probs,
)
from caption_pipeline.params import from_conf
from tests.test_decoding import (
    MAX_LENGTH,
    image_features,
    teacher_forced,
    tiny_captioner,
    unk_loving_captioner,
)


def uniforms(batch: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, k, MAX_LENGTH), dtype=np.float32)


def draw(model, features, u):
    out = sample_captions(model, ops.convert_to_tensor(features), ops.convert_to_tensor(u))
    return type(out)(*(ops.convert_to_numpy(x) for x in out))


def test_sampling_is_deterministic_under_its_uniforms_and_varies_with_them():
    model, features = tiny_captioner(), image_features(4)
    first, again = (
        draw(model, features, uniforms(4, 5, 0)),
        draw(model, features, uniforms(4, 5, 0)),
    )
    other = draw(model, features, uniforms(4, 5, 1))
    np.testing.assert_array_equal(first.ids, again.ids)
    assert first.ids.shape == (4, 5, MAX_LENGTH)
    assert not np.array_equal(first.ids, other.ids)
    assert len({tuple(row) for row in first.ids.reshape(-1, MAX_LENGTH)}) > 5  # samples differ


def test_sampled_log_probs_are_the_policys_the_loss_differentiates():
    """The sampler's log pi of each sample is what the SCST loss computes from the teacher-forced
    logits of that caption (the policy renormalised over the allowed tokens), and finished
    samples are padded."""
    # <end> a little less likely, so that some of the 12 samples run to MAX_LENGTH (with <unk>
    # never drawn, the default, almost all end early at end_bias 0).
    model, features = tiny_captioner(end_bias=-1.0), image_features(3)
    samples = draw(model, features, uniforms(3, 4, 2))
    ids = samples.ids.reshape(-1, MAX_LENGTH)
    lengths, finished = samples.lengths.reshape(-1), samples.finished.reshape(-1)
    assert finished.any() and not finished.all()  # the tiny model ends some, not all
    captions = np.concatenate([np.full((len(ids), 1), START_ID), ids], axis=1).astype("int32")
    logits, _ = model.teacher_forced(np.repeat(features, 4, axis=0), captions)
    expected = ops.convert_to_numpy(sequence_log_probs(logits, ids))
    np.testing.assert_allclose(samples.log_probs.reshape(-1), expected, rtol=1e-5, atol=1e-5)
    # ... which is not the full softmax's: <unk> holds some of the mass and is never drawn.
    full, _ = teacher_forced(model, np.repeat(features, 4, axis=0), ids, lengths)
    assert (samples.log_probs.reshape(-1) > full + 1e-4).all()
    for row, length, done in zip(ids, lengths, finished, strict=True):
        assert not np.isin(row[:length], [PAD_ID, START_ID]).any()
        assert (row[length:] == PAD_ID).all()
        assert (row[length - 1] == END_ID) == done
    assert 0 < float(samples.entropy) <= np.log(12)


def test_compiled_sampling_matches_eager():
    model, features, u = tiny_captioner(), image_features(2), uniforms(2, 3, 3)
    compiled = compile_function(
        lambda inputs: sample_captions(model, model(inputs), inputs["uniforms"]), model
    )
    out = compiled({"features": features, "uniforms": u})
    np.testing.assert_array_equal(ops.convert_to_numpy(out.ids), draw(model, features, u).ids)


def test_advantages_greedy_and_mean_of_the_others():
    rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    base, adv = advantages(rewards, "greedy", np.array([2.0, 1.0]))
    np.testing.assert_allclose(base, [[2, 2, 2], [1, 1, 1]])
    np.testing.assert_allclose(adv, [[-1, 0, 1], [-1, -1, 5]])
    base, adv = advantages(rewards, "mean", None)
    np.testing.assert_allclose(base, [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])
    np.testing.assert_allclose(adv, rewards - base)


def test_the_loss_gradient_raises_the_probability_of_a_rewarded_caption():
    """SGD steps on -(r - b) log p with a positive advantage make that caption more likely, and
    with a negative one less likely."""
    for sign in (1.0, -1.0):
        model, features = tiny_captioner(), image_features(2)
        caption = np.array([[START_ID, 5, 6, 7, END_ID, PAD_ID]] * 2, dtype="int32")
        lengths = np.array([4, 4])
        before, _ = teacher_forced(model, features, caption[:, 1:], lengths)
        trainer = SelfCriticalTrainer(model)
        trainer.compile(optimizer=keras.optimizers.SGD(0.05))
        for _ in range(5):
            trainer.train_on_batch(
                {"features": features},
                {"captions": caption[:, None, :], "advantage": np.full((2, 1), sign, "float32")},
            )
        after, _ = teacher_forced(model, features, caption[:, 1:], lengths)
        assert np.all(np.sign(after - before) == sign), (sign, before, after)


def test_the_logged_policy_loss_is_the_steps_own():
    """Keras >= 3.15 (pyproject.toml) resets metrics in `train_on_batch`: SCST's per-step
    `policy_loss` is that step's loss, not a running mean since the phase began."""
    model, features = tiny_captioner(), image_features(2)
    caption = np.array([[START_ID, 5, 6, END_ID, PAD_ID]] * 2, dtype="int32")[:, None, :]
    trainer = SelfCriticalTrainer(model)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))  # no update: the same loss twice
    logged = [
        trainer.train_on_batch(
            {"features": features},
            {"captions": caption, "advantage": np.full((2, 1), sign, "float32")},
            return_dict=True,
        )["policy_loss"]
        for sign in (1.0, -1.0)
    ]
    assert logged[0] > 0 and np.isclose(logged[1], -logged[0], rtol=1e-5)  # a mean would be 0


def test_the_scst_update_is_bit_identical_from_the_same_start():
    """Two runs of one commit must give the same SCST phase. On TensorFlow's CPU kernels
    without XLA, the update's gradient at this size (the default decoder, 16 images x 5
    captions of 20 words over 16x16 regions) differs in the last bits from call to call with
    the same inputs; `scst.self_critical_trainer` compiles it with XLA, where it does not."""
    from caption_pipeline.model import Captioner, ModelConfig
    from caption_pipeline.training.scst import self_critical_trainer

    regions, depth, batch, samples, length, vocab = 256, 128, 16, 5, 20, 68
    config = from_conf(ModelConfig, "model", vocab_size=vocab, encoder_trainable=False)
    keras.utils.set_random_seed(0)
    captioner = Captioner(config, feature_shape=(regions, depth))
    captioner({"features": np.zeros((1, regions, depth), "float32")})
    trainer = self_critical_trainer(captioner, 5e-4, 5.0)
    variables = trainer.variables + trainer.optimizer.variables
    start = [ops.convert_to_numpy(v) for v in variables]
    initial = [np.array(w) for w in captioner.get_weights()]
    rng = np.random.default_rng(1)
    features = rng.normal(size=(batch, regions, depth)).astype("float32")
    captions = rng.integers(4, vocab, size=(batch, samples, length + 1))
    captions[..., 0] = START_ID
    advantage = [rng.normal(size=(batch, samples)).astype("float32") for _ in range(2)]

    def two_steps() -> list[np.ndarray]:
        for variable, value in zip(variables, start, strict=True):
            variable.assign(value)
        for step in range(2):
            trainer.train_on_batch(
                {"features": features}, {"captions": captions, "advantage": advantage[step]}
            )
        return [np.array(w) for w in captioner.get_weights()]

    first, second = two_steps(), two_steps()
    assert any(not np.array_equal(a, b) for a, b in zip(first, initial, strict=True))  # updated
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_self_critical_loss_masks_padding():
    logits = np.random.default_rng(0).normal(size=(2, 4, 12)).astype("float32")
    targets = np.array([[5, END_ID, PAD_ID, PAD_ID], [5, END_ID, 7, 8]], "int32")
    changed = logits.copy()
    changed[0, 2:] += 10.0  # the padded steps of caption 0 must not matter
    advantage = np.array([1.0, 0.0], "float32")
    assert np.isclose(
        float(self_critical_loss(logits, targets, advantage)),
        float(self_critical_loss(changed, targets, advantage)),
    )


def _expected_gradients(logits: np.ndarray, rewards: np.ndarray, baseline: float, loss_fn):
    """On a one-step toy policy over V tokens, by enumeration (no sampling noise):
    (grad J, E[grad of the SCST estimator]) with respect to the logits [V], where
    J = E_{w ~ pi}[r(w)], pi the softmax over the allowed tokens, and the estimator the gradient
    of `loss_fn(logits [N, 1, V], targets [N, 1], advantage [N])` for one sample w."""
    import tensorflow as tf

    allowed = [w for w in range(len(logits)) if w not in (PAD_ID, START_ID, UNK_ID)]
    theta = tf.Variable(logits)
    with tf.GradientTape() as tape:
        pi = tf.nn.softmax(tf.gather(theta, allowed))
        objective = tf.reduce_sum(pi * rewards[allowed])
    true = tf.convert_to_tensor(tape.gradient(objective, theta)).numpy()
    probabilities = pi.numpy()
    # E_pi[-grad loss(w)] = sum_w pi(w) (r(w) - b) grad log q(w): one row per allowed w, its
    # advantage weighted by N pi(w) (the loss is a mean over rows).
    with tf.GradientTape() as tape:
        rows = tf.repeat(theta[None, None, :], len(allowed), axis=0)  # [N, 1, V]
        targets = np.array(allowed, "int32")[:, None]
        weights = len(allowed) * probabilities * (rewards[allowed] - baseline)
        loss = loss_fn(rows, targets, weights.astype("float32"))
    estimated = -tf.convert_to_tensor(tape.gradient(loss, theta)).numpy()
    return true, estimated


def test_the_scst_gradient_is_unbiased_when_a_banned_token_is_likely():
    """Issue 25: the sampler never draws <unk>, so the loss must differentiate the policy it
    drew from (the softmax over the allowed tokens). On a toy policy where <unk> has most of
    the model's mass, the expected SCST gradient equals the true gradient of the expected
    reward; differentiating the full softmax instead (the bug) is off by
    E[(r - b) grad log Z], which this toy makes large."""
    vocab = 12
    logits = np.random.default_rng(0).normal(size=vocab).astype("float32")
    logits[UNK_ID] = 4.0  # p(<unk>) ~ 0.9 under the full softmax
    rewards = np.linspace(0.0, 2.0, vocab).astype("float32")
    baseline = 0.1  # any b independent of the sample keeps the estimator unbiased

    true, estimated = _expected_gradients(logits, rewards, baseline, self_critical_loss)
    np.testing.assert_allclose(estimated, true, atol=1e-5)
    assert np.abs(true).max() > 1e-2  # not trivially zero

    def full_softmax_loss(logits, targets, advantage):  # what the loss computed before
        logp = ops.log_softmax(logits, axis=-1)
        token = ops.take_along_axis(logp, targets[..., None], axis=-1)[..., 0, 0]
        return -ops.mean(advantage * token)

    _, biased = _expected_gradients(logits, rewards, baseline, full_softmax_loss)
    assert np.abs(biased - true).max() > 0.1  # the test can fail: the old loss is biased


# --- the SCST phase end to end ----------------------------------------------------------------


def scst_inputs(images: int = 6):
    import tensorflow as tf

    from tests.test_decoding import tiny_vocabulary

    features = image_features(images)
    ids = np.arange(100, 100 + images)
    rng = np.random.default_rng(0)
    words = list("abcdefgh")
    references = {
        split: {int(i): [[str(w) for w in rng.choice(words, 3)] for _ in range(5)] for i in ids}
        for split in ("train", "val")
    }

    def datasets(split, epoch, shuffle):
        ds = tf.data.Dataset.from_tensor_slices(
            ({"features": features, "image_id": ids}, np.zeros((images, 3), "int32"))
        )
        if shuffle:
            ds = ds.shuffle(images, seed=epoch)
        return ds.batch(3)

    return datasets, tiny_vocabulary(), references


def run_scst(
    tmp_path,
    epochs: int,
    keep: bool = False,
    *,
    images: int = 6,
    learning_rate: float = 0.05,
    strategy: str = "default",
    devices: list[str] | None = None,
):
    from caption_pipeline.training.scst import SelfCriticalConfig, train_self_critical

    datasets, vocabulary, references = scst_inputs(images)
    config = from_conf(
        SelfCriticalConfig,
        "self_critical",
        enabled=True,
        epochs=epochs,
        batch_size=3,
        samples=3,
        baseline="greedy",
        learning_rate=learning_rate,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_every_steps=1,
        keep_checkpoints=keep,
        progress=False,
        max_length=MAX_LENGTH,
    )
    keras.utils.set_random_seed(0)  # the encoder's initial weights: the same "xent model"
    model = tiny_captioner()
    return train_self_critical(
        model,
        datasets,
        vocabulary,
        references,
        config,
        steps_per_epoch=-(-images // 3),
        data_fingerprint={"data": 1},
        strategy=strategy,
        devices=devices,
    )


def test_scst_logs_reward_baseline_entropy_and_resumes_to_the_same_run(tmp_path, caplog):
    model, history, steps = run_scst(tmp_path / "whole", epochs=2)
    assert list(history["epoch"]) == [0, 1, 2]
    assert {"reward", "baseline", "entropy", "val_cider"} <= set(history.columns)
    assert list(steps["step"]) == [1, 2, 3, 4] and (steps["entropy"] > 0).all()
    # The reward's time is part of the step's, and its share per epoch is in the history.
    assert (0 < steps["reward_seconds"]).all()
    assert (steps["reward_seconds"] < steps["step_seconds"]).all()
    assert history["reward_share"].dropna().between(0, 1, inclusive="neither").all()
    assert history["reward_share"].notna().sum() == 2
    # An interrupted run: one epoch with its checkpoints kept, then the same run to 2 epochs.
    run_scst(tmp_path / "parts", epochs=1, keep=True)
    assert (tmp_path / "parts" / "ckpt" / "latest.json").exists()
    caplog.set_level("INFO", logger="caption_pipeline.training.scst")
    resumed, resumed_history, resumed_steps = run_scst(tmp_path / "parts", epochs=2)
    assert "SCST: resuming at step 2" in caplog.text  # not started afresh
    np.testing.assert_allclose(resumed_steps["reward"], steps["reward"], rtol=1e-6)
    np.testing.assert_allclose(resumed_history["val_cider"], history["val_cider"], rtol=1e-6)
    for a, b in zip(model.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_unk_is_never_sampled_unless_allowed():
    model, features = unk_loving_captioner(), image_features(2)
    u = uniforms(2, 4, seed=0)
    never = sample_captions(model, features, u)
    assert not (ops.convert_to_numpy(never.ids) == UNK_ID).any()
    assert (ops.convert_to_numpy(never.log_probs) > -1e3).all()
    allowed = sample_captions(model, features, u, allow_unk=True)
    assert (ops.convert_to_numpy(allowed.ids)[:, :, 0] == UNK_ID).all()


# Two logical CPUs must be set before TensorFlow starts: the mirrored run is a process of its own.
MIRRORED = """
import json, logging, sys
from pathlib import Path
import h5py
import numpy as np
import tensorflow as tf
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.test_sampling import run_scst
tmp = Path(sys.argv[1])
runs = {
    strategy: run_scst(tmp / strategy, 1, True, images=7, learning_rate=1e-3, strategy=strategy,
                       devices=["/cpu:0", "/cpu:1"] if strategy == "mirrored" else None)
    for strategy in ("default", "mirrored")
}

def arrays(path):  # every array of a weights file (model and optimizer), by name
    found = {}
    with h5py.File(path) as f:
        f.visititems(lambda n, x: found.update({n: x[()]}) if isinstance(x, h5py.Dataset) else None)
    return found

def trained(strategy):  # the last checkpoint's: the weights trained, whichever epoch val keeps
    root = tmp / strategy / "ckpt"
    name = json.loads((root / "latest.json").read_text())["checkpoint"]
    return arrays(root / name / "checkpoint.weights.h5")

single, mirrored = trained("default"), trained("mirrored")
start = arrays(tmp / "default" / "ckpt" / "best.weights.h5")  # epoch 0's
assert set(single) == set(mirrored), (set(single) ^ set(mirrored))
print("RESULT " + json.dumps({
    "weights": max(float(np.max(np.abs(single[k] - mirrored[k]))) for k in single),
    # beyond the cross-entropy tests' tolerance (rtol 1e-5): <= 0 if within atol 0
    "excess": max(
        float(np.max(np.abs(single[k] - mirrored[k]) - 1e-5 * np.abs(single[k]))) for k in single
    ),
    "moved": max(  # the captioner's weights (the optimizer's step count moves too)
        float(np.max(np.abs(single[k] - start[k]))) for k in start if k.startswith("captioner/")
    ),
    **{
        key: [frame[key].tolist() for frame in (runs["default"][i], runs["mirrored"][i])]
        for i, keys in ((1, ["val_cider"]), (2, ["reward", "entropy", "policy_loss"]))
        for key in keys
    },
}))
"""


def test_scst_under_the_mirrored_strategy_is_one_devices_run(tmp_path):
    """Issue 26: SCST under `mirrored` over two CPUs is data-parallel and ends where one
    device ends. 7 images in batches of 3: the replicas take 1 and 2 images of a full batch,
    and 0 and 1 of the last one (an empty share); each caption's loss is its share of the global
    batch's mean, so the ragged shares give the same update. The update is not compiled with
    XLA under a strategy (`scst.self_critical_trainer`): float32 rounding differs, hence the
    tolerances of test_multi_worker (measured: 3.1e-6 at most, on weights of size ~3)."""
    import json
    import os
    import subprocess
    import sys

    from caption_pipeline.project import PROJECT_ROOT

    result = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(tmp_path)],
        cwd=PROJECT_ROOT,
        env={**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Training with the mirrored strategy over 2 replicas" in result.stderr + result.stdout
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    print(got)
    assert got["moved"] > 1e-4  # SCST trained
    assert got["excess"] < 1e-6  # rtol 1e-5, atol 1e-6 (test_multi_worker's), every array
    for key in ("val_cider", "reward", "entropy", "policy_loss"):
        np.testing.assert_allclose(*got[key], rtol=1e-5, atol=1e-7, err_msg=key)
