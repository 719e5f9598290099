"""The aggregator contract, parametrised over the registry."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.errors import ConfigError
from wsi_mil.mil import available, build_model

MODELS = sorted(available())
ATTENTION_MODELS = {"abmil", "gated_abmil", "clam_sb", "transmil"}


def _bag(n: int, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g)
    coords = torch.stack([torch.arange(n) % 7, torch.arange(n) // 7], dim=-1)[None].float()
    return x, coords


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_contract_shapes_attention_and_padding(name: str, n_outputs: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, 32, n_outputs).eval()
    xa, ca = _bag(9, seed=1)
    xb, cb = _bag(5, seed=2)
    x = torch.zeros(2, 9, 32)
    coords = torch.zeros(2, 9, 2)
    x[0], x[1, :5], coords[0], coords[1, :5] = xa[0], xb[0], ca[0], cb[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0], mask[1, :5] = True, True
    out = model(x, mask, coords)
    assert out.logits.shape == (2, n_outputs) and out.attention.shape == (2, 9)
    assert torch.isfinite(out.logits).all()
    assert (out.attention[1, 5:] == 0).all()  # padding gets no attention
    if name in ATTENTION_MODELS:
        torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2))
    # a padded bag gives the same result as the bag alone
    alone = model(xb, torch.ones(1, 5, dtype=torch.bool), cb)
    torch.testing.assert_close(out.logits[1], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention[1, :5], alone.attention[0], atol=1e-5, rtol=1e-5)

    additive = name in {"abmil", "gated_abmil", "clam_sb", "mean"}  # (transmil reads out its class token)
    assert (out.contribution is not None) == additive
    if out.contribution is not None:  # each patch's share of the logits: they add up to them, padding has none
        assert out.contribution.shape == (2, 9, n_outputs) and (out.contribution[1, 5:] == 0).all()
        torch.testing.assert_close(out.contribution.sum(dim=1), out.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.contribution[1, :5], alone.contribution[0], atol=1e-5, rtol=1e-5)


def test_a_patch_contribution_is_what_removing_its_evidence_changes() -> None:
    """abmil: a patch whose embedding moves the head up has a positive share, and the shares of a gated fusion
    are scaled by the gate as the logits are (the covariates' own term is no patch's)."""
    from wsi_mil.mil.fusion import CovariateFusion

    torch.manual_seed(0)
    mil = build_model("abmil", 32, 1).eval()
    x, coords = _bag(12, seed=3)
    mask = torch.ones(1, 12, dtype=torch.bool)
    out = mil(x, mask, coords)
    top = int(out.contribution[0, :, 0].argmax())
    h = mil.embed(x)  # the share is the attention times the head on the patch's own embedding
    torch.testing.assert_close(out.contribution[0, top, 0], out.attention[0, top] * mil.head(h[0, top])[0])
    fused = CovariateFusion(mil, 3, 1, "gated").eval()
    torch.nn.init.normal_(fused.gate.weight)
    torch.nn.init.normal_(fused.covariate_head.weight)
    cov = torch.tensor([[0.5, -1.0, 2.0]])
    f = fused(x, mask, coords, cov)
    gate = 2 * torch.sigmoid(fused.gate(cov))
    torch.testing.assert_close(f.contribution.sum(dim=1), out.logits * gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.logits - f.contribution.sum(dim=1), fused.covariate_head(cov), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_permutation_invariance(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 32, 1).eval()
    x, c = _bag(12)
    perm = torch.randperm(12)
    m = torch.ones(1, 12, dtype=torch.bool)
    a, b = model(x, m, c), model(x[:, perm], m, c[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention[0, perm], b.attention[0], atol=1e-5, rtol=1e-5)


def test_transmil_uses_coordinates_and_clam_adds_an_instance_loss() -> None:
    torch.manual_seed(0)
    model = build_model("transmil", 32, 1).eval()
    x, c = _bag(10)
    m = torch.ones(1, 10, dtype=torch.bool)
    assert not torch.allclose(model(x, m, c).logits, model(x, m, c * 3).logits)
    clam = build_model("clam_sb", 32, 1).train()
    out = clam(x, m, c, labels=torch.ones(1, 1))
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    assert all(h.weight.grad is not None for h in clam.instance_heads[1:])  # the positive class's classifier learns
    assert clam.eval()(x, m, c, labels=torch.ones(1, 1)).aux_loss is None


def test_transmil_position_is_relative_to_the_neighbours_not_to_the_glass() -> None:
    """Moving the whole bag across the slide changes nothing (no layout to memorise); moving
    instances apart changes who their neighbours are, and the prediction."""
    torch.manual_seed(0)
    model = build_model("transmil", 32, 1).eval()
    x, c = _bag(20)
    m = torch.ones(1, 20, dtype=torch.bool)
    a = model(x, m, c)
    b = model(x, m, c + torch.tensor([137.0, 59.0]))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.logits, model(x, m, c * 10).logits, atol=1e-4)
    # the original absolute encoding is still there by name, and it is not translation invariant
    absolute = build_model("transmil", 32, 1, pos="sincos", readout="cls").eval()
    assert not torch.allclose(absolute(x, m, c).logits, absolute(x, m, c + 137.0).logits, atol=1e-4)
    with pytest.raises(ConfigError, match="pos must be"):
        build_model("transmil", 32, 1, pos="learned")


def test_max_pooling_is_a_smooth_maximum_between_the_mean_and_the_max() -> None:
    torch.manual_seed(0)
    x, c = _bag(15)
    m = torch.ones(1, 15, dtype=torch.bool)
    hard = build_model("max", 32, 1, smooth=0).eval()
    inst = hard.head(hard.embed(x))[0, :, 0]
    torch.testing.assert_close(hard(x, m, c).logits[0, 0], inst.max())
    previous = inst.mean()
    for r in (0.5, 5.0, 50.0):
        soft = build_model("max", 32, 1, smooth=r).eval()
        soft.load_state_dict(hard.state_dict())
        value = soft(x, m, c).logits[0, 0]
        assert previous - 1e-5 <= value <= inst.max() + 1e-5  # rises from the mean towards the max
        previous = value
    assert inst.max() - previous < 0.1
    with pytest.raises(ConfigError, match="smooth must be"):
        build_model("max", 32, 1, smooth=-1)


def test_unknown_model_and_bad_argument_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        build_model("snuffy", 8, 1)
    with pytest.raises(ConfigError, match="abmil"):
        build_model("abmil", 8, 1, heads=3)


def test_dsmil_finds_one_witness_in_fifty_from_bag_labels() -> None:
    """A witness rate of 2 %: positive bags hold one instance shifted along a direction;
    trained on bag labels only, DSMIL separates the bags and its attention is on the
    witness; its instance loss is the aux loss of training (and absent in evaluation)."""
    g = torch.Generator().manual_seed(0)
    n_bags, n, d = 128, 50, 32
    x = torch.randn(n_bags, n, d, generator=g)
    y = (torch.arange(n_bags) % 2).float()[:, None]
    witness = torch.randint(0, n, (n_bags,), generator=g)
    direction = torch.randn(d, generator=g)
    x[y[:, 0] == 1, witness[y[:, 0] == 1]] += 5 * direction / direction.norm()
    mask = torch.ones(n_bags, n, dtype=torch.bool)
    torch.manual_seed(0)
    model = build_model("dsmil", d, 1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        model.train()
        out = model(x, mask, labels=y)
        assert out.aux_loss is not None and out.aux_loss.item() > 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x, mask)
    assert out.aux_loss is None
    from wsi_mil.eval.metrics import auc

    assert auc(y[:, 0].numpy(), out.logits[:, 0].numpy()) > 0.95
    pos = y[:, 0] == 1
    on_witness = (out.attention[pos].argmax(dim=1) == witness[pos]).float().mean()
    assert on_witness > 0.8


def test_transmil_reads_out_its_class_token_as_the_paper_does_and_keeps_the_variant_by_setting() -> None:
    """The default is the paper's readout: the logits are the head on the class token alone (changing the
    class token's parameter changes them; there is no attention-pooling branch), its attention over the
    instances is the score; readout=attention is the pooled variant, additive per patch."""
    torch.manual_seed(0)
    model = build_model("transmil", 32, 1).eval()
    assert model.readout == "cls" and not hasattr(model, "attn_v")
    x, c = _bag(12)
    m = torch.ones(1, 12, dtype=torch.bool)
    out = model(x, m, c)
    assert out.contribution is None
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(1))
    with torch.no_grad():
        model.cls.add_(torch.randn_like(model.cls))  # (not a constant: layer norm removes one)
    assert not torch.allclose(model(x, m, c).logits, out.logits)
    variant = build_model("transmil", 32, 1, readout="attention").eval()
    v = variant(x, m, c)
    assert v.contribution is not None
    torch.testing.assert_close(v.contribution.sum(dim=1), v.logits, atol=1e-5, rtol=1e-5)


def test_a_transmil_saved_before_the_class_token_default_loads_as_it_was_trained(tmp_path) -> None:
    """A spec records only the options the user gave: one written before training revision 5 with no readout
    was trained with the attention readout, and is rebuilt so (its weights fit); a new one is the paper's."""
    from wsi_mil.train.checkpoint import load_model, save_model

    torch.manual_seed(0)
    old = build_model("transmil", 16, 1, readout="attention")
    base = {"model": "transmil", "in_dim": 16, "n_outputs": 1, "model_args": {"hidden": 256, "dropout": 0.25}}
    save_model(tmp_path / "old", old, {**base, "training_revision": 4})
    loaded, _ = load_model(tmp_path / "old")
    assert loaded.readout == "attention"
    x, c = _bag(9, d=16)
    m = torch.ones(1, 9, dtype=torch.bool)
    torch.testing.assert_close(loaded(x, m, c).logits, old.eval()(x, m, c).logits)
    save_model(tmp_path / "new", build_model("transmil", 16, 1), {**base, "training_revision": 5})
    assert load_model(tmp_path / "new")[0].readout == "cls"


