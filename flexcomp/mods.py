"""Compiled mods: what `@score_mod` and `@mask_mod` turn a function into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import SourceLoc
from .ir import BufferSpec, Node, structural_key


@dataclass(eq=False)
class Mod:
    """A score_mod or mask_mod, parsed and lowered to IR.

    `ir` is the optimized IR and `raw_ir` the IR as parsed.  `buffers` describes
    the captured tensors (name, dtype, shape); `resolvers` fetch their current
    values, so a tensor updated in place (or a global rebound to a tensor of the
    same shape and dtype) is seen at every call.  `fn` is the user's function;
    calling the Mod calls it, so a Mod can also be passed to torch's own
    flex_attention.
    """

    kind: str  # "score" or "mask"
    name: str
    ir: Node
    raw_ir: Node
    buffers: tuple[BufferSpec, ...] = ()
    resolvers: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    fn: Callable | None = None
    loc: SourceLoc | None = None

    @property
    def key(self) -> str:
        """Kernel cache key: the IR and the buffers' dtypes and shapes, not their values."""
        return structural_key(self.kind, self.ir, self.buffers)

    def tensors(self) -> dict[str, Any]:
        """The captured tensors' current values, by buffer name."""
        return {spec.name: self.resolvers[spec.name]() for spec in self.buffers}

    def __call__(self, *args: Any) -> Any:
        if self.fn is not None:
            return self.fn(*args)
        from .reference import evaluate_mod

        return evaluate_mod(self, *args)

    def __repr__(self) -> str:
        return f"<flexcomp {self.kind}_mod {self.name} key={self.key}>"
