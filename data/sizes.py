"""Progressive resizing: the train crop size of each epoch, a function of the epoch alone.

Small images early make the first epochs cheap (FFCV, "budgeted training"); the size grows linearly to
the final one. Because the size depends on nothing but the epoch, a run resumed mid-epoch continues at
the size it was using, and every backend and rank agrees on it without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class TrainSizes:
    """size(epoch): `start_size` up to `start_epoch`, then linear to `final_size` at `end_epoch` and after,
    rounded to the nearest multiple of `multiple` (halves round up; at least one multiple), endpoints
    included, as FFCV rounds its resolution schedule. start_size None = always final_size, unrounded."""

    final_size: int
    start_size: int | None = None
    start_epoch: int = 0
    end_epoch: int = 0
    multiple: int = 32

    def __call__(self, epoch: int) -> int:
        if self.start_size is None:
            return self.final_size
        done = min(max(epoch, self.start_epoch), self.end_epoch) - self.start_epoch
        exact = self.start_size + Fraction((self.final_size - self.start_size) * done,
                                           self.end_epoch - self.start_epoch)
        rounded = int(exact / self.multiple + Fraction(1, 2)) * self.multiple  # floor(x + 1/2): halves up
        return max(rounded, self.multiple)
