"""covjax.train_step: the mini-batch update against an independent computation, and its
independence of micro-batching (selection over the whole mini-batch). Its independence of the
device mesh: tests/test_multihost.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ragged_update_batch, recipes

from covjax import losses, sharding, train_step
from covjax.model import Transformer
from covjax.tasks import toy_warm_start as toy_ws

B, P, R = 8, 2, 5  # rows, prompt length, response length


@pytest.fixture(scope="module")
def model():
    return Transformer(toy_ws.model_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch(model):
    """Random sequences with ragged responses; old_logp = the policy's logp + noise (off-policy)."""
    return ragged_update_batch(
        model, rows=B, prompt_len=P, response_len=R, lengths=[5, 5, 4, 3, 5, 2, 5, 1], seed=0
    )


_RESULTS = {}


def _run_update(model, batch, cfg, *, lr=1e-2):
    """One compiled update of `model`'s params on `batch` on one device; returns (new params,
    metrics)."""
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    key = (cfg, lr)
    if key not in _RESULTS:
        _RESULTS[key] = _compiled_update(model, batch, cfg, mesh, lr)
    return _RESULTS[key]


def _compiled_update(model, batch, cfg, mesh, lr):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = train_step.make_optimizer(lr, 0.01, 1.0, 0)
    with jax.set_mesh(mesh):
        param_sharding = train_step.param_shardings(params, mesh)
        state = train_step.init_state(jax.tree.map(jnp.copy, params), tx)
        state_sharding = train_step.state_shardings(state, param_sharding, mesh)
        state = jax.device_put(state, state_sharding)
        fn = train_step.compile_update(
            graphdef=graphdef, rest=rest, tx=tx, schedule=schedule, cfg=cfg,
            state_sharding=state_sharding,
            batch_sharding=train_step.batch_shardings(batch, mesh), mesh=mesh,
        )
        new_state, metrics = fn(state, batch, jax.random.key(7))
    return jax.device_get(new_state.params), jax.device_get(metrics)


def _assert_params_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def step_config(method: str, micro_batch_size: int = B, **loss_fields) -> train_step.StepConfig:
    """`method`'s LossConfig in the plain step the references below assume: no entropy or KL
    term, temperature 1."""
    return train_step.StepConfig(
        loss=losses.LossConfig(method, **loss_fields), cov_scope="minibatch", entropy_coef=0.0,
        kl_coef=0.0, kl_estimator="low_var_kl", temperature=1.0,
        micro_batch_size=micro_batch_size, chunk_size=1024,
    )


CLIP_COV = step_config(
    "clip_cov", clip_low=1.0, clip_high=1.0, clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=50.0
)
KL_COV = step_config("kl_cov", kl_cov_ratio=0.2, kl_cov_coef=1.0)


