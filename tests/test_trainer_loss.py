"""The heads' losses under transformers' Trainer: gradient accumulation takes the step of the whole batch, with and
without label smoothing, where transformers lets it (its label smoother counts from 5.1x on).

Runs on transformers 5.x and 4.57.x.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from test_stock_behaviour import VOCAB, family_config, stock_and_ours

LABELLED_HEADS = {
    "llama": ["LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForTokenClassification"],
    "gpt2": ["GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2ForTokenClassification", "GPT2DoubleHeadsModel"],
    "bloom": ["BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification"],
    "bart": ["BartForConditionalGeneration", "BartForSequenceClassification", "BartForCausalLM"],
}


def labels_for(class_name: str, ids: torch.Tensor) -> torch.Tensor:
    if "SequenceClassification" in class_name:
        return torch.tensor([0, 1])
    if "TokenClassification" in class_name:
        return ids % 2
    return ids


@pytest.mark.parametrize("family", list(LABELLED_HEADS))
def test_heads_that_take_loss_kwargs_divide_by_the_trainers_count(family, tmp_path):
    """transformers' Trainer passes ``num_items_in_batch`` to a model that takes loss kwargs (``**kwargs`` in its
    forward, or ``accepts_loss_kwargs``) and then leaves the loss undivided by the accumulation steps: a head that
    says it takes them must divide by the count, or accumulated micro-batches would add up their means."""
    for class_name in LABELLED_HEADS[family]:
        _, ours = stock_and_ours(family, class_name, tmp_path / class_name)
        ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
        ids[:, -1] = ours.config.eos_token_id if family == "bart" else ids[:, -1]
        inputs = {"input_ids": ids[:, None] if "DoubleHeads" in class_name else ids}
        inputs["labels"] = labels_for(class_name, inputs["input_ids"])
        with torch.no_grad():
            plain = ours(**inputs).loss
            counted = ours(**inputs, num_items_in_batch=torch.tensor(100)).loss
        honours = not torch.allclose(plain, counted)
        assert honours or not getattr(ours, "accepts_loss_kwargs", True), class_name


def smoother_counts() -> bool:
    """Whether the Trainer's label smoother divides by ``num_items_in_batch`` (transformers 5.1x on)."""
    from transformers.trainer_pt_utils import LabelSmoother

    return "num_items_in_batch" in inspect.signature(LabelSmoother.__call__).parameters


ACCUMULATED_HEADS = [
    ("bart", "BartForConditionalGeneration", None),
    ("bart", "BartForCausalLM", None),
    ("bart", "BartForSequenceClassification", None),
    ("llama", "LlamaForSequenceClassification", None),
    ("llama", "LlamaForSequenceClassification", "multi_label_classification"),
    ("llama", "LlamaForTokenClassification", None),
    ("gpt2", "GPT2ForSequenceClassification", "regression"),
    ("gpt2", "GPT2ForTokenClassification", None),
    ("bloom", "BloomForSequenceClassification", None),
    ("bloom", "BloomForTokenClassification", None),
]


def without_dropout(config):
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    return config


def accumulation_examples(family: str, class_name: str, problem_type, uneven: bool) -> list:
    """Examples for the step test: with ``uneven``, three (micro-batches of two and one) whose token heads count
    different numbers of labels; else four with the same count each."""
    count = 3 if uneven else 4
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(3, VOCAB, (count, 6), generator=generator)
    if family == "bart":
        ids[:, -1] = 2  # BART's sequence classification pools the last <eos>
    if problem_type == "regression":
        labels = torch.randn(count, generator=generator)
    elif problem_type == "multi_label_classification":
        labels = torch.randint(0, 2, (count, 3), generator=generator).float()
    elif "SequenceClassification" in class_name:
        labels = torch.randint(0, 3, (count,), generator=generator)
    else:
        labels = ids.flip(1) % 3 if "TokenClassification" in class_name else ids.flip(1).clone()
        if uneven:
            labels[1, :4] = -100
    return [{"input_ids": row, "labels": target} for row, target in zip(ids, labels)]


