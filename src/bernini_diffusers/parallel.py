"""Many processes, one pipeline: Ulysses sequence parallelism, branch parallelism and data parallelism over cases.

This is the only module that imports the distributed engine: yunchang (xDiT's sequence-parallel attention) for the
Ulysses all-to-all, and xfuser's process-group setup where xfuser is installed (it needs a GPU); without xfuser the
groups are plain `torch.distributed` groups, with yunchang's `set_seq_parallel_pg` for the Ulysses groups. Both are
imported only when a degree above 1 asks for them.

Rank layout. The world is `data_degree x branch_degree x ulysses_degree` processes, Ulysses innermost over
consecutive ranks (so a Ulysses group shares one node's fast links), then branch, then data:

    rank = (data_rank * branch_degree + branch_rank) * ulysses_degree + ulysses_rank

With 8 GPUs, `ulysses_degree=4, branch_degree=2` gives one data group (ranks 0-7), the Ulysses groups {0-3} and
{4-7}, and the branch groups {0, 4}, {1, 5}, {2, 6}, {3, 7}. `ulysses_degree=2, branch_degree=2` gives two data
groups, {0-3} and {4-7}, each working on its own share of the cases. The first rank of each data group (Ulysses
rank 0 of branch group 0) writes that group's results.

- **Ulysses** (docs/design.md#parallel-layout): the packed token sequence (conditions, then target) is zero-padded
  to a multiple of the degree and split into contiguous slices. In each self-attention an all-to-all gathers the sequence and
  scatters the heads, the padding is dropped, attention runs over the whole sequence for the local heads, and an
  all-to-all scatters the sequence back. The text is not split. The output head runs on each slice and its
  projections are gathered. The heads must divide by the degree.
- **Branch**: the distinct forwards of a denoising step (2 to 4 guidance branches) are dealt round-robin to the
  branch groups, computed at the same time and exchanged with an all-gather, so every process combines all of them
  with the same guidance code as a single process.
- **Data**: `assign_cases(cases, data_rank, data_degree)` gives each data group `cases[data_rank::data_degree]`.
- **Weight sharding** (`shard_weights=True`): every transformer block of both experts, and their other parameters,
  and the text encoder's blocks and embeddings, are sharded with torch's FSDP2 (`fully_shard`) across the
  `ulysses_degree x branch_degree` ranks of a data group,
  all-gathered just before they run and freed after. Branch groups that run fewer forwards in a step than the others
  make up the difference with gather-only passes (`gather_pass`), so every rank issues the same all-gathers in the
  same order.

Every rank of a data group holds the same latents at every step: the initial noise is broadcast from the group's
first rank, and the guidance and scheduler steps run identically everywhere.
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate.hooks import remove_hook_from_module
from accelerate.utils import send_to_device
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from diffusers.utils import logging

from .constants import SHARDED_PROFILE_NAMES

logger = logging.get_logger(__name__)

T = TypeVar("T")

FLOAT8_DTYPES = {torch.float8_e4m3fn, torch.float8_e5m2}

_YUNCHANG_INSTALL = 'pip install yunchang (or pip install "bernini_diffusers[xdit]")'


# ------------------------------------------------------------------------------------------------ layout


def divisors(n: int) -> list[int]:
    """The positive divisors of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_degree(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}`={value!r} must be an integer >= 1.")
    return value


def check_ulysses_degree(num_heads: int, ulysses_degree: int, model_name: str = "the model") -> None:
    """Raise a ValueError naming the degrees that work unless `ulysses_degree` divides `num_heads`.

    Each process attends with `num_heads / ulysses_degree` heads after the all-to-all, so the split must be even:
    the 14B experts have 40 heads (1, 2, 4, 5, 8, 10, 20, 40), the 1.3B model 12 (1, 2, 3, 4, 6, 12).
    """
    _check_degree("ulysses_degree", ulysses_degree)
    if num_heads % ulysses_degree:
        raise ValueError(
            f"`ulysses_degree`={ulysses_degree} does not divide the {num_heads} attention heads of {model_name}; "
            f"use one of {', '.join(map(str, divisors(num_heads)))}."
        )


@dataclass(frozen=True)
class ParallelLayout:
    r"""
    Where each rank sits in a world of `data x branch x ulysses` processes (Ulysses innermost, then branch, then data).

    Args:
        world_size (`int`):
            The number of processes.
        ulysses_degree (`int`, defaults to 1):
            Processes that split one sequence (consecutive ranks).
        branch_degree (`int`, defaults to 1):
            Groups of `ulysses_degree` processes that compute different guidance branches of one step.
    """

    world_size: int
    ulysses_degree: int = 1
    branch_degree: int = 1

    def __post_init__(self):
        _check_degree("world_size", self.world_size)
        _check_degree("ulysses_degree", self.ulysses_degree)
        _check_degree("branch_degree", self.branch_degree)
        per_case = self.ulysses_degree * self.branch_degree
        if self.world_size % per_case:
            multiples = ", ".join(str(per_case * k) for k in range(1, 4))
            raise ValueError(
                f"{self.world_size} processes cannot form groups of ulysses_degree x branch_degree = "
                f"{self.ulysses_degree} x {self.branch_degree} = {per_case}; launch a multiple of {per_case} "
                f"processes ({multiples}, ...) or choose degrees whose product divides {self.world_size}."
            )

    @property
    def data_degree(self) -> int:
        """How many data groups (each working on its own cases) the world holds."""
        return self.world_size // (self.ulysses_degree * self.branch_degree)

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """`(data_rank, branch_rank, ulysses_rank)` of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"`rank`={rank!r} must be in [0, {self.world_size}).")
        ulysses_rank = rank % self.ulysses_degree
        branch_rank = rank // self.ulysses_degree % self.branch_degree
        return rank // (self.ulysses_degree * self.branch_degree), branch_rank, ulysses_rank

    def rank_of(self, data_rank: int, branch_rank: int, ulysses_rank: int) -> int:
        return (data_rank * self.branch_degree + branch_rank) * self.ulysses_degree + ulysses_rank

    def ulysses_groups(self) -> list[list[int]]:
        """The ranks that split one sequence: consecutive blocks of `ulysses_degree`."""
        return [
            [self.rank_of(d, b, u) for u in range(self.ulysses_degree)]
            for d in range(self.data_degree)
            for b in range(self.branch_degree)
        ]

    def branch_groups(self) -> list[list[int]]:
        """The ranks that exchange branch outputs: one per branch group, same data group and Ulysses rank."""
        return [
            [self.rank_of(d, b, u) for b in range(self.branch_degree)]
            for d in range(self.data_degree)
            for u in range(self.ulysses_degree)
        ]

    def data_groups(self) -> list[list[int]]:
        """The ranks that work on the same cases: consecutive blocks of `branch_degree x ulysses_degree`."""
        size = self.branch_degree * self.ulysses_degree
        return [list(range(d * size, (d + 1) * size)) for d in range(self.data_degree)]


def assign_cases(cases: Sequence[T], data_rank: int, data_degree: int) -> list[T]:
    """The cases of data group `data_rank` out of `data_degree`: `cases[data_rank::data_degree]`, order kept.

    Every case goes to exactly one group, and the assignment depends only on the list, so every rank of a group
    computes the same share without talking to the others.
    """
    _check_degree("data_degree", data_degree)
    if not isinstance(data_rank, int) or not 0 <= data_rank < data_degree:
        raise ValueError(f"`data_rank`={data_rank!r} must be an integer in [0, {data_degree}).")
    return list(cases)[data_rank::data_degree]


# ------------------------------------------------------------------------------------------------ Ulysses


class UlyssesSequence:
    r"""
    One Ulysses group's view of a packed sequence: the `sequence_parallel` seam of [`BerniniTransformer3DModel`]
    (`split` after patch-embedding, `gather` of the output head's per-token projections) and the all-to-all attention
    its self-attention processors call in between.

    Args:
        group (`torch.distributed.ProcessGroup`):
            The Ulysses group (yunchang's `PROCESS_GROUP.ULYSSES_PG`).
        degree (`int`):
            The group's size.
        rank (`int`):
            This process's rank in the group; it holds slice `rank` of the sequence.
    """

    def __init__(self, group, degree: int, rank: int):
        self.group = group
        self.degree = degree
        self.rank = rank
        # Tokens of the packed sequence of the forward under way, set by `split`; the processors read it to drop
        # the padding. Forwards run one after another in a process, so one value serves both experts.
        self.length: int | None = None

    def split(
        self, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous slice of the tokens `(B, S, C)` and of their RoPE `(1, S, 1, D)` each."""
        self.length = hidden_states.shape[1]
        return self._slice(hidden_states), (self._slice(rotary_emb[0]), self._slice(rotary_emb[1]))

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        # (N, S, ...) -> (N, ceil(S / U), ...); the last slices are completed with zeros
        chunk = -(-self.length // self.degree)
        start = min(self.rank * chunk, self.length)
        piece = tensor[:, start : start + chunk]
        if piece.shape[1] < chunk:
            piece = torch.cat([piece, piece.new_zeros(piece.shape[0], chunk - piece.shape[1], *piece.shape[2:])], 1)
        return piece.contiguous()

    def gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every rank's slice, concatenated and unpadded: `(B, S_local, C) -> (B, S, C)` on every rank."""
        pieces = [torch.empty_like(hidden_states) for _ in range(self.degree)]
        dist.all_gather(pieces, hidden_states.contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)[:, : self.length]

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Attention of the local slice over the whole sequence: `(B, S_local, H, D)` each -> `(B, S_local, H, D)`.

        `attend(q, k, v)` runs on `(B, S, H / U, D)` tensors that hold the whole unpadded sequence.
        """
        from yunchang.comm.all_to_all import SeqAllToAll4D

        batch, local = query.shape[:2]
        padded = local * self.degree
        # One all-to-all for q, k and v: (3B, S_pad / U, H, D) -> (3B, S_pad, H / U, D), scatter heads, gather tokens.
        qkv = SeqAllToAll4D.apply(self.group, torch.cat([query, key, value]), 2, 1)
        # The padding sits at the end of the gathered sequence; cut off, no query or key ever sees it.
        query, key, value = qkv[:, : self.length].split(batch)
        out = attend(query, key, value)  # (B, S, H / U, D)
        if padded > self.length:
            out = torch.cat([out, out.new_zeros(batch, padded - self.length, *out.shape[2:])], dim=1)
        # (B, S_pad, H / U, D) -> (B, S_pad / U, H, D): scatter tokens, gather heads
        return SeqAllToAll4D.apply(self.group, out.contiguous(), 1, 2)


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # diffusers' Wan rotation (interleaved pairs), the same operations so a slice is rotated bit for bit as the whole.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)  # (B, S, H, D) -> 2 x (B, S, H, D / 2)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class UlyssesAttnProcessor:
    r"""
    The self-attention (`attn1`) of a diffusers Wan block over a sequence split across a Ulysses group.

    Projections, the q/k RMS norms and RoPE work token by token, so they run on the local slice (RoPE with the
    slice's own frequencies, which equals rotating the whole sequence after the all-to-all). The attention itself
    goes through [`UlyssesSequence.attention`]: yunchang's all-to-all, the padding dropped, diffusers' dispatcher
    with the expert's attention backend (the kernel it uses without parallelism), and the all-to-all back.

    Args:
        sequence ([`UlyssesSequence`]):
            The group's shared view of the sequence.
        replaced (`object`, *optional*):
            The processor this one stands in for, put back by `disable_parallelism`.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, sequence: UlyssesSequence, replaced: Any = None):
        self.sequence = sequence
        self.replaced = replaced
        self._attention_backend = getattr(replaced, "_attention_backend", None)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError(
                "UlyssesAttnProcessor serves unmasked self-attention only (`attn1` of a Wan block); got "
                f"encoder_hidden_states={'set' if encoder_hidden_states is not None else None}, "
                f"attention_mask={'set' if attention_mask is not None else None}."
            )
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)  # RMS over the heads of one token: local
        # (B, S_local, H * D) -> (B, S_local, H, D)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        hidden_states = self.sequence.attention(query, key, value, self._attend)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # (B, S_local, H, D) -> (B, S_local, H * D)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend
        )


def _sequence_parallel_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules the model declares as mixing tokens across the sequence."""
    names = set(getattr(model, "_sequence_parallel_attention", ()))
    return [module for path, module in model.named_modules() if path.rsplit(".", 1)[-1] in names]


def parallelize_model(model: torch.nn.Module, sequence: UlyssesSequence) -> None:
    """Split `model`'s packed sequence over `sequence`'s group: set its seam and its self-attention processors."""
    if not hasattr(type(model), "sequence_parallel"):
        raise ValueError(f"{type(model).__name__} declares no sequence-parallel seam (`sequence_parallel`).")
    for module in _sequence_parallel_modules(model):
        if not isinstance(module.processor, UlyssesAttnProcessor):
            module.set_processor(UlyssesAttnProcessor(sequence, replaced=module.processor))
    model.sequence_parallel = sequence


def unparallelize_model(model: torch.nn.Module) -> None:
    """Undo `parallelize_model`: the original processors (with the backend chosen meanwhile) and no seam."""
    for module in _sequence_parallel_modules(model):
        processor = module.processor
        if isinstance(processor, UlyssesAttnProcessor):
            if hasattr(processor.replaced, "_attention_backend"):
                processor.replaced._attention_backend = processor._attention_backend
            module.set_processor(processor.replaced)
    if getattr(model, "sequence_parallel", None) is not None:
        model.sequence_parallel = None


# ------------------------------------------------------------------------------------------------ state


@dataclass
class ParallelState:
    r"""
    This process's place in a parallel run, and the collectives the pipeline and the command line use.

    Args:
        layout ([`ParallelLayout`]):
            The world's degrees.
        rank (`int`):
            The global rank.
        local_rank (`int`):
            The rank on this node (the CUDA device index).
        device (`torch.device`):
            The device this process should run on: `cuda:<local_rank>`, or the CPU.
        engine (`str`):
            Who built the groups: `"xfuser"`, `"torch"` (plain groups with yunchang's Ulysses groups), or `"none"` for
            a single process.
        ulysses_group, branch_group, data_group (`torch.distributed.ProcessGroup`, *optional*):
            This rank's groups; `None` where the group would hold this rank alone.
        shard_weights (`bool`, defaults to `False`):
            Whether the experts are sharded across the data group (see [`shard_model`]).
    """

    layout: ParallelLayout
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    engine: str = "none"
    ulysses_group: Any = None
    branch_group: Any = None
    data_group: Any = None
    shard_weights: bool = False

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def ulysses_degree(self) -> int:
        return self.layout.ulysses_degree

    @property
    def branch_degree(self) -> int:
        return self.layout.branch_degree

    @property
    def data_degree(self) -> int:
        return self.layout.data_degree

    @property
    def shard_degree(self) -> int:
        """How many ranks share each expert's weights: `ulysses_degree x branch_degree` when sharded, else 1."""
        return self.ulysses_degree * self.branch_degree if self.shard_weights else 1

    @property
    def data_rank(self) -> int:
        return self.layout.coordinates(self.rank)[0]

    @property
    def branch_rank(self) -> int:
        return self.layout.coordinates(self.rank)[1]

    @property
    def ulysses_rank(self) -> int:
        return self.layout.coordinates(self.rank)[2]

    @property
    def writer_rank(self) -> int:
        """The global rank of this data group's first process (Ulysses rank 0 of branch group 0): the one that writes
        the group's results and whose noise and objects `broadcast` hands to the others."""
        return self.layout.rank_of(self.data_rank, 0, 0)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes its data group's results (see `writer_rank`)."""
        return self.rank == self.writer_rank

    def assign_cases(self, cases: Sequence[T]) -> list[T]:
        """This data group's share of `cases`: `cases[data_rank::data_degree]`."""
        return assign_cases(cases, self.data_rank, self.data_degree)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """The data group's first rank's `tensor`, in place on every rank of the group (e.g. the initial noise)."""
        if self.data_group is not None:
            dist.broadcast(tensor, src=self.writer_rank, group=self.data_group)
        return tensor

    def broadcast_object(self, obj: T) -> T:
        """The data group's first rank's picklable `obj` on every rank of the group (e.g. a list of pending cases)."""
        if self.data_group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.writer_rank, group=self.data_group)
        return box[0]

    def run_branches(
        self,
        forwards: Sequence[Callable[[], torch.Tensor]],
        like: torch.Tensor,
        model: torch.nn.Module | None = None,
    ) -> list[torch.Tensor]:
        """Run one step's distinct forwards and return all their outputs, in order, on every rank.

        With `branch_degree` B > 1, branch group b runs forwards b, b + B, b + 2B, ... (round-robin; with fewer
        forwards than groups some groups idle), then an all-gather across the branch group hands every rank the
        others' outputs. `like` has the outputs' shape and dtype (what an idle group sends). With sharded weights,
        a group with fewer forwards than the busiest one runs a [`gather_pass`] of `model` (the expert the forwards
        use) for each missing one, so that the whole data group issues the same all-gathers.
        """
        if self.branch_group is None:
            return [forward() for forward in forwards]
        degree, mine = self.branch_degree, self.branch_rank
        slots = -(-len(forwards) // degree)
        outputs = [forwards[i]() for i in range(mine, len(forwards), degree)]
        if self.shard_weights and len(outputs) < slots:
            if model is None or not is_sharded(model):
                raise ValueError(
                    "`model` must be the sharded expert the forwards use, to keep the data group's all-gathers in step."
                )
            for _ in range(slots - len(outputs)):
                gather_pass(model)
        # Every group sends `slots` outputs so the all-gather has one shape; filler slots are never read.
        filler = outputs[0] if outputs else like
        outputs += [torch.zeros_like(filler)] * (slots - len(outputs))
        stacked = torch.stack(outputs)  # (slots, *output shape)
        gathered = [torch.empty_like(stacked) for _ in range(degree)]
        dist.all_gather(gathered, stacked, group=self.branch_group)
        return [gathered[i % degree][i // degree] for i in range(len(forwards))]


# ------------------------------------------------------------------------------------------------ weight sharding


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (`fully_shard`)."""
    return isinstance(model, FSDPModule)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a model FSDP2 shards one by one: an expert's `blocks`, a T5 encoder's `encoder.block`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        blocks = getattr(getattr(model, "encoder", None), "block", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` (or `encoder.block`) to shard.")
    return list(blocks)


