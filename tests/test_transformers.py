"""flexcomp as a transformers attn_implementation: tiny random Llama, Mistral (sliding window) and Gemma 2 (softcap and
sliding window) against transformers' own sdpa / eager attention, with padding, a KV cache and generate()."""

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
fct = pytest.importorskip("flexcomp.integrations.transformers")  # importing it registers "flexcomp"

import flexcomp as fc

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}  # wide logits: greedy tokens are far from ties
PROMPT = 12
# name -> (config class, its extra settings, the transformers implementation to compare with)
MODELS = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "mistral": ("MistralConfig", {"sliding_window": 5}, "sdpa"),  # window < prompt: the window is exercised
    "gemma2": ("Gemma2Config", {"sliding_window": 4, "attn_logit_softcapping": 20.0, "final_logit_softcapping": None,
                                "head_dim": 16, "query_pre_attn_scalar": 24,
                                "layer_types": ["sliding_attention", "full_attention"]}, "eager"),  # sdpa: no softcap
}  # fmt: skip


def models(name, rng, attn_implementation="flexcomp"):
    """(a model on `attn_implementation`, the same weights on the reference implementation), fresh random weights."""
    config_class, extra, reference = MODELS[name]
    config = getattr(transformers, config_class)(**TINY, **extra)
    torch.manual_seed(int(torch.randint(2**31, (), generator=rng)))
    model = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(config), attn_implementation=attn_implementation
    )
    twin = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
    twin.load_state_dict(model.state_dict())
    return model.eval(), twin.eval()


def prompts(rng, batch=3, length=PROMPT):
    """Token ids and a left-padding mask: row i has i * 3 pad tokens (row 0 none)."""
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=rng)
    keep = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        keep[row, : 3 * row] = 0
    return ids, keep


def greedy(keep, new_tokens):
    """generate() settings for exactly `new_tokens` greedy tokens: a random model emits its EOS token now and then
    (and stops early, on every implementation alike), so EOS is held back until the last one."""
    tokens = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    return {"attention_mask": keep, **tokens, "do_sample": False, "pad_token_id": 0}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name, rng):
    model, twin = models(name, rng)
    ids, _ = prompts(rng, batch=2)
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch(name, rng):
    model, twin = models(name, rng)
    ids, keep = prompts(rng)
    kept = keep.bool()  # a padded query's own output is meaningless (sdpa and flexcomp differ there, by design)
    ours, theirs = logits(model, ids, attention_mask=keep), logits(twin, ids, attention_mask=keep)
    torch.testing.assert_close(ours[kept], theirs[kept], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_generate_is_token_identical(name, rng):
    """Greedy decoding through the KV cache: each step's queries sit at the end of the keys (offsets), padding and
    sliding windows still apply; 20 new tokens, as the reference implementation."""
    model, twin = models(name, rng)
    ids, keep = prompts(rng)
    settings = greedy(keep, 20)
    ours, theirs = model.generate(ids, **settings), twin.generate(ids, **settings)
    assert ours.shape == (3, PROMPT + 20)
    assert torch.equal(ours, theirs), f"first difference at {(ours != theirs).nonzero()[0].tolist()}"


# More families, checked once each (padded logits and 10 greedy tokens against eager): Qwen2's sliding layers,
# Gemma 3's local/global layers, Starcoder2's window, GPT-NeoX's partial rotary, Cohere's parallel blocks.
MORE_MODELS = {
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}, "eager"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "full_attention"]}, "eager"),
    "starcoder2": ("Starcoder2Config", {"sliding_window": 6}, "eager"),
    "gpt_neox": ("GPTNeoXConfig", {"rotary_pct": 0.25}, "eager"),
    "cohere": ("CohereConfig", {}, "eager"),
}  # fmt: skip


@pytest.mark.parametrize("name", MORE_MODELS)
def test_more_families(name, rng, monkeypatch):
    monkeypatch.setitem(MODELS, name, MORE_MODELS[name])
    if not hasattr(transformers, MODELS[name][0]):
        pytest.skip(f"this transformers has no {MODELS[name][0]}")
    model, twin = models(name, rng)
    ids, keep = prompts(rng)
    kept = keep.bool()
    torch.testing.assert_close(logits(model, ids, attention_mask=keep)[kept],
                               logits(twin, ids, attention_mask=keep)[kept], atol=1e-4, rtol=1e-4)  # fmt: skip
    settings = greedy(keep, 10)
    assert torch.equal(model.generate(ids, **settings), twin.generate(ids, **settings))