@pytest.mark.parametrize(
    "family, class_name, problem_type, label_smoothing",
    # the Trainer's label smoothing takes class indices: not for regression, and it turns itself off for multi-label
    [(*head, smoothing) for head in ACCUMULATED_HEADS for smoothing in (0.0, 0.1) if not (head[2] and smoothing)],
)
def test_trainer_gradient_accumulation_takes_the_whole_batchs_step(family, class_name, problem_type, label_smoothing,
                                                                  tmp_path):
    """Micro-batches of different sizes or counted tokens, accumulated, take the step of one batch of them all:
    our heads divide their summed loss by the Trainer's ``num_items_in_batch`` (stock BART and stock classification
    heads ignore it, and the Trainer summed their micro-batches' means), and with label smoothing the Trainer,
    given the count, divides its own loss by it (a head that declared no loss kwargs got an average of the
    micro-batches' means). Before transformers 5.1x the label smoother takes no count, so the Trainer averages
    the micro-batches (exact for micro-batches of equal counts, which the test then takes)."""
    from transformers import Trainer, TrainingArguments

    config = without_dropout(family_config(family, num_labels=1 if problem_type == "regression" else 3))
    config.problem_type = problem_type
    examples = accumulation_examples(family, class_name, problem_type, uneven=smoother_counts())
    steps = []
    for batch, accumulation in ((len(examples), 1), (2, 2)):
        _, ours = stock_and_ours(family, class_name, tmp_path / f"{batch}x{accumulation}", config=config)
        before = {name: param.detach().clone() for name, param in ours.named_parameters()}
        arguments = TrainingArguments(
            output_dir=str(tmp_path / f"run{batch}x{accumulation}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
            save_strategy="no", logging_strategy="no", label_smoothing_factor=label_smoothing,
        )  # fmt: skip
        Trainer(model=ours.train(), args=arguments, train_dataset=examples).train()
        steps.append({name: param.detach() - before[name] for name, param in ours.named_parameters()})
    whole, accumulated = steps
    largest = max(step.norm() for step in whole.values())
    assert largest > 0, "the step changed no weight"
    for name, step in whole.items():
        # a step a thousand times smaller than the largest (a key bias, whose gradient is zero) is rounding
        scale = max(step.norm(), 1e-3 * largest)
        assert (accumulated[name] - step).norm() <= 1e-4 * scale, f"{name}'s step differs"


WHOLE_BATCH_HEADS = [
    ("bart", "BartForConditionalGeneration", None), ("bart", "BartForSequenceClassification", None),
    ("llama", "LlamaForSequenceClassification", "regression"), ("llama", "LlamaForTokenClassification", None),
    ("gpt2", "GPT2ForSequenceClassification", "multi_label_classification"),
    ("gpt2", "GPT2ForTokenClassification", None), ("bloom", "BloomForTokenClassification", None),
    ("bloom", "BloomForSequenceClassification", "single_label_classification"),  # class probabilities
]  # fmt: skip


@pytest.mark.parametrize("precision", ["float32", "autocast", "bfloat16"])
@pytest.mark.parametrize("family, class_name, problem_type", WHOLE_BATCH_HEADS)
def test_one_whole_batch_has_the_same_loss_with_the_trainers_count(family, class_name, problem_type, precision,
                                                                   tmp_path):
    """Given the count the Trainer takes for a batch (its labels other than -100: every entry of regression,
    multi-label and class-probability labels), the loss of that one batch is its plain loss: class probabilities
    [batch, num_labels] were divided by num_labels times too many (eval_loss a quarter of stock's for 4 labels).
    Under autocast the plain loss of bfloat16 logits is float32, and so is the counted one (it was returned in
    the logits' dtype: in float16, GradScaler's first scale of 2**16 overflowed it, every gradient inf). A
    bfloat16 model's loss has the dtype of its logits with the labels (float32 labels: float32)."""
    config = without_dropout(family_config(family, num_labels=1 if problem_type == "regression" else 4))
    config.problem_type = problem_type
    _, ours = stock_and_ours(family, class_name, tmp_path, config=config)
    generator = torch.Generator().manual_seed(8)
    ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    if family == "bart":
        ids[:, -1] = 2
    if problem_type == "single_label_classification":
        labels = torch.randn(3, 4, generator=generator).softmax(-1)
    elif problem_type is not None:
        labels = torch.rand(3, 1 if problem_type == "regression" else 4, generator=generator).squeeze(-1)
    elif "SequenceClassification" in class_name:
        labels = torch.tensor([1, -100, 3])
    else:
        labels = (ids % 4).masked_fill(torch.rand(ids.shape, generator=generator) < 0.3, -100)
    ours.to(torch.bfloat16 if precision == "bfloat16" else torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        plain = ours(input_ids=ids, labels=labels).loss
        counted = ours(input_ids=ids, labels=labels, num_items_in_batch=labels.ne(-100).sum()).loss
    assert counted.dtype == plain.dtype
    assert plain.dtype == torch.float32 or (precision == "bfloat16" and not labels.is_floating_point())
    assert torch.allclose(counted, plain, rtol=1e-2 if precision == "bfloat16" else 1e-6, atol=0), (counted, plain)


def test_the_counted_token_loss_sums_in_float32():
    """A float16 sum over 70,000 tokens passes float16's largest value (65,504): the counted loss was inf where
    the mean is finite."""
    import importlib

    kernel_layer = importlib.import_module("memory_efficient_adapter.attention")
    generator = torch.Generator().manual_seed(9)
    logits = (3 * torch.randn(70_000, 3, generator=generator)).half()
    labels = torch.randint(0, 3, (70_000,), generator=generator)
    counted = kernel_layer.token_loss(logits, labels, num_items_in_batch=torch.tensor(70_000))
    expected = torch.nn.functional.cross_entropy(logits.double(), labels)
    assert counted.dtype == torch.float16 and torch.isfinite(counted)
    assert abs(counted.double() - expected) <= 1e-3 * expected


def test_accepts_loss_kwargs_can_be_set_by_hand_as_on_a_stock_model(tmp_path):
    _, ours = stock_and_ours("gpt2", "GPT2ForTokenClassification", tmp_path)
    for value in (False, True):
        ours.accepts_loss_kwargs = value
        assert ours.accepts_loss_kwargs is value


@pytest.mark.parametrize(
    "family, class_name",
    [("bart", "BartForConditionalGeneration"), ("llama", "LlamaForSequenceClassification")],
)
def test_a_subclass_whose_forward_takes_no_loss_kwargs_gets_none_from_the_trainer(tmp_path, family, class_name):
    """The Trainer passes ``num_items_in_batch`` where the model takes loss kwargs; for a stock model it reads the
    forward's signature. Ours said True for a user's subclass whose forward takes no ``**kwargs``: the Trainer
    passed the count and the step failed with an unexpected keyword argument."""
    from transformers import Trainer, TrainingArguments

    stock, ours = stock_and_ours(family, class_name, tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    accepts = ours.accepts_loss_kwargs  # False before transformers 5.1x (the label smoother)
    for model in (stock, ours):
        def forward(self, input_ids=None, attention_mask=None, labels=None):
            return super(type(self), self).forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

        model.__class__ = type(f"Users{class_name}", (type(model),), {"forward": forward})
        assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False, type(model).__module__
        model.__class__ = type(f"Users{class_name}WithKwargs", (type(model).__base__,), {})
    assert Trainer(model=ours, args=args).model_accepts_loss_kwargs is accepts


LM_HEADS = [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"), ("bloom", "BloomForCausalLM"),
            ("bart", "BartForCausalLM"), ("bart", "BartForConditionalGeneration")]  # fmt: skip


def trainer_shifts_causal_counts() -> bool:
    """Whether the Trainer counts ``labels[..., 1:]`` for a model whose ``loss_type`` maps to the causal-LM loss
    (transformers 5.2x on); before, it counts every label for every model."""
    from transformers import Trainer

    return "_loss_shifts_labels" in inspect.getsource(Trainer.__init__)


@pytest.mark.parametrize("family, class_name", LM_HEADS)
def test_the_trainers_step_of_one_batch_is_the_step_of_its_mean_loss(family, class_name, tmp_path):
    """The Trainer counts the labels its model predicts from the ``loss_type`` the class name gives. GPT-2's LM
    head names no loss type, so its shifted loss was divided by the count of every label (as stock's); BART's
    causal LM, named a causal LM, does not shift, so its loss and step were 23/19 of the batch's mean. Where the
    Trainer counts every label, the first label of each row is -100, so both counts agree."""
    from transformers import Trainer, TrainingArguments

    _, ours = stock_and_ours(family, class_name, tmp_path, config=without_dropout(family_config(family)))
    generator = torch.Generator().manual_seed(10)
    ids = torch.randint(3, VOCAB, (3, 7), generator=generator)
    labels = ids.flip(1).masked_fill(torch.rand(ids.shape, generator=generator) < 0.3, -100)
    labels[:, 0] = torch.where(labels[:, 0] == -100, ids[:, 0], labels[:, 0]) if trainer_shifts_causal_counts() else -100
    ours.train().zero_grad()
    ours(input_ids=ids, labels=labels).loss.backward()
    expected = {name: torch.zeros_like(param) if param.grad is None else -param.grad.clone()  # BART: no encoder
                for name, param in ours.named_parameters()}
    ours.zero_grad()
    before = {name: param.detach().clone() for name, param in ours.named_parameters()}
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=3, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    examples = [{"input_ids": row, "labels": target} for row, target in zip(ids, labels)]
    Trainer(model=ours, args=arguments, train_dataset=examples).train()
    largest = max(step.norm() for step in expected.values())
    for name, param in ours.named_parameters():
        scale = max(expected[name].norm(), 1e-3 * largest)
        assert (param.detach() - before[name] - expected[name]).norm() <= 1e-4 * scale, f"{name}'s step differs"
