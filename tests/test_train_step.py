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

from covjax import losses, memory, sharding, train_step, trainer
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


def _assert_gradients_close(grads, ref_grads):
    """rtol 1e-5 (float32), each leaf's tiny entries compared at 1e-5 of its largest."""
    for g, ref_g in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        g, ref_g = np.asarray(g), np.asarray(ref_g)
        np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5 * np.abs(ref_g).max())


def step_config(method: str, micro_batch_size: int = B, **loss_fields) -> train_step.StepConfig:
    """`method`'s LossConfig in the plain step the references below assume: no entropy or KL
    term, temperature 1."""
    return train_step.StepConfig(
        loss=losses.LossConfig(method, **loss_fields), cov_scope="minibatch", entropy_coef=0.0,
        kl_coef=0.0, kl_estimator="low_var_kl", temperature=1.0,
        micro_batch_size=micro_batch_size, chunk_size=1024, length_granularity=3,
    )


CLIP_COV = step_config(
    "clip_cov", clip_low=1.0, clip_high=1.0, clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=50.0
)
KL_COV = step_config("kl_cov", kl_cov_ratio=0.2, kl_cov_coef=1.0)


def test_minibatch_selection_is_independent_of_micro_batching(model, batch):
    """Clip-Cov's random choice over the whole mini-batch: the same with 1 and 4 micro-batches
    (KL-Cov with 4 micro-batches is checked against a full-batch reference below)."""
    one, m1 = _our_gradients(model, batch, CLIP_COV)
    four, m4 = _our_gradients(model, batch, dataclasses.replace(CLIP_COV, micro_batch_size=B // 4))
    assert m1["num_selected"] >= 2  # floor(0.2 * 30 tokens) = 6 wanted: the selection matters
    assert m1["num_selected"] == m4["num_selected"]
    _assert_gradients_close(four, one)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)


def test_microbatch_scope_selects_per_micro_batch(model, batch):
    """The reference behaviour: KL-Cov's covariance, count floor(r * N) and top-k taken per
    micro-batch of 2 consecutive rows (lengths 5 5 | 4 3 | 5 2 | 5 1, not regrouped by length,
    whatever length_granularity), against the per-chunk NumPy selection's gradients."""
    cfg = dataclasses.replace(KL_COV, cov_scope="microbatch", micro_batch_size=2)
    ours, metrics = _our_gradients(model, batch, cfg)
    counts = [max(int(0.2 * n), 1) for n in (5 + 5, 4 + 3, 5 + 2, 5 + 1)]
    assert metrics["num_selected"] == sum(counts) == 5
    ref = _reference_gradients(model, batch, method="kl_cov", chunk_rows=2)
    for g, ref_g in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        g, ref_g = np.asarray(g), np.asarray(ref_g)
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-4 * np.abs(ref_g).max())


def _kl_cov_selection(lp, a, mask):
    """KL-Cov's tokens (ALGORITHMS.md 2): the floor(0.2 * N) largest Eq. 10 covariances, ties to
    the lower row-major position."""
    cov = (lp - lp[mask].mean()) * (a - a[mask].mean())
    k = max(int(0.2 * mask.sum()), 1)
    flat = np.where(mask, cov, -np.inf).reshape(-1)
    selected = np.zeros(flat.shape, bool)
    selected[np.argsort(-flat, kind="stable")[:k]] = True
    return selected.reshape(mask.shape)


def _reference_gradients(model, batch, *, method, chunk_rows=B):
    """Independent gradients: full logits from model(...), the loss of ALGORITHMS.md 3 written
    out here (token-mean), jax.grad; KL-Cov selects within each chunk of `chunk_rows`
    consecutive rows."""
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
        selected = np.concatenate([
            _kl_cov_selection(lp[s : s + chunk_rows], a[s : s + chunk_rows],
                              mask[s : s + chunk_rows])
            for s in range(0, B, chunk_rows)
        ])

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

    return jax.jit(jax.grad(loss_fn))(params)


_UPDATES = {}
_GRADIENTS = {}
KEEP = optax.GradientTransformation(  # keeps the gradients as its state, the parameters as they are
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
)


