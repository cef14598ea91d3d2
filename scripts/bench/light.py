"""The light section: the Light Attention table (GPT-2 small, fp32, dropout 0.1, training mode)."""

from __future__ import annotations

import torch

from .core import Bench
from .models import Dims
from .train import run_train_family

LIGHT_FULL = dict(layers=12, hidden=768, heads=12, vocab=50257, batch=4, seq=1024, dropout=0.1)
LIGHT_TINY = dict(layers=2, hidden=64, heads=4, vocab=256, batch=2, seq=32, dropout=0.1)
_PLAIN = {"use_lightsoftmax": False, "use_dropmatmul": False}
# a light impl name -> (the impl it builds, the config switches it sets)
LIGHT_VARIANTS = {
    "stock:eager": ("stock:eager", {}),
    "stock:sdpa": ("stock:sdpa", {}),
    "ours:eager": ("ours:eager", _PLAIN),
    "ours:eager+lightsoftmax": ("ours:eager", {"use_lightsoftmax": True, "use_dropmatmul": False}),
    "ours:eager+dropmatmul": ("ours:eager", {"use_lightsoftmax": False, "use_dropmatmul": True}),
    "ours:eager+lightsoftmax+dropmatmul": ("ours:eager", {"use_lightsoftmax": True, "use_dropmatmul": True}),
    "ours:auto": ("ours:auto", _PLAIN),
    "ours:chunked": ("ours:chunked", _PLAIN),
}
LIGHT_CORE = ("stock:eager", "ours:eager", "ours:eager+lightsoftmax+dropmatmul", "ours:auto")


def run_light(bench: Bench) -> None:
    """The Light Attention table: GPT-2 small in fp32 with dropout 0.1 in training mode."""
    spec = LIGHT_TINY if bench.tiny else LIGHT_FULL
    dims = Dims(spec["layers"], spec["hidden"], spec["heads"], spec["vocab"])
    wanted = bench.args.impl or list(LIGHT_VARIANTS)
    if "core" in wanted:
        wanted = list(wanted) + list(LIGHT_CORE)
    impls = [name for name in LIGHT_VARIANTS if name in wanted]
    bench.rec.say(f"== light gpt2: {', '.join(impls)}")
    run_train_family(
        bench,
        "light",
        "gpt2",
        impls,
        [spec["seq"]],
        [spec["batch"]],
        dims,
        torch.float32,
        dropout=spec["dropout"],
        extra_config=LIGHT_VARIANTS,
        extra_record={"layers": spec["layers"], "hidden": spec["hidden"], "dropout": spec["dropout"]},
    )
    bench.rec.write_markdown()