def test_minibatch_selection_is_independent_of_micro_batching(model, batch):
    """Clip-Cov's random choice over the whole mini-batch: the same with 1 and 4 micro-batches
    (KL-Cov with 4 micro-batches is checked against a full-batch reference below)."""
    one, m1 = _run_update(model, batch, CLIP_COV)
    four, m4 = _run_update(model, batch, dataclasses.replace(CLIP_COV, micro_batch_size=B // 4))
    assert m1["num_selected"] >= 2  # floor(0.2 * 30 tokens) = 6 wanted: the selection matters
    assert m1["num_selected"] == m4["num_selected"]
    _assert_params_close(one, four, rtol=1e-5, atol=1e-4)  # 1% of lr: Adam ~ lr*sign(g)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)


def test_microbatch_scope_selects_per_micro_batch(model, batch):
    """The reference behaviour: the count floor(r * N) is taken per micro-batch of 2 rows."""
    cfg = dataclasses.replace(KL_COV, cov_scope="microbatch", micro_batch_size=2)
    _, metrics = _run_update(model, batch, cfg)
    counts = [max(int(0.2 * batch["mask"][j::4].sum()), 1) for j in range(4)]  # strided split
    assert metrics["num_selected"] == sum(counts)


def _reference_update(model, batch, *, method, lr):
    """An independent update: full logits from model(...), the loss of ALGORITHMS.md 3 written
    out here (token-mean), jax.grad, then optax clip + AdamW."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mask = batch["mask"]
    num_tokens = mask.sum()
    selected = np.zeros_like(mask)
    if method == "kl_cov":  # top-k of Eq. 10 covariance with the policy's own logp
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(batch["input_ids"])))
        logits = logits[:, P - 1 :]
        lp = np.take_along_axis(
            np.asarray(jax.nn.log_softmax(logits, -1)), batch["targets"][..., None], -1
        )[..., 0]
        a = batch["advantages"]
        cov = (lp - lp[mask].mean()) * (a - a[mask].mean())
        k = max(int(0.2 * num_tokens), 1)
        flat = np.where(mask, cov, -np.inf).reshape(-1)
        selected = np.zeros(flat.shape, bool)
        selected[np.argsort(-flat, kind="stable")[:k]] = True
        selected = selected.reshape(mask.shape)

    def loss_fn(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(batch["input_ids"]))[:, P - 1 :]
        logp = jnp.take_along_axis(
            jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1
        )[..., 0]
        ratio = jnp.exp(logp - batch["old_logp"])
        adv = batch["advantages"]
        if method == "ppo":
            loss = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 0.8, 1.2))
        else:
            loss = -adv * ratio + jnp.where(selected, jnp.abs(logp - batch["old_logp"]), 0.0)
        return jnp.sum(jnp.where(mask, loss, 0.0)) / num_tokens

    grads = jax.jit(jax.grad(loss_fn))(params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), grads


def _our_gradients(model, batch, cfg):
    """The gradients `train_step.update` hands its optimizer: the same compiled update, with an
    optimizer that keeps them as its state and leaves the parameters as they are."""
    keep = optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        state = train_step.init_state(jax.tree.map(jnp.copy, params), keep)
        state_sharding = train_step.state_shardings(
            state, train_step.param_shardings(params, mesh), mesh
        )
        fn = train_step.compile_update(
            graphdef=graphdef, rest=rest, tx=keep, schedule=optax.constant_schedule(0.0), cfg=cfg,
            state_sharding=state_sharding,
            batch_sharding=train_step.batch_shardings(batch, mesh), mesh=mesh,
        )
        new_state, _ = fn(jax.device_put(state, state_sharding), batch, jax.random.key(7))
    return jax.device_get(new_state.opt_state)


@pytest.mark.parametrize("method", ["ppo", "kl_cov"])
def test_update_matches_independent_computation(model, batch, method):
    cfg = step_config(method, B // 4, kl_cov_ratio=0.2)
    ours, metrics = _run_update(model, batch, cfg, lr=1e-2)
    ref, ref_grads = _reference_update(model, batch, method=method, lr=1e-2)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref_grads), rtol=1e-4)
    # Float32 sums in another order differ by a few roundings of a leaf's largest gradient: the
    # gradients are compared at that scale. Adam's first step is ~lr * sign(g), which roundoff
    # flips where g is near zero: the update is compared where |g| is not tiny at that scale.
    num_compared = num_nonzero = 0
    leaves = (jax.tree.leaves(t) for t in (_our_gradients(model, batch, cfg), ref_grads, ours, ref))
    for g, ref_g, new, ref_new in zip(*leaves, strict=True):
        g, ref_g, new, ref_new = map(np.asarray, (g, ref_g, new, ref_new))
        scale = np.abs(ref_g).max()
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-4 * scale)
        stable = np.abs(ref_g) > 1e-3 * scale
        np.testing.assert_allclose(new[stable], ref_new[stable], rtol=1e-4, atol=1e-4)  # lr / 100
        num_compared += stable.sum()
        num_nonzero += (ref_g != 0).sum()
    assert num_compared >= 0.9 * num_nonzero  # only the near-zero tail is left out


def test_step_config_from_config_and_bad_micro_batch():
    c = recipes().toy_config("kl_cov")
    cfg = train_step.StepConfig.from_config(c)
    assert (cfg.loss.method, cfg.loss.kl_cov_ratio, cfg.micro_batch_size) == ("kl_cov", 0.4, 128)
    assert cfg.preselect and not dataclasses.replace(cfg, cov_scope="microbatch").preselect
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        train_step.update(
            None, {k: jnp.zeros((8, 5)) for k in ("targets", "mask", "advantages", "old_logp")},
            jax.random.key(0), graphdef=None, rest=None, tx=None, schedule=None,
            cfg=dataclasses.replace(cfg, micro_batch_size=3),
        )