def _compiled_update(model, batch, cfg, mesh_shape=(1, 1, 1)):
    """(compiled update with the KEEP optimizer, its mesh, a fresh placed state) on a
    (data, fsdp, tensor) mesh; the compiled programs are shared by the tests."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: np.prod(mesh_shape)])
    state = train_step.init_state(jax.tree.map(jnp.copy, params), KEEP)
    state_sharding = train_step.state_shardings(
        state, train_step.param_shardings(params, mesh), mesh
    )
    key = (cfg, mesh_shape)
    if key not in _UPDATES:
        _UPDATES[key] = train_step.CompiledUpdate(
            graphdef=graphdef, rest=rest, tx=KEEP, schedule=optax.constant_schedule(0.0), cfg=cfg,
            state_sharding=state_sharding,
            batch_sharding=train_step.batch_shardings(batch, mesh), mesh=mesh,
        )
    return _UPDATES[key], mesh, jax.device_put(state, state_sharding)


def _our_gradients(model, batch, cfg, mesh_shape=(1, 1, 1), **kwargs):
    """(gradients, metrics) of the compiled update: the KEEP optimizer's new state."""
    key = (cfg, mesh_shape)
    if key not in _GRADIENTS or kwargs:
        fn, mesh, state = _compiled_update(model, batch, cfg, mesh_shape)
        with jax.set_mesh(mesh):
            new_state, metrics = fn(state, batch, jax.random.key(7), **kwargs)
        if kwargs:
            return jax.device_get((new_state.opt_state, metrics))
        _GRADIENTS[key] = jax.device_get((new_state.opt_state, metrics))
    return _GRADIENTS[key]