def shard_model(
    model: torch.nn.Module, group, device_type: str = "cpu", param_dtype: torch.dtype | None = None
) -> None:
    r"""
    Shard `model`'s weights across `group` with torch's FSDP2: each transformer block is one unit (all-gathered in
    its pre-forward, freed after it runs) and the root holds the rest (patch and condition embedders, output head),
    also freed after each forward. Inference only: nothing keeps gradients or optimizer state.

    Args:
        model (`torch.nn.Module`):
            An expert with `blocks`, or a T5 encoder (`encoder.block`); its parameters may be on the meta device
            (then load them with `torch.distributed.checkpoint.state_dict.set_model_state_dict` afterwards).
        group (`torch.distributed.ProcessGroup`):
            The ranks that share the weights. They must run the same forwards in the same order (see
            [`gather_pass`]).
        device_type (`str`, defaults to `"cpu"`):
            The device type of the mesh: `"cuda"` or `"cpu"` (gloo).
        param_dtype (`torch.dtype`, *optional*):
            The dtype the shards are all-gathered and computed in, for weights stored in another one (fp8).
    """
    if is_sharded(model):
        raise ValueError(f"{type(model).__name__} is already sharded; load it again to shard it another way.")
    mesh = DeviceMesh.from_group(group, device_type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, cast_forward_inputs=False)
    kept: set[torch.nn.Parameter] = set()
    for unit in [*_blocks(model), model]:
        ignored = _minority_dtype_params(unit, kept)
        # An explicit reshard_after_forward=True frees the root's parameters after each forward too (FSDP2 keeps an
        # automatic root's gathered for a backward that inference never runs).
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=policy, ignored_params=ignored or None)
        kept |= ignored
    device = mesh.device_type if device_type != "cuda" else torch.device("cuda", torch.cuda.current_device())
    for param in kept:  # FSDP2 leaves its ignored parameters where they are
        if not param.is_meta:
            param.data = param.data.to(device)


