"""Qwen-7B (first generation): the KV cache, its per-sample NTK alphas through the cache's operations, and
generation (greedy, beam search, sampling), against ``ReferenceQwen`` (``test_qwen.py``), loaded as users load
the model: saved next to our files and read back with trust_remote_code.
"""

from __future__ import annotations

import pytest
import torch

from tests.remote_code import assert_close_rel, left_padded_mask
from qwen_reference import ReferenceQwen, reference_beam_search
from test_qwen import CPU_BACKENDS, assert_close_where_kept, load, random_ids, saved  # noqa: F401 - saved: a fixture


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kv_cache_decoding_matches_reference(saved, backend):
    """Prefill past seq_length with per-sample alphas, a 3-token chunk, then single tokens: logits per step."""
    folder, config, state = saved
    model = load(folder, attn_backend=backend)
    reference = ReferenceQwen(config, state)
    ids = random_ids(2, 14)
    mask = left_padded_mask([14, 9], 14)  # alphas 3 and 1
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    expected, past, alphas = reference.forward(ids, mask)
    assert alphas == [3, 1]
    assert_close_where_kept(out.logits, expected, mask, 1e-5, "prefill")
    cache = out.past_key_values
    for chunk in (3, 1, 1, 1):
        new = random_ids(2, chunk)
        mask = torch.cat((mask, torch.ones(2, chunk, dtype=mask.dtype)), dim=1)
        with torch.no_grad():
            out = model(new, attention_mask=mask, past_key_values=cache, use_cache=True)
        expected, past, _ = reference.forward(new, mask, past, alphas)
        assert_close_rel(out.logits, expected.float(), 1e-5, f"decode logits at length {mask.shape[1]} ({backend})")
        cache = out.past_key_values
    assert cache.get_seq_length() == mask.shape[1]


def test_short_prefill_keeps_alpha_one_while_decoding_past_seq_length(saved):
    """NTK is decided at prefill (9 tokens: alpha 1) and kept; logn switches on once the keys pass seq_length."""
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    ids = random_ids(1, 9)
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = reference.greedy(ids, torch.ones_like(ids), steps=8)
    assert torch.equal(generated, expected)


def prefix_cache(config, length: int, alike: bool, seed: int) -> tuple:
    """Random keys and values of ``length`` positions for 2 rows (the same in both where ``alike``, as PEFT's
    prefix tuning hands in), for the reference (``[batch, seq, heads, dim]``, float64) and as our ``DynamicCache``."""
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    shape = (1 if alike else 2, length, config.num_attention_heads, config.kv_channels)
    prefix = [
        tuple(torch.randn(shape, generator=generator, dtype=torch.float64).expand(2, -1, -1, -1) for _ in range(2))
        for _ in range(config.num_hidden_layers)
    ]
    cache = DynamicCache()
    for layer, (key, value) in enumerate(prefix):
        cache.update(key.transpose(1, 2).float().contiguous(), value.transpose(1, 2).float().contiguous(), layer)
    return prefix, cache


def prefill_on_a_prefix(model, reference, prefix, cache, ids, kept: list) -> tuple:
    """Our first forward on a prefix cache, checked against the reference; the reference's cache, mask, alphas."""
    new_mask = left_padded_mask(kept, ids.shape[1])
    prefix_length = prefix[0][0].shape[1]
    mask = torch.cat((torch.ones(2, prefix_length, dtype=new_mask.dtype), new_mask), dim=1)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits
    alphas = reference.alphas_at_prefill(mask, mask.shape[1], 2, training=False)
    assert alphas[0] > 1 and alphas[1] == 1
    expected, past, _ = reference.forward(ids, mask, prefix, alphas)
    assert_close_where_kept(logits, expected, new_mask, 1e-5, "logits after a prefix cache")
    return past, mask, alphas