def _hand_embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    lin = model.embed[0]
    return torch.relu(x @ lin.weight.T + lin.bias)


@pytest.mark.parametrize("name", ["abmil", "gated_abmil", "clam_sb"])
def test_attention_mil_is_ilse_et_al_equations_computed_by_hand(name: str) -> None:
    """Published contract of attention MIL (Ilse, Tomczak and Welling 2018, eqs. 8-9): a_k =
    softmax_k(w^T tanh(V h_k)) (gated: w^T (tanh(V h_k) * sigm(U h_k))), z = sum_k a_k h_k, the
    classifier on z; written out from the weights, not through the module's helpers."""
    torch.manual_seed(0)
    model = build_model(name, 32, 1).eval()
    x, c = _bag(12)
    out = model(x, torch.ones(1, 12, dtype=torch.bool), c)
    h = _hand_embedding(model, x[0])
    a = torch.tanh(h @ model.attn_v.weight.T + model.attn_v.bias)
    if name != "abmil":  # clam_sb attends with the gate, as CLAM's authors' default
        a = a * torch.sigmoid(h @ model.attn_u.weight.T + model.attn_u.bias)
    a = torch.softmax((a @ model.attn_w.weight.T + model.attn_w.bias)[:, 0], dim=0)
    z = (a[:, None] * h).sum(dim=0)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0], z @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize(("n_outputs", "label", "multiclass"), [(1, 1.0, False), (1, 0.0, False), (3, 2, True)])
