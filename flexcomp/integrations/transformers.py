"""flexcomp as a Hugging Face transformers attention implementation.

    import flexcomp.integrations.transformers          # registers attn_implementation="flexcomp"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="flexcomp")

transformers describes a layer's mask in three parts: a Python closure over positions (causal, sliding window,
chunked, ...), a 2-D padding mask, and where the layer's queries and keys sit in the sequence (`q_offset`,
`kv_offset`: with a KV cache the queries are the last positions).  A custom attention implementation gets none of
that unless it registers a mask hook too; then it must honour all three, or `generate()` goes silently wrong.

`model_mask` is that hook.  It translates transformers' closure into flexcomp mods through a rule table (it never
compiles transformers' own functions), turns the padding mask into two numbers per row (or a per-row table when the
kept tokens are not one run), shifts the kernel's indices by offsets held in a captured tensor (so a decode step
reuses the same kernel), and builds the block mask once per forward and mask kind.  `attention` runs
`flexcomp.flex_attention` with the model's scaling, GQA and logit softcap (a score_mod).

Your own mods go into any architecture with `use_mods(score_mod=..., mask_mod=...)` (a context manager) or
`register(name, score_mod=..., mask_mod=...)` (a new attn_implementation).  They see positions in the sequence
(`q_idx`, `kv_idx` count from the first token, also in a decode step); a mask_mod replaces the model's causal or
sliding-window pattern (padding still applies), and a score_mod runs after the model's own (Gemma 2's softcap).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import transformers  # noqa: F401 (checked here, so a missing install is one clear error)
except ImportError:
    raise ImportError("flexcomp.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'flexcomp[hf]' (or pip install transformers)") from None

import flexcomp as fc
from flexcomp.errors import BackendError, UnsupportedConstructError
from flexcomp.mods import Mod, as_mod
from flexcomp.sparsity.host import remember

NAME = "flexcomp"


# ---------------------------------------------------------------- settings: backend, the user's mods


@dataclass(frozen=True)
class Settings:
    """How an attn_implementation name runs; None fields defer to the registered settings."""

    score_mod: Mod | None = None
    mask_mod: Mod | None = None
    backend: str | None = None
    kernel_options: dict | None = None

    def over(self, base: Settings) -> Settings:
        """These settings, with `base`'s where these are None."""
        mine, theirs = (tuple(getattr(s, f.name) for f in dataclasses.fields(s)) for s in (self, base))
        return Settings(*(m if m is not None else t for m, t in zip(mine, theirs)))


_ACTIVE = contextvars.ContextVar("flexcomp_transformers", default=Settings())  # noqa: B039 (frozen)


def _settings(score_mod: Any, mask_mod: Any, backend: str | None, kernel_options: dict | None) -> Settings:
    # compiled here, so a bad mod fails at the `with` or `register` line, not inside a model
    return Settings(as_mod(score_mod, "score"), as_mod(mask_mod, "mask"), backend, kernel_options)