@pytest.mark.parametrize("prefix_length, alike", [(4, False), (10, True)])
@pytest.mark.parametrize("rows", [None, [1, 0], [1]])
def test_a_cache_filled_elsewhere_gets_each_rows_alpha_as_a_prefill_does(saved, prefix_length, alike, rows):
    """A cache the model did not fill (PEFT's prefix tuning hands one in, its mask covering the prefix): each row's
    alpha from its tokens, the cache's counted, as at a prefill, and the alphas follow the rows after a swap or a
    subset, a prefix alike in every row too. One alpha from the padded length (3 for both rows) put a short row
    1e-2 off; after the first forward on such a cache, the alphas stayed in place through a swap (7e-2 off) and
    a subset raised."""
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    prefix, cache = prefix_cache(config, prefix_length, alike, seed=31)
    ids, step = random_ids(2, 10), random_ids(2, 1)
    past, mask, alphas = prefill_on_a_prefix(model, reference, prefix, cache, ids, [10, 12 - prefix_length])
    mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
    if rows is not None:
        cache.batch_select_indices(torch.tensor(rows))
        past = [(key[rows], value[rows]) for key, value in past]
        step, mask, alphas = step[rows], mask[rows], [alphas[row] for row in rows]
    with torch.no_grad():
        logits = model(step, attention_mask=mask, past_key_values=cache).logits
    expected, _, _ = reference.forward(step, mask, past, alphas)
    assert_close_rel(logits, expected.float(), 1e-5, f"decoding step after rows {rows}")


@pytest.mark.parametrize("alike", [False, True])
def test_a_cache_filled_elsewhere_cropped_into_its_prefix_tells_its_rows_apart_or_refuses(saved, alike):
    """Swapped, then cropped to 3 of its 4 handed-in positions: rows whose handed-in keys differ keep their alphas;
    rows whose handed-in keys are alike cannot be told apart, and their alphas differ: a clear error (the rows were
    taken in their first order: 9e-3 off)."""
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    prefix, cache = prefix_cache(config, 4, alike, seed=37)
    past, mask, alphas = prefill_on_a_prefix(model, reference, prefix, cache, random_ids(2, 10), [10, 8])
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.crop(3 - cache.get_seq_length())
    step = random_ids(2, 1)
    mask = torch.cat((mask[[1, 0], :3], torch.ones(2, 1, dtype=mask.dtype)), dim=1)
    with torch.no_grad():
        if alike:
            with pytest.raises(RuntimeError, match="no longer tell which prompt row"):
                model(step, attention_mask=mask, past_key_values=cache)
            return
        logits = model(step, attention_mask=mask, past_key_values=cache).logits
    past = [(key[[1, 0], :3], value[[1, 0], :3]) for key, value in prefix]
    expected, _, _ = reference.forward(step, mask, past, alphas[::-1])
    assert_close_rel(logits, expected.float(), 1e-5, "decoding step after a swap and a crop into the prefix")


def test_a_cache_filled_in_training_mode_keeps_alpha_one_in_eval_mode(saved):
    """Training mode rotates by alpha 1 (no dynamic NTK); a cache filled there and continued in eval mode past
    ``seq_length`` keeps alpha 1 for its new keys, as its cached keys have (as the original, whose alphas carry
    over from its previous call); it took 3 from the total length (3e-2 off)."""
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    ids, more = random_ids(1, 10), random_ids(1, 5)
    model.train()
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    model.eval()
    with torch.no_grad():
        logits = model(more, past_key_values=cache).logits
    _, past, alphas = reference.forward(ids, torch.ones_like(ids))
    assert alphas == [1]
    expected, _, _ = reference.forward(more, torch.ones(1, 15, dtype=torch.long), past, alphas)
    assert_close_rel(logits, expected.float(), 1e-5, "eval step after a training-mode prefill")


@pytest.mark.parametrize("offset", [0, 5])
def test_position_ids_without_a_restart_change_nothing_as_the_original_ignores_them(saved, offset):
    """``position_ids`` of one document per row (from 0, or offset) at a 12-token prefill: positions still count
    from 0, and the NTK alpha chosen there (1: within seq_length) is kept for the decoding step to 13 tokens,
    which would pick 3 by its own length."""
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    ids = random_ids(1, 13)
    with torch.no_grad():
        out = model(ids[:, :12], position_ids=torch.arange(offset, offset + 12)[None], use_cache=True)
        step = model(ids[:, 12:], past_key_values=out.past_key_values).logits
    expected, past, alphas = reference.forward(ids[:, :12], torch.ones(1, 12, dtype=torch.long))
    assert set(alphas) == {1}
    assert_close_rel(out.logits, expected.float(), 1e-5, "prefill")
    expected, _, _ = reference.forward(ids[:, 12:], torch.ones(1, 13, dtype=torch.long), past, alphas)
    assert_close_rel(step, expected.float(), 1e-5, "decoding step")