def _minority_dtype_params(unit: torch.nn.Module, managed: set) -> set:
    """The parameters of `unit` (not already sharded or kept) whose dtype is not the most common one.

    FSDP2 all-gathers a unit's shards as one buffer of one dtype; the modules diffusers keeps in float32 under a
    bfloat16 load (`_keep_in_fp32_modules`: each block's modulation table and affine norm, the time embedder) would
    make a unit of two dtypes. They stay whole on every rank instead (about 0.4% of a 14B expert), and compute in
    float32 exactly as without sharding.
    """
    params = [p for p in unit.parameters() if p not in managed and not hasattr(p, "to_local")]
    if not params:
        return set()
    counts = Counter()
    for param in params:
        counts[param.dtype] += param.numel()
    common = counts.most_common(1)[0][0]
    return {param for param in params if param.dtype != common}


def gather_pass(model: torch.nn.Module) -> None:
    """Issue the all-gathers of one forward of the sharded `model`, in its order (root, then each block, each freed
    right away), without computing anything: what a branch group with one forward fewer than the others runs so
    that every rank of the sharding group takes part in the same collectives."""
    placement = getattr(model, PLACEMENT_ATTRIBUTE, None)
    if placement is not None:  # expert_offload: its shards come to the device first, as for a forward
        placement.place(model)
    model.unshard()
    for block in _blocks(model):
        block.unshard()
        block.reshard()
    model.reshard()