@contextlib.contextmanager
def use_mods(
    score_mod: Any = None, mask_mod: Any = None, *, backend: str | None = None, kernel_options: dict | None = None
) -> Iterator[None]:
    """Inside the block, every model running a flexcomp attn_implementation uses these mods (and backend).

    The mods see positions in the sequence; `mask_mod` replaces the model's causal / sliding-window pattern (padding
    still applies) and `score_mod` runs on the score after the model's own score_mod (Gemma 2's softcap).
    """
    token = _ACTIVE.set(_settings(score_mod, mask_mod, backend, kernel_options).over(_ACTIVE.get()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def register(
    name: str = NAME,
    *,
    score_mod: Any = None,
    mask_mod: Any = None,
    backend: str = "auto",
    kernel_options: dict | None = None,
) -> str:
    """Register `name` as an attn_implementation running flexcomp with these mods; returns `name`.

    Importing this module registers "flexcomp" (no mods of yours, backend "auto").  Another name with your mods puts
    them into a pretrained architecture: `from_pretrained(path, attn_implementation=register("alibi", score_mod=..))`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    settings = _settings(score_mod, mask_mod, backend, kernel_options)
    AttentionInterface.register(name, functools.partial(attention, settings=settings))
    AttentionMaskInterface.register(name, functools.partial(model_mask, settings=settings))
    return name


# ---------------------------------------------------------------- transformers' mask closures -> flexcomp mods
# Leaves are plain functions of positions in the sequence (compiled once per function object by as_mod); the
# factories taking ints are cached, so a model's masks compile once.


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@functools.cache
def _sliding_window(window: int) -> Callable:
    def sliding_window(b, h, q_idx, kv_idx):  # the last `window` positions, the query's own included
        return kv_idx > q_idx - window

    return sliding_window


@functools.cache
def _symmetric_window(window: int) -> Callable:
    def symmetric_window(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= window

    return symmetric_window


def _chunked(chunk: int, left_padding: torch.Tensor) -> Callable:
    start = left_padding.to(torch.int32)

    def chunked(b, h, q_idx, kv_idx):
        return (kv_idx - start[b]) // chunk == (q_idx - start[b]) // chunk

    return chunked


@functools.cache
def _chunks(chunk: int) -> Callable:
    def chunks(b, h, q_idx, kv_idx):
        return kv_idx // chunk == q_idx // chunk

    return chunks


def _same_block(block_ids: torch.Tensor) -> Callable:
    ids = block_ids.to(torch.int32)

    def same_block(b, h, q_idx, kv_idx):
        return (ids[b, q_idx] == ids[b, kv_idx]) & (ids[b, q_idx] >= 0)

    return same_block


def _same_sequence(sequence_ids: torch.Tensor) -> Callable:
    ids = sequence_ids.to(torch.int32)

    def same_sequence(b, h, q_idx, kv_idx):
        return ids[b, q_idx] == ids[b, kv_idx]

    return same_sequence


def _kept_positions(kept: torch.Tensor) -> Callable:
    def kept_positions(b, h, q_idx, kv_idx):
        return kept[b, kv_idx]

    return kept_positions


def _remapped(mask: Mod, position_ids: torch.Tensor) -> Mod:
    positions = position_ids.to(torch.int32)

    def remapped(b, h, q_idx, kv_idx):  # packed sequences: each token's position inside its own sequence
        return mask(b, h, positions[b, q_idx], positions[b, kv_idx])

    return fc.mask_mod(remapped)


# transformers.masking_utils factory, arguments making an instance (None: the function itself) -> its flexcomp mask
# from the closure's captured values.  A factory this transformers lacks is skipped.
_IDS = torch.zeros(1, 1)
_RULES = (
    ("causal_mask_function", None, lambda v: _causal),  # kv <= q
    ("bidirectional_mask_function", None, lambda v: fc.noop_mask),  # everywhere
    ("sliding_window_overlay", (1,), lambda v: _sliding_window(v["sliding_window"])),  # kv > q - w
    ("sliding_window_bidirectional_overlay", (1,), lambda v: _symmetric_window(v["sliding_window"])),  # |q - kv| <= w
    ("chunked_overlay", (1, _IDS), lambda v: _chunked(v["chunk_size"], v["left_padding"])),  # same chunk
    ("_legacy_chunked_overlay", (1,), lambda v: _chunks(v["chunk_size"])),  # same chunk, no padding (4.x)
    ("blockwise_overlay", (_IDS,), lambda v: _same_block(v["block_sequence_ids"])),  # same non-text block
    ("packed_sequence_mask_function", (_IDS,), lambda v: _same_sequence(v["packed_sequence_mask"])),  # same sequence
    ("padding_mask_function", (_IDS,), lambda v: _kept_positions(v["padding_mask"])),  # padding[b, kv]
    ("and_masks", (_causal,), lambda v: fc.and_masks(*map(translate, v["mask_functions"]))),  # all of
    ("or_masks", (_causal,), lambda v: fc.or_masks(*map(translate, v["mask_functions"]))),  # any of
    ("remap_positions_for_packed_sequence", (_causal, _IDS),
     lambda v: _remapped(translate(v["mask_function"]), v["position_ids"])),  # mask at positions in each sequence
)  # fmt: skip


@functools.cache
def _rules() -> dict[Any, Callable[[dict[str, Any]], Any]]:
    """The rule table by code object, which every closure a factory returns shares."""
    from transformers import masking_utils

    rules = {}
    for name, args, rule in _RULES:
        factory = getattr(masking_utils, name, None)
        if factory is not None:
            rules[(factory if args is None else factory(*args)).__code__] = rule
    return rules


def translate(mask_function: Callable) -> Mod:
    """A transformers mask function (built from masking_utils' pieces) as a flexcomp mask_mod, same positions."""
    rule = _rules().get(getattr(mask_function, "__code__", None))
    if rule is None:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise UnsupportedConstructError(
            f"transformers built this layer's mask from {name!r}, which flexcomp does not translate",
            hint="flexcomp translates transformers.masking_utils' own mask functions (causal, sliding window, "
            "chunked, blockwise, packed, and_masks/or_masks of those); put yours in with "
            "flexcomp.integrations.transformers.use_mods(mask_mod=...), or use attn_implementation='sdpa'",
        )
    return as_mod(rule(inspect.getclosurevars(mask_function).nonlocals), "mask")


# ---------------------------------------------------------------- padding, offsets


def padding_mod(attention_mask: torch.Tensor | None, kv_end: int) -> Callable | None:
    """transformers' 2-D padding mask (1 = keep) as a mask on kv positions 0..kv_end-1; None when all are kept.

    Positions past the mask's end are padding (as transformers pads it).  Rows whose kept tokens form one run (left
    or right padding, and every generate() step after them) become a start and an end per row, a fixed shape that
    decode steps share; other rows a per-row table padded to a power of two (few shapes, so few kernels).
    """
    if attention_mask is None:
        return None
    kept = attention_mask.to(torch.bool)
    length = kept.shape[-1]
    positions = torch.arange(length, device=kept.device)
    count = kept.sum(-1)
    start = torch.where(kept, positions, length).amin(-1)
    end = torch.where(kept, positions + 1, 0).amax(-1)
    all_kept = kept[:, :kv_end].all() if length >= kv_end else torch.zeros((), dtype=torch.bool, device=kept.device)
    one_run = ((end - start == count) | (count == 0)).all()
    # one device read (one sync) for both decisions and the runs' host copy, which the block mask's analysis reads
    host = torch.cat([torch.stack([all_kept, one_run]).to(torch.int32), start.to(torch.int32), end.to(torch.int32)])
    host = host.cpu()
    if host[0]:
        return None
    if host[1]:
        runs = host[2:].view(2, -1)
        return _kept_run(*(remember(t.to(torch.int32), h) for t, h in zip((start, end), runs)))
    width = 1 << max(kv_end - 1, length - 1, 1).bit_length()
    return _kept_positions(torch.nn.functional.pad(kept, (0, width - length)))


def _kept_run(start: torch.Tensor, end: torch.Tensor) -> Callable:
    def kept_run(b, h, q_idx, kv_idx):
        return (kv_idx >= start[b]) & (kv_idx < end[b])

    return kept_run


def _offsets(q_offset: int, kv_offset: int, device: Any) -> torch.Tensor:
    """[q_offset, kv_offset] as an int32 tensor: captured, not baked in, so each decode step reuses the kernel.
    Made on the host (one copy to the device) and remembered there, so the block mask's analysis reads no device."""
    host = torch.tensor([q_offset, kv_offset], dtype=torch.int32)
    return remember(host.to(device), host)


def at_positions(mask: Any, offsets: torch.Tensor) -> Mod:
    """`mask` (over positions in the sequence) as seen from the kernel, whose indices start at 0."""

    def at_positions(b, h, q_idx, kv_idx):
        return mask(b, h, q_idx + offsets[0], kv_idx + offsets[1])

    return fc.mask_mod(at_positions)


def _lowered(pattern: Mod, padding: Callable | None, offsets: torch.Tensor) -> Mod:
    return at_positions(pattern if padding is None else fc.and_masks(pattern, padding), offsets)


# (pattern's key, padding's code, tensors' dtypes, shapes and devices) -> (a lowered Mod, {its buffer: which tensor})
_LOWERED: dict[tuple, tuple[Mod, dict[str, int]]] = {}
LOWERED_KEPT = 64


def _kernel_mask(pattern: Mod, padding: Callable | None, offsets: torch.Tensor) -> Mod:
    """`at_positions(pattern & padding, offsets)`, lowered once per pattern, kind of padding and tensor shapes: a
    later forward's Mod is the first one's (same IR, so same kernels) reading this forward's tensors.  Lowering the
    mask costs more than the block mask's analysis; the tensors are new at every forward, the mask is not.  A
    pattern capturing tensors of its own (chunked, packed) is lowered anew."""
    ours = [offsets, *_captured_tensors(padding)]
    if pattern.buffers:
        return _lowered(pattern, padding, offsets)
    key = (pattern.key, getattr(padding, "__code__", None), tuple((t.dtype, t.shape, t.device) for t in ours))
    hit = _LOWERED.get(key)
    if hit is None:
        mod = _lowered(pattern, padding, offsets)
        sources = {name: _position(read(), ours) for name, read in mod.resolvers.items()}
        if None in sources.values():
            return mod
        _LOWERED[key] = mod, sources
        if len(_LOWERED) > LOWERED_KEPT:
            del _LOWERED[next(iter(_LOWERED))]
        return mod
    first, sources = hit
    fresh = dataclasses.replace(
        first,
        fn=_positions_fn(pattern, padding, offsets),
        resolvers={name: functools.partial(_same, ours[i]) for name, i in sources.items()},
        relower=functools.partial(_lowered, pattern, padding, offsets),
        variants={},
        latest=None,
    )
    fresh.__dict__["key"] = first.key  # its IR and buffer specs are the first one's
    return fresh


def _captured_tensors(fn: Callable | None) -> list[torch.Tensor]:
    cells = getattr(fn, "__closure__", None) or ()
    return [c.cell_contents for c in cells if isinstance(c.cell_contents, torch.Tensor)]


def _position(value: Any, tensors: list[torch.Tensor]) -> int | None:
    return next((i for i, t in enumerate(tensors) if t is value), None)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _positions_fn(pattern: Mod, padding: Callable | None, offsets: torch.Tensor) -> Callable:
    """The Python function of `_lowered`'s Mod (what calling the Mod runs, not compiled): pattern & padding, shifted."""

    def at_positions(b, h, q_idx, kv_idx):
        q, kv = q_idx + offsets[0], kv_idx + offsets[1]
        kept = pattern(b, h, q, kv)
        return kept if padding is None else kept & padding(b, h, q, kv)

    return at_positions


# ---------------------------------------------------------------- score mods


@functools.cache
def _softcap_fn(cap: float) -> Callable:
    def softcap(score):  # Gemma 2's attention logit softcapping
        return cap * torch.tanh(score / cap)

    return softcap


def _unchanged(score):
    return score


@functools.cache
def _softcap_mod(cap: float) -> Mod:
    model = _softcap_fn(cap)

    def softcapped(score, b, h, q_idx, kv_idx):
        return model(score)

    return fc.score_mod(softcapped)


def _score_mod(softcap: float | None, user: Mod | None, offsets: torch.Tensor) -> Mod | None:
    """The model's softcap (if any), then the user's score_mod (if any) at positions in the sequence."""
    if user is None:
        return None if softcap is None else _softcap_mod(float(softcap))
    model = _unchanged if softcap is None else _softcap_fn(float(softcap))

    def model_then_user(score, b, h, q_idx, kv_idx):
        return user(model(score), b, h, q_idx + offsets[0], kv_idx + offsets[1])

    return fc.score_mod(model_then_user)


# ---------------------------------------------------------------- the hook and the attention function


@dataclass(eq=False)
class ModelMask:
    """What `model_mask` hands the attention layers of one mask kind for one forward."""

    block_mask: Any  # flexcomp BlockMask over the kernel's indices
    offsets: torch.Tensor  # int32 [q_offset, kv_offset]: where the kernel's index 0 sits in the sequence
    settings: Settings
    _score_mods: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.block_mask.shape

    def score_mod(self, softcap: float | None) -> Mod | None:
        """The layer's score_mod (built once per softcap value, shared by the layers of this forward)."""
        if softcap not in self._score_mods:
            self._score_mods[softcap] = _score_mod(softcap, self.settings.score_mod, self.offsets)
        return self._score_mods[softcap]


def model_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    device: Any = "cpu",
    *,
    cache_position: torch.Tensor | None = None,
    settings: Settings = Settings(),
    **unused: Any,
) -> ModelMask:
    """transformers' mask hook (AttentionMaskInterface): the block mask of one mask kind, once per forward.

    transformers 4.x passes the queries' positions (`cache_position`, consecutive) for their length and offset.
    """
    if cache_position is not None:
        q_length, q_offset, device = cache_position.shape[0], cache_position[0], cache_position.device
    settings = _ACTIVE.get().over(settings)
    pattern = settings.mask_mod or (translate(mask_function) if mask_function else as_mod(_causal, "mask"))
    q_offset, kv_offset = _as_ints(q_offset, kv_offset)
    padding = padding_mod(attention_mask, kv_length + kv_offset)
    offsets = _offsets(q_offset, kv_offset, device)
    mask = _kernel_mask(pattern, padding, offsets)
    block_mask = fc.create_block_mask(mask, batch_size, None, q_length, kv_length, device=device)
    return ModelMask(block_mask, offsets, settings)


def _as_ints(q_offset: Any, kv_offset: Any) -> tuple[int, int]:
    """The offsets as ints: a StaticCache's (and 4.x's cache_position) are device tensors, read together (one sync)."""
    if isinstance(q_offset, torch.Tensor) or isinstance(kv_offset, torch.Tensor):
        device = (q_offset if isinstance(q_offset, torch.Tensor) else kv_offset).device
        pair = [torch.as_tensor(o).reshape(()).to(device=device, dtype=torch.int64) for o in (q_offset, kv_offset)]
        q_offset, kv_offset = torch.stack(pair).tolist()
    return int(q_offset), int(kv_offset)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    *,
    settings: Settings = Settings(),
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function (AttentionInterface): [B, H, L, D] in, [B, L, H, D] out, no weights."""
    if dropout:
        raise BackendError(
            f"flexcomp has no attention dropout ({dropout=})",
            hint="call model.eval(), or set the config's attention_dropout to 0",
        )
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise BackendError(
                f"this model passes {name!r} to attention, which the flexcomp integration does not apply",
                hint="use attn_implementation='sdpa' or 'eager' for this model",
            )
    settings = _ACTIVE.get().over(settings)
    if not isinstance(attention_mask, ModelMask):
        attention_mask = _mask_without_hook(module, query, key, attention_mask, settings)
    out = fc.flex_attention(
        query,
        key,
        value,
        score_mod=attention_mask.score_mod(softcap),
        block_mask=attention_mask.block_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
        kernel_options=settings.kernel_options,
        backend=settings.backend or "auto",
    )
    return out.transpose(1, 2).contiguous(), None


def _mask_without_hook(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: Any, settings: Settings
) -> ModelMask:
    """No mask from the hook (a module called on its own): causal when the module is, queries at the end."""
    if attention_mask is not None:
        raise BackendError(
            f"flexcomp got a prepared {type(attention_mask).__name__} attention mask, which it cannot translate",
            hint="pass the 2-D padding mask (1 = keep) and let the model build "
            "its masks, or put your mask in with use_mods(mask_mod=...)",
        )
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    q_length, kv_length = query.shape[2], key.shape[2]
    pattern = causal_mask_function if getattr(module, "is_causal", True) else bidirectional_mask_function
    return model_mask(
        query.shape[0], q_length, kv_length, kv_length - q_length, 0, pattern, None, query.device, settings=settings
    )


register()
