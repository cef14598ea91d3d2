"""Settings and inputs the fused ops read that the other tests hold fixed: an ``ignore_index`` other than -100,
a bf16 loss over more tokens than bf16 counts exactly, a head with a bias of its own plus a logits bias, a wrapped
head in bf16, ``logits_to_keep`` in training, norm epsilons other than the test configs', the MLP projection
when only ``up`` needs a gradient, dropout and autocast inside sequence tiles and recomputed norms, a norm subclass
that changes the forward, padded labels at another ``ignore_index``. Each against stock, float64 or the plain run
(each test catches a mutant of the code that the rest of the suite let through)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from remote_code import assert_close_rel
from test_fused_models import family_pairs  # noqa: F401 - a fixture
from test_fused_ops import ops
from test_fused_ops_triton import error_against
from test_packed import LayerInputs
from test_qwen import load, saved  # noqa: F401 - saved: a fixture (a Qwen model saved as a remote-code folder)

CONFIG = types.SimpleNamespace(vocab_size=50, loss_chunk_size=3)


class WrappedHead(torch.nn.Module):
    """A head the fused op cannot see into (as a PEFT LoRA layer): it is called chunk by chunk."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def causal_inputs(generator: torch.Generator) -> tuple:
    hidden = torch.randn(2, 7, 16, generator=generator)
    labels = torch.randint(0, 50, (2, 7), generator=generator)
    labels[0, 2:4] = -1
    return hidden, labels


@pytest.mark.parametrize("wrapped", [False, True], ids=["linear", "wrapped"])
def test_shifted_loss_takes_another_ignore_index(wrapped):
    """The padding of the shifted labels and the wrapped head's chunks use the ``ignore_index`` given."""
    generator = torch.Generator().manual_seed(0)
    hidden, labels = causal_inputs(generator)
    head = torch.nn.Linear(16, 50, bias=False)
    expected = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-1)
    got = ops.lm_head_loss(hidden, WrappedHead(head) if wrapped else head, labels, CONFIG, ignore_index=-1)
    assert_close_rel(got, expected, 1e-6, "loss with ignore_index=-1")


def test_a_head_bias_and_a_logits_bias_are_both_added():
    """A replaced biased ``lm_head`` in BART, whose ``final_logits_bias`` is added to the head's output."""
    generator = torch.Generator().manual_seed(1)
    hidden, labels = causal_inputs(generator)
    labels = labels.masked_fill(labels == -1, -100)
    head, logits_bias = torch.nn.Linear(16, 50), torch.randn(1, 50, generator=generator)
    expected = F.cross_entropy((head(hidden) + logits_bias).reshape(-1, 50), labels.reshape(-1))
    got = ops.lm_head_loss(hidden, head, labels, CONFIG, shift=False, logits_bias=logits_bias)
    assert_close_rel(got, expected, 1e-6, "loss with both biases")