@pytest.mark.parametrize("operation", ["reorder_cache", "batch_select_indices", "subset", "batch_repeat_interleave"])
def test_the_caches_row_operations_move_the_per_sample_alphas_with_the_rows(saved, operation):
    """Beam search, contrastive search and code that selects rows call the cache's own methods: the alphas
    followed ``_reorder_cache`` only (a swap gave 4e-2 off, a subset raised)."""
    folder, _, _ = saved
    model = load(folder)
    ids = random_ids(2, 16)
    mask = left_padded_mask([16, 8], 16)  # alphas 3 and 1
    step = random_ids(2, 1)
    step_mask = torch.cat((mask, torch.ones(2, 1, dtype=mask.dtype)), dim=1)
    rows = {"subset": torch.tensor([1]), "batch_repeat_interleave": torch.tensor([0, 0, 1, 1])}.get(
        operation, torch.tensor([1, 0])
    )
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        straight = model(step, attention_mask=step_mask, past_key_values=cache).logits
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        if operation == "batch_repeat_interleave":
            cache.batch_repeat_interleave(2)
        else:
            getattr(cache, "batch_select_indices" if operation == "subset" else operation)(rows)
        moved = model(step[rows], attention_mask=step_mask[rows], past_key_values=cache).logits
    assert_close_rel(moved, straight[rows], 1e-6, f"decode after {operation}")


@pytest.mark.parametrize("edit", ["crop_and_feed_other_tokens", "swap_then_crop", "crop_then_subset", "crop_then_repeat"])
def test_rows_of_a_cache_cropped_into_the_prompt_keep_their_alphas(saved, edit):
    """``crop`` into the prompt takes away the key the rows were told apart by, and tokens fed after it put other
    keys there: each row still decodes with its prefill's alpha, as a fresh prefill of what the cache then holds
    (rows took each other's alphas: 2e-2 to 8e-2 off; a subset raised)."""
    folder, _, _ = saved
    model = load(folder)
    ids, new, step = random_ids(2, 16), random_ids(2, 4), random_ids(2, 1)
    mask = left_padded_mask([16, 8], 16)  # alphas 3 and 1
    rows = {"swap_then_crop": [1, 0], "crop_then_subset": [1], "crop_then_repeat": [0, 0, 1, 1]}.get(edit, [0, 1])
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        if edit == "crop_and_feed_other_tokens":
            cache.crop(-4)
            model(new, attention_mask=mask, past_key_values=cache)
            held = torch.cat((ids[:, :12], new), dim=1)
        else:
            if edit == "swap_then_crop":
                cache.batch_select_indices(torch.tensor(rows))
            cache.crop(-2)
            if edit == "crop_then_subset":
                cache.batch_select_indices(torch.tensor(rows))
            if edit == "crop_then_repeat":
                cache.batch_repeat_interleave(2)
            held = ids[:, :14]
        held, held_mask = held[rows], mask[rows, : held.shape[1]]
        step_mask = torch.cat((held_mask, torch.ones(len(rows), 1, dtype=mask.dtype)), dim=1)
        edited = model(step[rows], attention_mask=step_mask, past_key_values=cache).logits
        fresh = model(held, attention_mask=held_mask, use_cache=True).past_key_values
        expected = model(step[rows], attention_mask=step_mask, past_key_values=fresh).logits
    assert_close_rel(edited, expected, 1e-6, f"decode after {edit}")