PLACEMENT_ATTRIBUTE = "_bernini_shard_placement"


def device_of(model: torch.nn.Module) -> torch.device | None:
    """Where `model`'s weights are: a sharded parameter's local tensor (the parameters kept whole may be elsewhere),
    else its first parameter; None without parameters."""
    first = None
    for param in model.parameters():
        if hasattr(param, "to_local"):
            return param.to_local().device
        if first is None:
            first = param.device
    return first


class ShardPlacement:
    r"""
    The `expert_offload` memory profile for a sharded expert: just before the expert runs (or runs a
    [`gather_pass`]), `offload_others(expert)` puts what else is on the device back on the CPU (the other expert,
    the text encoder), then the expert's shards, and the parameters it keeps whole, move to `device`.

    It is a forward pre-hook that runs before FSDP2's own, so the shards are on the device when they are
    all-gathered. accelerate's offload hook cannot do this: it wraps `forward` and so moves the expert after FSDP2
    has gathered it (and `module.to` reshards an FSDP2 module first, which would free the gathered weights). The
    move itself is FSDP2's: `module.to` re-registers the moved shards (`FSDPModule._apply`).

    Args:
        device (`torch.device`):
            Where the expert runs (the mesh's device).
        offload_others (`Callable[[torch.nn.Module], None]`):
            Puts everything but the given expert back on the CPU.
    """

    def __init__(self, device: torch.device, offload_others: Callable[[torch.nn.Module], None]) -> None:
        self.device = torch.device(device)
        self.offload_others = offload_others
        self.handle = None  # the forward pre-hook's handle, once registered

    def place(self, model: torch.nn.Module) -> None:
        """Put `model` on the device (and the rest on the CPU) unless it is there already."""
        here = device_of(model)
        if here is not None and here.type == self.device.type and (here.index or 0) == (self.device.index or 0):
            return
        self.offload_others(model)
        model.to(self.device)

    def __call__(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.place(model)
        # As accelerate's offload hook does: the inputs follow the weights (the text encoder's token ids are put
        # where its weights were, the CPU, before this hook brings them to the device).
        return send_to_device(args, self.device), send_to_device(kwargs, self.device)


def place_sharded_module(
    model: torch.nn.Module, device: torch.device, offload_others: Callable[[torch.nn.Module], None]
) -> ShardPlacement:
    """Give the sharded `model` (an expert or the text encoder) a [`ShardPlacement`], replacing an earlier one and
    any accelerate offload hook (whose move would come after FSDP2's all-gather); returns it."""
    if not is_sharded(model):
        raise ValueError(f"{type(model).__name__} is not sharded; its placement is diffusers' model offload.")
    remove_hook_from_module(model)
    old = getattr(model, PLACEMENT_ATTRIBUTE, None)
    if old is not None and old.handle is not None:
        old.handle.remove()
    placement = ShardPlacement(device, offload_others)
    placement.handle = model.register_forward_pre_hook(placement, prepend=True, with_kwargs=True)
    setattr(model, PLACEMENT_ATTRIBUTE, placement)
    return placement


def sharded_weight_bytes(
    expert_bytes: int, shard_degree: int = 1, *, kept_bytes: int = 0, gathered_bytes: int = 0
) -> int:
    """Peak bytes of one expert's weights on one rank, for a memory plan: the whole expert without sharding; with
    `shard_degree` N > 1, its sharded part / N (rounded up), plus `kept_bytes` held whole on every rank (float32-kept
    parameters of a bf16 load) and `gathered_bytes` gathered at once while it runs (the largest block plus the root:
    about 1.1 GiB for a 14B expert in bf16)."""
    _check_degree("shard_degree", shard_degree)
    if shard_degree == 1:
        return expert_bytes
    return -(-(expert_bytes - kept_bytes) // shard_degree) + kept_bytes + gathered_bytes


def local_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters held by this process: its shards when sharded, everything otherwise."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def _find_group(groups: list[list[int]], rank: int):
    """Create every group (all ranks must, in the same order) and return this rank's."""
    own = None
    for ranks in groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def _check_group(name: str, group, expected: list[int]) -> None:
    ranks = dist.get_process_group_ranks(group)
    if list(ranks) != expected:
        raise RuntimeError(f"the {name} group holds ranks {ranks}, expected {expected} (see the rank layout).")


def _launch_environment(ulysses_degree: int, branch_degree: int) -> tuple[int, int, int]:
    """`(world_size, rank, local_rank)`, initialising the default process group from torchrun's variables if needed."""
    per_case = ulysses_degree * branch_degree

    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        return dist.get_world_size(), rank, local_rank
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if per_case > 1:
            raise ValueError(
                f"ulysses_degree x branch_degree = {per_case} needs {per_case} processes, but this one runs alone; "
                f"launch it with `torchrun --nproc-per-node {per_case} ...`."
            )
        return 1, 0, int(os.environ.get("LOCAL_RANK", "0"))
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not; launch with torchrun.")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; parallel runs need it.")
    ParallelLayout(world_size, ulysses_degree, branch_degree)  # a bad world size fails before the rendezvous
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        # CUDA tensors go through NCCL, CPU ones (objects, CPU latents) through gloo, as upstream.
        dist.init_process_group("cuda:nccl,cpu:gloo")
    else:
        dist.init_process_group("gloo")
    return world_size, rank, local_rank


def _use_xfuser() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("xfuser") is None:
        return False
    try:
        import xfuser.core.distributed  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a broken install falls back to plain groups, said once
        logger.warning(f"xfuser is installed but does not import ({err}); using plain torch.distributed groups.")
        return False
    return True


def _xfuser_groups(layout: ParallelLayout, rank: int, local_rank: int) -> dict[str, Any]:
    from xfuser.core.distributed import (
        get_cfg_group,
        get_sp_group,
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from xfuser.core.distributed.parallel_state import destroy_model_parallel
    from yunchang.globals import PROCESS_GROUP

    init_distributed_environment(rank=rank, world_size=layout.world_size, local_rank=local_rank)
    if model_parallel_is_initialized():
        current = (get_sp_group().ulysses_world_size, get_cfg_group().world_size)
        if current != (layout.ulysses_degree, layout.branch_degree):
            destroy_model_parallel()
    if not model_parallel_is_initialized():
        # xfuser's order "tp-sp-pp-cfg-dp" puts sequence innermost, then cfg (our branches), then data: our layout.
        initialize_model_parallel(
            data_parallel_degree=layout.data_degree,
            classifier_free_guidance_degree=layout.branch_degree,
            sequence_parallel_degree=layout.ulysses_degree,
            ulysses_degree=layout.ulysses_degree,
            ring_degree=1,
        )
    data_rank, _, ulysses_rank = layout.coordinates(rank)
    groups = {"ulysses_group": None, "branch_group": None}
    if layout.ulysses_degree > 1:
        groups["ulysses_group"] = PROCESS_GROUP.ULYSSES_PG
        _check_group("Ulysses", groups["ulysses_group"], layout.ulysses_groups()[rank // layout.ulysses_degree])
    if layout.branch_degree > 1:
        groups["branch_group"] = get_cfg_group().device_group
        index = data_rank * layout.ulysses_degree + ulysses_rank
        _check_group("branch", groups["branch_group"], layout.branch_groups()[index])
    return groups


def _torch_groups(layout: ParallelLayout, rank: int) -> dict[str, Any]:
    groups = {"ulysses_group": None, "branch_group": None}
    if layout.ulysses_degree > 1:
        from yunchang import set_seq_parallel_pg
        from yunchang.globals import PROCESS_GROUP

        set_seq_parallel_pg(layout.ulysses_degree, 1, rank, layout.world_size)
        groups["ulysses_group"] = PROCESS_GROUP.ULYSSES_PG
        _check_group("Ulysses", groups["ulysses_group"], layout.ulysses_groups()[rank // layout.ulysses_degree])
    if layout.branch_degree > 1:
        groups["branch_group"] = _find_group(layout.branch_groups(), rank)
    return groups


def check_shard_weights(shard_weights: Any, ulysses_degree: int, branch_degree: int) -> None:
    """Raise a ValueError unless `shard_weights` is a bool that the degrees allow (a clip of more than one rank)."""
    if not isinstance(shard_weights, bool):
        raise ValueError(f"`shard_weights`={shard_weights!r} must be True or False.")
    if shard_weights and ulysses_degree * branch_degree == 1:
        raise ValueError(
            "`shard_weights`=True shards the experts across the ulysses_degree x branch_degree ranks that run one "
            "clip (the ranks that stay in step); with ulysses_degree=1 and branch_degree=1 every rank runs clips of "
            "its own. Set ulysses_degree and/or branch_degree above 1 (e.g. ulysses_degree=2 on 2 processes)."
        )


def init_parallel_state(ulysses_degree: int = 1, branch_degree: int = 1) -> ParallelState:
    """Join the torchrun world (initialising the process group if needed) and build this rank's groups."""
    _check_degree("ulysses_degree", ulysses_degree)
    _check_degree("branch_degree", branch_degree)
    if ulysses_degree > 1 and importlib.util.find_spec("yunchang") is None:
        raise ImportError(
            f"ulysses_degree={ulysses_degree} needs yunchang (xDiT's sequence-parallel attention): {_YUNCHANG_INSTALL}"
        )
    world_size, rank, local_rank = _launch_environment(ulysses_degree, branch_degree)
    layout = ParallelLayout(world_size, ulysses_degree, branch_degree)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world_size == 1:
        return ParallelState(layout, rank, local_rank, device, "none")
    # Without Ulysses or branch groups there is nothing for xfuser to set up.
    engine = "xfuser" if ulysses_degree * branch_degree > 1 and _use_xfuser() else "torch"
    groups = _xfuser_groups(layout, rank, local_rank) if engine == "xfuser" else _torch_groups(layout, rank)
    data_group = None
    if ulysses_degree * branch_degree > 1:
        data_group = _find_group(layout.data_groups(), rank)
    state = ParallelState(layout, rank, local_rank, device, engine, data_group=data_group, **groups)
    if rank == 0:
        logger.info(
            f"parallel: {world_size} processes = data {layout.data_degree} x branch {branch_degree} x "
            f"ulysses {ulysses_degree} ({engine} groups)"
        )
    return state


def enable_parallelism(
    pipe,
    ulysses_degree: int = 1,
    branch_degree: int = 1,
    shard_weights: bool = False,
    float8_compute_dtype: torch.dtype | None = None,
) -> ParallelState:
    """Check the degrees against the pipeline's experts, join the world, split the experts' sequences and, with
    `shard_weights`, shard their weights across each data group.

    Used by `BerniniPipeline.enable_parallelism`, which documents the arguments. Any parallelism enabled before is
    undone first, so a script can switch degrees; sharded experts stay sharded (FSDP2 cannot be undone in place), so
    a pipeline whose experts are sharded cannot be enabled again. `float8_compute_dtype` is the dtype experts whose
    weights are stored in float8 (`sharded_load.store_float8`) compute in: FSDP2 casts each unit's shards to it
    before the all-gather.
    """
    _check_degree("ulysses_degree", ulysses_degree)
    _check_degree("branch_degree", branch_degree)
    check_shard_weights(shard_weights, ulysses_degree, branch_degree)
    experts = {name: getattr(pipe, name, None) for name in ("transformer", "transformer_2")}
    experts = {name: model for name, model in experts.items() if model is not None}
    for name, model in experts.items():
        check_ulysses_degree(model.config.num_attention_heads, ulysses_degree, f"`{name}`")
    _check_not_sharded(experts)
    profile = (getattr(pipe, "_memory_profile", None) or ("resident",))[0]
    if shard_weights and profile not in ("resident", "expert_offload"):
        how = (
            "fp8 storage of sharded experts is chosen at load: `BerniniPipeline.from_pretrained_sharded(..., "
            f"memory_profile={profile!r})` or `--memory_profile {profile} --shard_weights` (its casting hooks would "
            "act on FSDP2's gathered weights)"
            if profile.startswith("fp8+") or profile == "fp8"
            else "its hooks move or read whole blocks and experts, FSDP2 places the shards"
        )
        raise ValueError(
            f"`shard_weights`=True cannot be combined with the memory profile {profile!r} applied to this pipeline: "
            f"{how}. Sharded experts take {', '.join(SHARDED_PROFILE_NAMES)}; load the pipeline again."
        )
    if shard_weights and profile == "resident" and getattr(pipe, "_all_hooks", None):
        raise ValueError(
            "`shard_weights`=True: this pipeline has diffusers' model offload applied by hand; use "
            "`enable_memory_profile('expert_offload')` (before or after sharding) instead."
        )
    disable_parallelism(pipe)
    state = init_parallel_state(ulysses_degree, branch_degree)
    if state.ulysses_group is not None:
        sequence = UlyssesSequence(state.ulysses_group, ulysses_degree, state.ulysses_rank)
        for model in experts.values():
            parallelize_model(model, sequence)
    if shard_weights:
        # The text encoder too: every rank of a data group encodes the same prompts, so its all-gathers stay in step.
        text_encoder = getattr(pipe, "text_encoder", None)
        if text_encoder is not None and not is_sharded(text_encoder):
            shard_model(text_encoder, state.data_group, state.device.type)
        for model in experts.values():
            stored = {p.dtype for p in model.parameters()} & FLOAT8_DTYPES
            if stored and float8_compute_dtype is None:
                raise ValueError(
                    f"the experts store {sorted(map(str, stored))} weights: pass `float8_compute_dtype`, the dtype "
                    "their shards are gathered and computed in."
                )
            shard_model(model, state.data_group, state.device.type, float8_compute_dtype if stored else None)
        state.shard_weights = True
    return state


def _check_not_sharded(experts: dict[str, torch.nn.Module]) -> None:
    sharded = [name for name, model in experts.items() if is_sharded(model)]
    if sharded:
        raise ValueError(
            f"{' and '.join(f'`{name}`' for name in sharded)} are sharded across the ranks of an earlier "
            "`enable_parallelism(shard_weights=True)`; load the pipeline again to change the layout."
        )


def disable_parallelism(pipe) -> None:
    """Give the pipeline's experts back their own processors and whole sequences; the process groups stay, and so
    does any weight sharding (see `enable_parallelism`)."""
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            unparallelize_model(model)