def test_bf16_loss_counts_its_tokens_in_float32():
    """257 counted tokens: bf16 would round the divisor to 256."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(258, 16, generator=generator).bfloat16()
    weight = torch.randn(50, 16, generator=generator).bfloat16()
    targets = torch.randint(0, 50, (258,), generator=generator)
    targets[0] = -100
    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert_close_rel(ops.linear_cross_entropy(hidden, weight, targets), expected, 1e-5, "bf16 loss over 257 tokens")


def test_bf16_wrapped_head_loss_is_taken_in_float32():
    generator = torch.Generator().manual_seed(3)
    hidden = (3 * torch.randn(4, 64, 16, generator=generator)).bfloat16()
    head = WrappedHead(torch.nn.Linear(16, 50, bias=False).bfloat16())
    labels = torch.randint(0, 50, (4, 64), generator=generator)
    expected = F.cross_entropy(head(hidden)[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert_close_rel(ops.lm_head_loss(hidden, head, labels, CONFIG), expected, 1e-5, "bf16 wrapped head loss")


def test_logits_to_keep_in_training_returns_stock_loss_and_logits(family_pairs):
    """Training with ``logits_to_keep`` (labels for the kept positions only) is stock's path, logits included."""
    stock, ours, _ = family_pairs["llama"]
    ids = torch.randint(3, stock.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    outputs = []
    for model in (stock, ours):
        model.train()
        outputs.append(model(input_ids=ids, labels=ids[:, -3:], logits_to_keep=3))
    assert ours.training and outputs[1].logits is not None
    assert_close_rel(outputs[1].loss, outputs[0].loss, 1e-5, "loss with logits_to_keep=3")
    assert_close_rel(outputs[1].logits, outputs[0].logits, 1e-5, "kept logits")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom", "qwen"])
@pytest.mark.parametrize("training", [False, True])
def test_two_dimensional_logits_to_keep_selects_as_transformers_reads_it(family_pairs, saved, name, training):
    """transformers 5.23 reads a 2-D ``logits_to_keep``: integer ``[batch, n]`` positions of each row, or a bool
    ``[batch, seq]`` mask whose True positions come back flattened. Ours indexed the sequence dimension with
    either: ``[batch, batch, n, vocab]`` logits, or an IndexError for the mask."""
    model = load(saved[0]) if name == "qwen" else family_pairs[name][1]
    model.train(training)
    ids = torch.randint(3, 90, (3, 8), generator=torch.Generator().manual_seed(8))
    positions = torch.tensor([[0, 5], [7, 2], [3, 3]])
    kept = torch.zeros(3, 8, dtype=torch.bool)
    kept[0, [1, 6]], kept[2, [0, 2, 7]] = True, True
    torch.manual_seed(0)
    with torch.no_grad():
        every = model(input_ids=ids).logits
        by_row = model(input_ids=ids, logits_to_keep=positions).logits
        by_mask = model(input_ids=ids, logits_to_keep=kept).logits
    assert by_row.shape == (3, 2, every.shape[-1]) and by_mask.shape == (5, every.shape[-1])
    assert_close_rel(by_row, torch.take_along_dim(every, positions[..., None], dim=1), 1e-6, "positions per row")
    assert_close_rel(by_mask, every[kept], 1e-6, "positions of a bool mask")
    with torch.no_grad():  # any other index, as stock's indexing takes it
        for index in ([1, 6], slice(2, 5), range(3, 5)):
            assert_close_rel(model(input_ids=ids, logits_to_keep=index).logits, every[:, index], 1e-6, str(index))


@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_rms_norm_reads_its_epsilon(eps):
    """Inputs of about 1e-3, where an epsilon of 1e-5 (LLaMA-2's) moves the output: float64 against the formula."""
    generator = torch.Generator().manual_seed(5)
    x = (1e-3 * torch.randn(3, 8, 32, generator=generator, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(32, generator=generator, dtype=torch.float64)
    expected = weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert_close_rel(ops.rms_norm(x, weight, eps), expected, 1e-12, f"RMSNorm with eps={eps}")


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_fused_layer_norm_reads_its_epsilon(eps, with_residual):
    torch.manual_seed(6)
    norm = ops.FusedLayerNorm(32, eps=eps).double().train()
    stock = torch.nn.LayerNorm(32, eps=eps).double()
    with torch.no_grad():
        for fused_param, stock_param in zip(norm.parameters(), stock.parameters(), strict=True):
            stock_param.copy_(fused_param.uniform_(-1, 1))
    x = 1e-3 * torch.randn(3, 8, 32, dtype=torch.float64)
    got = norm.with_residual(x)[0] if with_residual else norm(x)
    assert_close_rel(got, stock(x), 1e-12, f"LayerNorm with eps={eps}")


def test_bf16_silu_gradient_is_as_close_to_float64_as_stock():
    """The fused SiLU-times-up backward takes its math in float32, as stock's autograd does per op."""
    generator = torch.Generator().manual_seed(7)
    gate, up, grad = (s * torch.randn(64, 256, generator=generator) for s in (4, 1, 1))
    exact = gate.double().requires_grad_()
    (F.silu(exact) * up.double()).backward(grad.double())
    stock = gate.bfloat16().requires_grad_()
    (F.silu(stock) * up.bfloat16()).backward(grad.bfloat16())
    ours, _ = ops._activation_backward("silu_mul", grad.bfloat16(), gate.bfloat16(), up.bfloat16())
    assert error_against(exact.grad, ours) <= 1.2 * error_against(exact.grad, stock.grad)


@pytest.mark.parametrize("needs", ["up", "x", "both"])
def test_mlp_projection_gives_every_input_that_needs_it_a_gradient(needs):
    """LoRA on ``up_proj`` only, at the first layer: ``up`` needs a gradient and the activation's input not."""
    generator = torch.Generator().manual_seed(8)
    x, up = (torch.randn(2, 5, 16, generator=generator) for _ in range(2))
    x.requires_grad_(needs in ("x", "both"))
    up.requires_grad_(needs in ("up", "both"))
    projection = torch.nn.Linear(16, 8, bias=False)
    wanted = [t for t in (x, up) if t.requires_grad]
    expected = torch.autograd.grad(F.linear(F.silu(x) * up, projection.weight).sum(), wanted)
    got = torch.autograd.grad(ops.projected_activation("silu", x, projection, F.silu, up=up).sum(), wanted)
    for have, want in zip(got, expected, strict=True):
        assert_close_rel(have, want, 1e-6, f"gradient with {needs} needing one")


def test_dropout_inside_sequence_tiles_is_replayed_in_backward():
    """The recompute in backward must draw the forward's dropout masks: the tiled gradient equals the gradient
    of the same tiles run one by one with autograd, under the same seed."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 8)).train()
    x = torch.randn(1, 12, 8, requires_grad=True)
    torch.manual_seed(1)
    tiled = ops.sequence_tiled((mlp,), x, 4)
    (tiled_grad,) = torch.autograd.grad(tiled.pow(2).sum(), x)
    torch.manual_seed(1)
    plain = torch.cat([mlp(tile) for tile in x.split(4, dim=1)], dim=1)
    (plain_grad,) = torch.autograd.grad(plain.pow(2).sum(), x)
    assert torch.equal(tiled, plain)
    assert_close_rel(tiled_grad, plain_grad, 1e-6, "input gradient through dropout in tiles")


def test_sequence_tiles_recompute_under_the_forwards_autocast():
    """Backward's recompute of a tile replays the forward's autocast: the input gradient is the plain run's, bit
    for bit (float32 recomputed, it was 4e-3 off), and the weight's is its sum over tiles."""
    torch.manual_seed(9)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(1, 12, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiled, plain = ops.sequence_tiled((mlp,), x, 4), mlp(x)
    grad = torch.randn(tiled.shape).to(tiled.dtype)
    (got_x, got_weight), (expected_x, expected_weight) = (
        torch.autograd.grad(out, (x, mlp[0].weight), grad) for out in (tiled, plain)
    )
    assert torch.equal(tiled, plain) and torch.equal(got_x, expected_x)
    assert_close_rel(got_weight, expected_weight, 1e-2, "weight gradient summed over bf16 tiles")


def test_a_recomputed_norm_output_replays_the_forwards_autocast():
    """A norm whose forward runs an op autocast casts (a plain LayerNorm on CUDA; here a Linear after one): its output
    recomputed in backward is the one forward made."""
    torch.manual_seed(10)
    norm = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    weight = torch.randn(8, requires_grad=True)
    x = torch.randn(2, 5, 8, requires_grad=True)
    grad = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recomputed = ops.after_norm(norm, x, lambda h: h * weight, recompute=True)
        kept = norm(x) * weight
    got, expected = (torch.autograd.grad(out, weight, grad.to(out.dtype))[0] for out in (recomputed, kept))
    assert torch.equal(got, expected)


def test_a_norm_subclass_with_its_own_with_residual_but_a_changed_forward_runs_the_forward():
    """``with_residual`` stands for the forward only where the class defines both: here a parent changed the forward."""

    class Doubled(ops.FusedLayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    class WithResidual(Doubled):
        def with_residual(self, x):
            return ops.FusedLayerNorm.with_residual(self, x)

    torch.manual_seed(11)
    norm = WithResidual(8, dtype=torch.float64).train()
    projection = torch.nn.Linear(8, 8, dtype=torch.float64)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert_close_rel(ops.residual_after_norm(norm, x, projection), x + projection(norm(x)), 1e-12, "residual branch")


def test_padded_labels_under_another_ignore_index_still_run_unpadded(family_pairs):
    """Labels of padded positions at the model's ``ignore_index`` (-1 here) are not predicted from padding: the
    batch still runs as its kept rows (it ran padded, every row at full length)."""
    _, ours, _ = family_pairs["llama"]
    keep = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    ids = torch.randint(3, ours.config.vocab_size, keep.shape, generator=torch.Generator().manual_seed(12))
    with LayerInputs(ours) as seen:
        ours.train()(input_ids=ids, attention_mask=keep, labels=ids.masked_fill(keep == 0, -1), ignore_index=-1)
    assert seen.shapes == [(1, 13, ours.config.hidden_size)]


@pytest.mark.parametrize("name", ["sequence_tile_size", "checkpoints_on_device"])
def test_count_settings_take_none_or_a_non_negative_int_only(name):
    """``False``, ``0.0`` and ``""`` read as off while ``4.0`` was refused: every value but None or an int >= 0 is
    refused by name now."""
    read = {"sequence_tile_size": ops.sequence_tile_size,
            "checkpoints_on_device": lambda config: ops.keeps_checkpoint_on_device(config, 3, 4)}[name]
    assert read(types.SimpleNamespace(**{name: None})) in (0, False)
    assert read(types.SimpleNamespace(**{name: 2})) in (2, True)
    for value in (False, True, 0.0, 4.0, "", "4", -1):
        with pytest.raises(ValueError, match=f"config.{name} must be a non-negative int"):
            read(types.SimpleNamespace(**{name: value}))