@pytest.mark.parametrize("method", ["ppo", "kl_cov"])
def test_update_matches_independent_computation(model, batch, method):
    """The gradients the update hands its optimizer, micro-batches cut to their rows, against
    full-length logits and the loss written out. Float32 sums in another order differ by a few
    roundings of a leaf's largest gradient: the gradients are compared at that scale."""
    cfg = step_config(method, B // 4, kl_cov_ratio=0.2)
    ours, metrics = _our_gradients(model, batch, cfg)
    ref = _reference_gradients(model, batch, method=method)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(ref), rtol=1e-4)
    for g, ref_g in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        g, ref_g = np.asarray(g), np.asarray(ref_g)
        np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-4 * np.abs(ref_g).max())


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 8, 1)], ids=["1dev", "fsdp8"])
def test_micro_batches_cut_to_their_rows_equal_the_padded_update(model, batch, mesh_shape):
    """Clip-Cov (random choice over the whole mini-batch) computed to each micro-batch's longest
    row (lengths 1 2 | 3 4 | 5 5 | 5 5, rounded up to 3 | 5 | 5 | 5) gives the loss, selection and
    gradients of every row computed to R on one device (rtol 1e-5, float32)."""
    cfg = dataclasses.replace(CLIP_COV, micro_batch_size=B // 4)
    plan = train_step.plan_micro_batches(batch["mask"], cfg.micro_batch_size, 3)
    assert [mb.length for mb in plan] == [3, 5, 5, 5]
    padded, padded_m = _our_gradients(model, batch, dataclasses.replace(cfg, length_granularity=R))
    cut, cut_m = _our_gradients(model, batch, cfg, mesh_shape)
    assert padded_m["num_selected"] >= 2 and cut_m["num_selected"] == padded_m["num_selected"]
    for name in ("loss", "cov_selected_mean", "entropy", "grad_norm"):
        np.testing.assert_allclose(cut_m[name], padded_m[name], rtol=1e-5, err_msg=name)
    _assert_gradients_close(cut, padded)


def test_first_mini_batch_selects_on_old_logp_without_a_forward(model, batch):
    """On-policy (old_logp computed by these parameters), selecting on old_logp gives the
    selection, loss and gradients of the pre-pass forward, with its 4 micro-batch forwards fewer."""
    cfg = dataclasses.replace(CLIP_COV, micro_batch_size=B // 4)
    fn, mesh, state = _compiled_update(model, batch, cfg)
    with jax.set_mesh(mesh):
        old_logp, entropy = fn.logprobs(state.params, batch)
    # rows of lengths 1 and 3 computed to 3 columns: their padding columns hold 0, not a log-prob
    assert np.all(np.asarray(old_logp)[~batch["mask"]] == 0)
    assert np.all(np.asarray(entropy)[~batch["mask"]] == 0)
    assert np.all(np.asarray(entropy)[batch["mask"]] > 0)
    on_policy = {**batch, "old_logp": np.asarray(old_logp)}
    forwards, results = [], []
    for logp_is_old in (False, True):
        before = fn.forwards
        results.append(_our_gradients(model, on_policy, cfg, logp_is_old=logp_is_old))
        forwards.append(fn.forwards - before)
    assert forwards == [8, 4]  # pre-pass + gradients; gradients only
    (recomputed, m_re), (reused, m_old) = results
    assert m_re["num_selected"] >= 2
    for name in ("num_selected", "cov_selected_mean", "loss", "grad_norm"):
        np.testing.assert_allclose(m_old[name], m_re[name], rtol=1e-6, err_msg=name)
    _assert_gradients_close(reused, recomputed)


def test_plan_sorts_rows_and_bounds_lengths():
    """Rows sorted by response length; lengths rounded up, capped at R. Not by length: the
    consecutive rows at all R columns."""
    mask = np.arange(10)[None, :] < np.array([[7], [0], [10], [2], [9], [1], [3], [4]])
    plan = train_step.plan_micro_batches(mask, 2, 4)
    assert [mb.rows.tolist() for mb in plan] == [[1, 5], [3, 6], [7, 0], [4, 2]]
    assert [mb.length for mb in plan] == [4, 4, 8, 10]
    assert train_step.computed_tokens(plan, prompt_columns=3) == 2 * (6 + 6 + 10 + 12)
    plan = train_step.plan_micro_batches(mask, 2, 4, by_length=False)
    assert [mb.rows.tolist() for mb in plan] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [mb.length for mb in plan] == [10] * 4


def test_step_config_from_config_and_bad_micro_batch():
    c = recipes().toy_config("kl_cov")
    cfg = train_step.StepConfig.from_config(c)
    assert (cfg.loss.method, cfg.loss.kl_cov_ratio, cfg.micro_batch_size) == ("kl_cov", 0.4, 128)
    assert cfg.preselect and not dataclasses.replace(cfg, cov_scope="microbatch").preselect
    with pytest.raises(ValueError, match="micro_batch_size=3"):
        train_step.plan_micro_batches(np.ones((8, 5), bool), 3, 1)


def test_remat_policies_change_nothing(model):
    """Each named remat policy (what a layer keeps for the backward) gives the gradients of no
    remat: the policies trade memory for recomputation only."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 6)), jnp.int32)

    def grads(policy):
        m = Transformer(dataclasses.replace(model.config, remat=policy), rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest).hidden_states(ids) ** 2)

        return jax.jit(jax.grad(loss))(params)

    ref = jax.tree.leaves(grads("none"))
    for policy in ("minimal", "save_attention"):  # "layer": tests/test_model.py
        for g, ref_g in zip(jax.tree.leaves(grads(policy)), ref, strict=True):
            scale = np.abs(ref_g).max()  # recomputed sums round differently: compared at scale
            np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-4 * scale, err_msg=policy)


def test_auto_remat_is_the_least_recomputation_that_fits():
    """covjax.memory's saved activations per policy (closed form for Qwen2.5-7B: 28 layers,
    d = 3584, 28 + 4 + 4 heads of 128, 2 rows x 10239 tokens per device, bf16) and the choice:
    "minimal" fits 8 x H100-80GB and 8 x H200 at the 7B recipe's micro-batch; a budget below its
    peak falls back; the CPU (no memory figure) takes "layer"."""
    mesh = memory.MeshShape(fsdp=8)
    act = dict(micro_batch=2, seq_len=2048 + 8192 - 1, response_len=8192)
    tokens_bytes = 28 * 2 * 10239 * 2
    saved = {"layer": 3584, "save_attention": 3584 + 28 * 128,
             "minimal": 2 * 3584 + (28 + 8) * 128 + 28 * 128}
    peaks = {}
    for policy, per_token in saved.items():
        cfg = dataclasses.replace(memory.QWEN2_5_7B, remat=policy)
        assert memory.activation_bytes(cfg, mesh, **act)["layer_inputs"] == tokens_bytes * per_token
        peaks[policy] = memory.update_peak_bytes(cfg, mesh, **act)
    for hbm_gb in (80, 141):  # H100, H200; 10% kept free as the memory model's tables do
        assert memory.choose_remat(memory.QWEN2_5_7B, mesh, 0.9 * hbm_gb * memory.GB, **act) == (
            "minimal"
        )
        assert peaks["minimal"] <= 0.9 * hbm_gb * memory.GB
    below = peaks["minimal"] - 1
    assert memory.choose_remat(memory.QWEN2_5_7B, mesh, below, **act) == "save_attention"
    assert memory.choose_remat(memory.QWEN2_5_7B, mesh, 1.0, **act) == "layer"
    config = recipes().paper_recipe("7b", "clip_cov")
    assert config.model.remat == "auto"
    assert trainer.remat_policy(config, None, memory.QWEN2_5_7B) == "layer"  # CPU
