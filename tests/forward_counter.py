"""Counts the forwards of each expert that ran the whole block stack: what a step cache saves shows here."""

from __future__ import annotations

EXPERTS = ("transformer", "transformer_2")


class FullForwards:
    """Counts, per expert, the forwards that ran the whole block stack (the last block's feed-forward ran)."""

    def __init__(self, pipe):
        self.counts = dict.fromkeys(EXPERTS, 0)
        self.handles = [
            getattr(pipe, name).blocks[-1].ffn.register_forward_hook(lambda *_, name=name: self._count(name))
            for name in EXPERTS
        ]

    def _count(self, name):
        self.counts[name] += 1

    def reset(self):
        self.counts = dict.fromkeys(EXPERTS, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def remove(self):
        for handle in self.handles:
            handle.remove()
