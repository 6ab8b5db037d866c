"""Training and evaluation orders that survive a resume and shard over DDP ranks."""



import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ResumableShuffle(Sampler[int]):
    """The training order: every epoch a fresh permutation of ``range(n)`` drawn from
    ``(seed, epoch)`` by a generator of its own (so nothing else's randomness shifts it), split
    between the ranks of a distributed run (rank r takes every world-th index; the last
    ``n % world`` indices of the permutation are dropped so every rank has as many batches).

    The sampler counts its epochs itself (each iteration is the next epoch) and ignores
    `set_epoch`: Lightning's epoch counter runs one ahead after a run stopped mid-epoch by
    max_steps, which would change the order of a resumed run. `resume_at(epoch, skip)` makes the
    next iteration epoch `epoch` without its first `skip` indices: how a run resumed in the
    middle of an epoch continues with exactly the batches it had not seen.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n = int(n)
        self.seed = int(seed)
        self.next_epoch = 0
        self._skip = 0

    @property
    def epoch(self) -> int:
        """The epoch of the iteration in progress (or of the next one, before any)."""
        return max(0, self.next_epoch - 1)

    def set_epoch(self, epoch: int) -> None:
        """Ignored (see the class docstring); Lightning calls it every epoch."""

    def resume_at(self, epoch: int, skip: int = 0) -> None:
        self.next_epoch = int(epoch)
        self._skip = int(skip)

    def _share(self, epoch: int) -> torch.Tensor:
        rank, world = _rank_world()
        # Modulo 2**63: an unseeded torch's initial seed is a full 64-bit number.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(self.n, generator=g)
        usable = self.n - self.n % world
        return perm[:usable][rank::world]

    def __iter__(self):
        share = self._share(self.next_epoch)[self._skip :]
        self.next_epoch += 1
        self._skip = 0
        return iter(share.tolist())

    def __len__(self) -> int:
        _, world = _rank_world()
        return self.n // world


class ShardedSequential(Sampler[int]):
    """Evaluation order: ``range(n)`` in order, rank r of a distributed run taking every world-th
    index, with no padding, so every image is scored exactly once over all ranks (sums of bits
    per dim and counts are then all-reduced: the same figure as one process)."""

    def __init__(self, n: int):
        self.n = int(n)

    def __iter__(self):
        rank, world = _rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = _rank_world()
        return len(range(rank, self.n, world))