def test_padding_with_holes(rng):
    """Kept tokens that are not one run per row: the per-row table path."""
    model, twin = models("llama", rng)
    ids, keep = prompts(rng, batch=2)
    keep[1, 2:5] = 0  # row 1: kept, three holes, kept
    kept = keep.bool()
    ours, theirs = logits(model, ids, attention_mask=keep), logits(twin, ids, attention_mask=keep)
    torch.testing.assert_close(ours[kept], theirs[kept], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- your own mods in a pretrained architecture

WINDOW = 3
SLOPES = torch.tensor([-0.5, -0.25, -0.125, -0.0625])  # one per query head


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (q_idx - kv_idx)


def local(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < WINDOW)


def dense_bias(length):
    """alibi + local as the 4-D float mask sdpa adds to the scores: an independent reference."""
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None, :]
    bias = SLOPES[:, None, None] * (q - kv)
    return torch.where(local(0, 0, q, kv), bias, float("-inf"))[None]


def test_use_mods_matches_a_dense_mask(rng):
    model, twin = models("llama", rng)
    ids, _ = prompts(rng, batch=2)
    with fct.use_mods(score_mod=alibi, mask_mod=local):
        ours = logits(model, ids)
    theirs = logits(twin, ids, attention_mask=dense_bias(PROMPT).expand(2, -1, -1, -1))
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(logits(model, ids), logits(twin, ids), atol=2e-5, rtol=1e-5)  # outside: the model's


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # `cache=` in 5.x, not 4.x
def test_user_mods_see_positions_in_the_sequence_when_decoding(rng):
    """A decode step's kernel indices start at 0; the mods must see the token's position, as in a full forward."""
    model, _ = models("llama", rng)
    ids, _ = prompts(rng, batch=2)
    with torch.no_grad(), fct.use_mods(score_mod=alibi, mask_mod=local):
        full = model(ids).logits[:, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=prefix.past_key_values).logits[:, -1]
    torch.testing.assert_close(step, full, atol=2e-5, rtol=1e-5)


def test_register_a_name_with_mods(rng):
    name = fct.register("flexcomp_test_alibi", score_mod=alibi, mask_mod=local)
    model, twin = models("llama", rng, attn_implementation=name)
    ids, _ = prompts(rng, batch=2)
    theirs = logits(twin, ids, attention_mask=dense_bias(PROMPT).expand(2, -1, -1, -1))
    torch.testing.assert_close(logits(model, ids), theirs, atol=2e-5, rtol=1e-5)


def test_triton_backend(rng):
    """The generated kernel (Triton's interpreter on CPU) through the model: padding, GQA, decode offsets."""
    model, twin = models("mistral", rng)
    ids, keep = prompts(rng, batch=2, length=8)
    settings = greedy(keep, 2)
    with fct.use_mods(backend="triton"):
        ours = model.generate(ids, **settings)
    assert torch.equal(ours, twin.generate(ids, **settings))


# ---------------------------------------------------------------- what it refuses


def test_unknown_mask_function_is_refused():
    def image_tokens(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx >= 0

    with pytest.raises(fc.UnsupportedConstructError, match="image_tokens.*does not translate"):
        fct.translate(image_tokens)


def test_translates_every_masking_utils_pattern(rng):
    """Each of transformers' mask closures, translated, against the closure itself on every (b, q, kv)."""
    from transformers import masking_utils as mu

    ids = torch.randint(-1, 3, (2, 16), generator=rng)
    positions = torch.randint(0, 16, (2, 16), generator=rng)
    makers = [
        lambda: mu.causal_mask_function, lambda: mu.bidirectional_mask_function,
        lambda: mu.sliding_window_causal_mask_function(4), lambda: mu.sliding_window_bidirectional_mask_function(3),
        lambda: mu.chunked_causal_mask_function(4, ids[:, 0].abs()),
        lambda: mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
        lambda: mu.packed_sequence_mask_function(ids),
        lambda: mu.remap_positions_for_packed_sequence(mu.causal_mask_function, positions),
    ]  # fmt: skip
    closures = []
    for make in makers:
        with contextlib.suppress(AttributeError):  # this transformers has no such factory (4.x lacks some)
            closures.append(make())
    assert len(closures) >= 4
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(16), torch.arange(16), indexing="ij")
    for closure in closures:
        translated = fct.translate(closure)
        expected = closure(b, torch.zeros_like(b), q, kv)
        assert torch.equal(fc.create_mask(translated, 2, 1, 16, 16)[:, 0], expected.expand(2, 16, 16)), closure


def test_dropout_is_refused(rng):
    model, _ = models("llama", rng)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(fc.BackendError, match="dropout"):
        model(torch.randint(0, 128, (1, 4), generator=rng))
