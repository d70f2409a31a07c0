"""Schedules: which data stream each batch position of training comes from.

A schedule is a pure function of ``(position, seed)`` once it knows the stream names, so every rank picks
the same stream at every step without communication and a resumed run continues the same sequence.

- :class:`RoundRobin`: one stream per step in turn (FLAVA).
- :class:`Weighted`: a deterministic mixture whose stream counts track ``weights`` at every prefix (PaLI).
- :class:`Accumulate`: one batch of every stream per optimizer step, accumulated (Flamingo).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vlm.data.stream import derive_seed
from vlm.errors import VLMConfigError

_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the most evenly spreading additive step
_MASK = (1 << 64) - 1


class Schedule:
    """Base class: call :meth:`setup` with the stream names, then :meth:`stream_at` for any position."""

    #: consecutive batches that form one optimizer step (the DataModule checks accumulate_grad_batches)
    batches_per_step: int = 1

    def __init__(self) -> None:
        self.names: list[str] = []
        self.seed = 0

    def setup(self, names: Sequence[str], sizes: Mapping[str, int | None] | None = None, seed: int = 0) -> None:
        """Bind the schedule to the stream names (in config order), their sizes (if known) and the seed."""
        if not names:
            raise VLMConfigError(f"{type(self).__name__}: no data streams given. Declare at least one under `streams:`.")
        self.names = list(names)
        self.seed = int(seed)

    def stream_at(self, position: int) -> str:
        """Name of the stream of the batch at ``position`` (0-based, global over streams)."""
        raise NotImplementedError

    def _check_ready(self) -> None:
        if not self.names:
            raise RuntimeError(f"{type(self).__name__}.setup(names) must be called before stream_at().")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RoundRobin(Schedule):
    """One stream per step, in the order the streams are declared (FLAVA's default)."""

    def stream_at(self, position: int) -> str:
        """The stream at ``position``: ``names[position % len(names)]``."""
        self._check_ready()
        return self.names[position % len(self.names)]


class Weighted(Schedule):
    """Mix streams in proportion to ``weights`` (PaLI's task mixture), deterministically.

    Position ``p`` maps to ``u = frac((p + offset(seed)) / golden ratio)`` and picks the stream whose slice of
    ``[0, 1)`` (sized by its normalised weight) contains ``u``. This equidistributed (low-discrepancy)
    sequence keeps every stream's count within a few batches of ``p * weight`` at every prefix, unlike
    i.i.d. sampling whose error grows like ``sqrt(p)``; the seed shifts the sequence.

    Args:
        weights: mixing ratio per stream name (normalised; zero means never drawn). ``None`` (or the string
            ``"weighted"`` in config) uses the streams' dataset sizes.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.weights: dict[str, float] | None = None if weights is None else {k: float(v) for k, v in weights.items()}
        self._bounds: list[tuple[int, str]] = []
        self._offset = 0

    def setup(self, names: Sequence[str], sizes: Mapping[str, int | None] | None = None, seed: int = 0) -> None:
        """Check the weights name exactly the streams and precompute the cumulative slices."""
        super().setup(names, sizes, seed)
        weights = self.weights
        if weights is None:
            sizes = dict(sizes or {})
            unknown = [n for n in self.names if sizes.get(n) is None]
            if unknown:
                raise VLMConfigError(
                    f"Weighted schedule without weights uses dataset sizes, but streams {unknown} have no known size "
                    "(iterable datasets). Give `schedule: {class_path: vlm.data.schedule.Weighted, init_args: "
                    "{weights: {stream: ratio, ...}}}`."
                )
            weights = {n: float(sizes[n]) for n in self.names}  # type: ignore[arg-type]
        extra = sorted(set(weights) - set(self.names))
        if extra:
            raise VLMConfigError(
                f"Weighted schedule names streams {extra} that do not exist; the streams are {self.names}. "
                "Fix the names under the schedule's `weights:` or add those streams under `streams:`."
            )
        missing = [n for n in self.names if n not in weights]
        if missing:
            raise VLMConfigError(
                f"Weighted schedule has no weight for streams {missing}. Give each stream a weight under the "
                "schedule's `weights:` (0 to leave a stream unused)."
            )
        bad = {n: w for n, w in weights.items() if not (w >= 0.0) or w == float("inf")}
        if bad:
            raise VLMConfigError(f"Weighted schedule weights must be finite and >= 0; got {bad}.")
        total = sum(weights[n] for n in self.names)
        if total <= 0:
            raise VLMConfigError(f"Weighted schedule weights sum to zero ({weights}); give some stream a positive weight.")
        # integer slice bounds on [0, 2**64): exact arithmetic, identical on every machine
        self._bounds, acc = [], 0.0
        for n in self.names:
            if weights[n] == 0.0:
                continue
            acc += weights[n] / total
            self._bounds.append((min(1 << 64, int(round(acc * (1 << 64)))), n))
        self._bounds[-1] = (1 << 64, self._bounds[-1][1])
        self.ratios = {n: weights[n] / total for n in self.names}
        self._offset = derive_seed("weighted", self.seed)

    def stream_at(self, position: int) -> str:
        """The stream whose weight slice contains the ``position``-th point of the seeded golden-ratio sequence."""
        self._check_ready()
        u = ((position + self._offset) * _GOLDEN) & _MASK
        for bound, name in self._bounds:
            if u < bound:
                return name
        return self._bounds[-1][1]

    def __repr__(self) -> str:
        return f"Weighted(weights={self.weights})"


class Accumulate(Schedule):
    """One batch of every stream per optimizer step (Flamingo): streams in turn, gradients accumulated.

    Needs ``trainer.accumulate_grad_batches`` to be a multiple of the number of streams; the DataModule sets
    it to the number of streams when it is left at 1 and raises otherwise.
    """

    def setup(self, names: Sequence[str], sizes: Mapping[str, int | None] | None = None, seed: int = 0) -> None:
        """Bind the names; one optimizer step spans ``len(names)`` batches."""
        super().setup(names, sizes, seed)
        self.batches_per_step = len(self.names)

    def stream_at(self, position: int) -> str:
        """The stream at ``position``: ``names[position % len(names)]``."""
        self._check_ready()
        return self.names[position % len(self.names)]


SCHEDULES: dict[str, type[Schedule]] = {"round_robin": RoundRobin, "weighted": Weighted, "accumulate": Accumulate}


def make_schedule(spec: str | Schedule) -> Schedule:
    """A schedule from a config value: an instance, or one of ``"round_robin"``, ``"weighted"``, ``"accumulate"``."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str) and spec.lower() in SCHEDULES:
        return SCHEDULES[spec.lower()]()
    raise VLMConfigError(
        f"schedule={spec!r}: use one of {sorted(SCHEDULES)} or a Schedule such as "
        "{class_path: vlm.data.schedule.Weighted, init_args: {weights: {...}}}."
    )