def test_clam_instance_loss_samples_as_the_authors_do(n_outputs: int, label: float, multiclass: bool) -> None:
    """CLAM-SB's instance clustering (Lu et al. 2021, the authors' inst_eval / inst_eval_out): the k
    most attended instances of a bag are positives and the k least attended negatives for the
    classifier of the bag's class (binary: a negative bag trains the negative class's classifier);
    with subtyping (multi-class) the k most attended are negatives for every other class's
    classifier, the losses averaged over the classifiers; the total is bag_weight x bag loss +
    (1 - bag_weight) x instance loss, which the trainer's unweighted bag loss meets as
    (1 - bag_weight) / bag_weight x instance loss."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = build_model("clam_sb", 32, n_outputs, dropout=0.0, k_sample=3, multiclass=multiclass).train()
    x, c = _bag(20)
    labels = torch.tensor([[label]]) if n_outputs == 1 else F.one_hot(torch.tensor([int(label)]), n_outputs).float()
    out = model(x, torch.ones(1, 20, dtype=torch.bool), c, labels=labels)
    a = out.attention[0].detach()
    top, bottom = torch.topk(a, 3).indices, torch.topk(-a, 3).indices
    h = _hand_embedding(model, x[0])
    cls = int(label)
    losses = []
    for k, head in enumerate(model.instance_heads):
        if k == cls:
            losses.append(F.cross_entropy(head(h[torch.cat([top, bottom])]), torch.tensor([1, 1, 1, 0, 0, 0])))
        elif multiclass:
            losses.append(F.cross_entropy(head(h[top]), torch.zeros(3, dtype=torch.long)))
    assert len(losses) == (n_outputs if multiclass else 1)
    expected = (1 - model.bag_weight) / model.bag_weight * torch.stack(losses).mean()
    torch.testing.assert_close(out.aux_loss, expected)


def test_dsmil_two_streams_are_the_authors_equations_computed_by_hand() -> None:
    """DSMIL (Li, Li and Eliceiri 2021): the instance stream's classifier picks the critical
    instance m = argmax_k W_0 h_k; the bag stream's attention is softmax_k(<q_k, q_m> / sqrt(|q|))
    with q = tanh(W_q h), the bag embedding sum_k a_k v_k, its logit by the 1-D convolution over
    the embedding; the prediction averages the two streams' logits (the maximum and the bag's)."""
    torch.manual_seed(0)
    model = build_model("dsmil", 32, 1).eval()
    x, c = _bag(15)
    out = model(x, torch.ones(1, 15, dtype=torch.bool), c)
    h = _hand_embedding(model, x[0])
    inst = (h @ model.instance.weight.T + model.instance.bias)[:, 0]
    m = int(inst.argmax())
    q = torch.tanh(h @ model.query[0].weight.T + model.query[0].bias)
    a = torch.softmax(q @ q[m] / q.shape[1] ** 0.5, dim=0)
    v = h @ model.value[1].weight.T + model.value[1].bias
    b = (a[:, None] * v).sum(dim=0)
    bag_logit = (model.head.weight[0, 0] * b).sum() + model.head.bias[0]
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.logits[0, 0], 0.5 * (bag_logit + inst[m]))
    # in training the bag stream's logit is the loss's and the maximum's is the auxiliary loss
    train = model.train()
    model.value[0].p = 0.0
    model.embed[2].p = 0.0
    tr = train(x, torch.ones(1, 15, dtype=torch.bool), c, labels=torch.ones(1, 1))
    torch.testing.assert_close(tr.logits[0, 0], bag_logit)
    torch.testing.assert_close(tr.aux_loss, model.instance_weight * torch.nn.functional.softplus(-inst[m]))


def test_pooling_baselines_are_their_formulas() -> None:
    """mean: the classifier on the mean embedding; max: log-sum-exp of the instance logits with
    sharpness r, minus log n, over r (the hard maximum at r = 0)."""
    torch.manual_seed(0)
    x, c = _bag(10)
    m = torch.ones(1, 10, dtype=torch.bool)
    mean = build_model("mean", 32, 1).eval()
    h = _hand_embedding(mean, x[0])
    torch.testing.assert_close(mean(x, m, c).logits[0], h.mean(dim=0) @ mean.head.weight.T + mean.head.bias)
    for smooth in (5.0, 0.0):
        mx = build_model("max", 32, 1, smooth=smooth).eval()
        s = (_hand_embedding(mx, x[0]) @ mx.head.weight.T + mx.head.bias)[:, 0]
        want = s.max() if smooth == 0 else (torch.logsumexp(smooth * s, dim=0) - torch.log(torch.tensor(10.0))) / smooth
        torch.testing.assert_close(mx(x, m, c).logits[0, 0], want)