def test_the_alphas_of_a_packed_prefill_follow_the_caches_rows(saved):
    """Packed documents (positions restarting, no mask): each row decodes its last document with that document's
    alpha, through a reorder too (the alphas stayed in place: 6% off)."""
    folder, _, _ = saved
    model = load(folder)
    ids, step = random_ids(2, 24), random_ids(2, 1)
    # row 0: documents of 4 and 20 tokens (last alpha 3); row 1: of 19 and 5 (last alpha 1)
    positions = torch.stack((torch.cat((torch.arange(4), torch.arange(20))), torch.cat((torch.arange(19), torch.arange(5)))))
    with torch.no_grad():
        swapped = model(ids[[1, 0]], position_ids=positions[[1, 0]], use_cache=True).past_key_values
        expected = model(step[[1, 0]], past_key_values=swapped).logits
        cache = model(ids, position_ids=positions, use_cache=True).past_key_values
        cache.reorder_cache(torch.tensor([1, 0]))
        reordered = model(step[[1, 0]], past_key_values=cache).logits
    assert_close_rel(reordered, expected, 1e-6, "decode after reordering a packed prefill's rows")


def test_a_cache_cropped_to_keys_that_prompts_share_refuses_to_guess_their_alphas(saved):
    """Cropped to one position where both rows hold the same padding key, the rows cannot be told apart, and
    their alphas differ: a clear error, not one row's alpha for both."""
    folder, _, _ = saved
    model = load(folder)
    ids = random_ids(2, 16)
    ids[1, 0] = ids[0, 0]
    mask = left_padded_mask([15, 8], 16)  # alphas 3 and 1, position 0 padding in both rows
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        cache.crop(-15)  # to one position
        with pytest.raises(RuntimeError, match="no longer tell which prompt row"):
            model(random_ids(2, 1), attention_mask=mask[:, :2], past_key_values=cache)


def test_set_attn_implementation_takes_effect(saved):
    """transformers reads from the source text whether a class can switch: Qwen's call was ignored."""
    folder, _, _ = saved
    model = load(folder)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


def test_continuous_batching_is_refused_before_it_starts(saved):
    """Its thread only logs a forward's error: every request came back empty (``test_stock_behaviour.py``)."""
    folder, _, _ = saved
    with pytest.raises(NotImplementedError, match="continuous batching"):
        load(folder).generate_batch(inputs=random_ids(1, 5).tolist())


def test_greedy_generate_with_left_padding_matches_reference(saved):
    folder, config, state = saved
    model = load(folder)
    ids = random_ids(3, 15)
    mask = left_padded_mask([15, 10, 6], 15)  # past seq_length: per-sample alphas 3, 1, 1; logn while decoding
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    expected = ReferenceQwen(config, state).greedy(ids, mask, steps=7)
    assert torch.equal(generated, expected)


def test_beam_search_matches_reference_beam_search(saved):
    folder, config, state = saved
    model = load(folder)
    ids = random_ids(2, 14)
    mask = left_padded_mask([14, 10], 14)  # per-sample alphas 3 and 1
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    expected = reference_beam_search(ReferenceQwen(config, state), ids, mask, num_beams=3, steps=4)
    assert torch.equal(generated, expected)


def test_sampling_matches_reference_sampling_with_the_same_seed(saved):
    folder, config, state = saved
    model = load(folder)
    reference = ReferenceQwen(config, state)
    ids = random_ids(2, 13)
    mask = left_padded_mask([13, 8], 13)
    torch.manual_seed(7)
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            pad_token_id=0,
        )  # fmt: skip
    torch.manual_seed(7)
    logits, past, alphas = reference.forward(ids, mask)
    sequences = ids
    for _ in range(6):
        token = torch.multinomial(torch.softmax(logits[:, -1], dim=-1).float(), num_samples=1)
        sequences, mask = torch.cat((sequences, token), 1), torch.cat((mask, torch.ones_like(token)), 1)
        logits, past, _ = reference.forward(token, mask, past, alphas)
    assert torch.equal(generated, sequences)


@pytest.mark.parametrize("implementation", ["static", "sliding_window"])
def test_static_cache_implementations_are_refused_before_generate_builds_one(saved, implementation):
    """On transformers 4.57 and 5.0 generate() built the cache and kept it on the model before our forward refused
    it, so the next such call failed inside transformers with an AttributeError on the half-built cache."""
    folder, _, _ = saved
    model = load(folder)
    ids = random_ids(1, 6)
    for _ in range(2):
        with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' builds a static"):
            model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation=implementation)
    model.generation_config.cache_implementation = implementation
    with pytest.raises(ValueError, match=f"cache_implementation='{implementation}' builds a static"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    model.generation_config.cache_implementation = None
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 8)
