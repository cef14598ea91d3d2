"""Compiled training step with and without a 2-D padding mask (LLaMA/BLOOM-shaped, 8k, bf16): time, peak and
which attention kernels ran (profiler kernel names)."""
import sys, tempfile, time
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, BloomConfig, BloomForCausalLM
from remote_code import save_with_remote_code

SEQ = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
families = sys.argv[1].split(",") if len(sys.argv) > 1 else ["llama"]


def build(family):
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=SEQ,
                          tie_word_embeddings=False)
        stock, files, cls = LlamaForCausalLM(cfg), ["modeling_llama.py"], "modeling_llama.LlamaForCausalLM"
    else:
        cfg = BloomConfig(vocab_size=32000, hidden_size=2048, n_layer=8, n_head=16)
        stock, files, cls = BloomForCausalLM(cfg), ["modeling_bloom.py"], "modeling_bloom.BloomForCausalLM"
    folder = save_with_remote_code(stock, tempfile.mkdtemp(), files, {"AutoModelForCausalLM": cls})
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).cuda().train()


def kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    totals = {}
    for e in prof.key_averages():
        name = e.key.lower()
        kind = ("flex" if "flex" in name or "tem_fused" in name else "cudnn" if "cudnn" in name or "sdpa" in name
                else "flash" if "flash" in name or "fmha" in name else None)
        if kind:
            totals[kind] = totals.get(kind, 0.0) + e.device_time_total / 1000
    return {k: round(v, 2) for k, v in totals.items()}


for family in families:
    model = build(family)
    layer = sys.modules[type(model).__module__]
    reads = []
    original = layer._padding_layout
    layer._padding_layout = lambda mask: reads.append(1) or original(mask)
    ids = torch.randint(3, 32000, (1, SEQ), device="cuda")
    masks = {"none": None, "all-ones": torch.ones(1, SEQ, dtype=torch.long, device="cuda")}
    for compiled_flag in ((True,) if len(sys.argv) > 3 else (False, True)):
        for label, mask in masks.items():
            torch._dynamo.reset()
            run = torch.compile(model) if compiled_flag else model

            def step():
                out = run(ids, attention_mask=mask, labels=ids)
                out.loss.backward()
                model.zero_grad(set_to_none=True)
                return out.loss

            t0 = time.time()
            for _ in range(3):
                loss = step()
            torch.cuda.synchronize()
            warm = time.time() - t0
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(8):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); step(); b.record(); torch.cuda.synchronize(); times.append(a.elapsed_time(b))
            times.sort()
            before = len(reads)
            step(); torch.cuda.synchronize()
            per_step = len(reads) - before
            print(f"{family} compiled={compiled_flag} mask={label}: {times[len(times)//2]:.1f} ms, "
                  f"peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB, loss {loss.item():.5f}, warm {warm:.0f}s, "
                  f"host checks per step {per_step}, attention kernels ms {kernels(step)}", flush=True)
