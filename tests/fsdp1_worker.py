"""Two gloo ranks on the CPU train one step of a LLaMA checkpoint under FSDP1 (``use_orig_params`` as given;
False is FSDP1's default): each decoder layer and the LM head wrapped as units, ranks holding different token
counts. Runs the stock class, then our class with ``sequence_tile_size`` and a small ``loss_chunk_size``, and
saves each one's SGD update (lr 1: the gradient) gathered from rank 0 for ``tests/test_train.py``.

    python tests/fsdp1_worker.py CHECKPOINT_FOLDER OUTPUT_FILE USE_ORIG_PARAMS(0|1)
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy
from transformers import AutoModelForCausalLM

TOKENS_PER_RANK = (12, 7)  # the loss runs in chunks of 5: a different number of chunks on each rank


def rank_batch(rank: int) -> dict:
    length = TOKENS_PER_RANK[rank]
    ids = torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(rank))
    return dict(input_ids=ids, labels=ids)


def sgd_update(model, batch: dict, use_orig_params: bool) -> dict:
    layer_class = type(model.model.layers[0])
    policy = functools.partial(
        lambda_auto_wrap_policy, lambda_fn=lambda module: isinstance(module, layer_class) or module is model.lm_head
    )
    sharded = FSDP(model.train(), auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    full = FullStateDictConfig(rank0_only=False)
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, full):
        before = {name: value.clone() for name, value in sharded.state_dict().items()}
    sharded(**batch).loss.backward()
    torch.optim.SGD(sharded.parameters(), lr=1.0).step()
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, full):
        after = sharded.state_dict()
    return {name: before[name] - after[name] for name in before if before[name].dtype.is_floating_point}


def run_rank(rank: int, folder: str, output: str, use_orig_params: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    stock = sgd_update(AutoModelForCausalLM.from_pretrained(folder), rank_batch(rank), use_orig_params)
    ours_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    ours_model.config.sequence_tile_size = 4
    ours_model.config.loss_chunk_size = 5
    ours = sgd_update(ours_model, rank_batch(rank), use_orig_params)
    if rank == 0:
        torch.save({"stock": stock, "ours": ours}, output)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    mp.spawn(run_rank, args=(sys.argv[1], sys.argv[2], sys.argv[3] == "1"), nprocs=2)
