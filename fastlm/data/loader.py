"""Training batches: a resumable distributed sampler over a packed dataset and a background loader.

The sampler defines one global stream of sample indices (epoch e is a permutation of all samples, seeded
with (seed, e)). Each micro step, the world takes the next `world_size * micro_batch_size` entries of the
stream and rank r keeps its slice, so the ranks see disjoint samples and the whole state is one number:
the stream position. Resuming at any position (also with another world size) continues the same stream.
"""

from __future__ import annotations

import numbers
import queue
import threading

import numpy as np
import torch


class ResumableDistributedSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, position: int = 0):
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("world_size", world_size, 1),
                                 ("position", position, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
            # (rank 2 of 2 would read rank 0's next samples: duplicates, silently)
            raise ValueError(f"rank must be an integer in [0, world_size = {world_size}), got {rank!r}")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.position = position  # samples of the global stream consumed by all ranks
        self._epoch, self._perm = -1, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._epoch = epoch
        return self._perm

    def stream(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global stream positions start .. start + count - 1 (crossing epochs)."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.num_samples)
            take = min(count - done, self.num_samples - offset)
            out[done:done + take] = self._epoch_order(epoch)[offset:offset + take]
            done += take
        return out

    def next_micro_batch(self) -> np.ndarray:
        """This rank's sample indices for the next micro step; advances the position for every rank."""
        world_take = self.world_size * self.micro_batch_size
        mine = self.stream(self.position + self.rank * self.micro_batch_size, self.micro_batch_size)
        self.position += world_take
        return mine

    @property
    def epoch(self) -> float:
        return self.position / self.num_samples


def check_token_ids(rows: np.ndarray, idx, dataset, vocab_size: int | None) -> None:
    """ValueError naming the file and sample when a row holds an id the model has no embedding for (on a
    GPU the lookup would fail later as a device-side assert). One max over the batch on the host."""
    if vocab_size is None or not rows.size or int(rows.max()) < vocab_size:
        return
    row = int(np.argmax(rows.max(axis=1)))
    path = getattr(getattr(dataset, "packed", None), "path", "the dataset")
    raise ValueError(f"{path}: sample {int(idx[row]):,} holds token id {int(rows[row].max()):,} but "
                     f"model.vocab_size is {vocab_size:,}; expected ids below it. HINT: set model.vocab_size "
                     f"to the vocabulary of the tokenizer the data was packed with")


class BatchLoader:
    """Yields (inputs, targets) int64 tensors of shape (micro_batch_size, sequence_length) in sampler
    order, prefetched by a background thread (pinned memory when the device is CUDA). With vocab_size,
    a batch holding a larger id is an error that names the file and the sample."""

    def __init__(self, dataset, sampler: ResumableDistributedSampler, device: torch.device,
                 prefetch: int = 2, vocab_size: int | None = None):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.prefetch = prefetch
        self.vocab_size = vocab_size
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread = None

    def _make(self) -> torch.Tensor:
        idx = self.sampler.next_micro_batch()
        rows = np.stack([self.dataset[int(i)][self.dataset.sample_key] for i in idx])
        check_token_ids(rows, idx, self.dataset, self.vocab_size)
        batch = torch.from_numpy(rows)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch

    def _worker(self):
        while not self._stop.is_set():
            try:
                item = self._make()
            except BaseException as err:  # surfaced in the training loop
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch > 0 and self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, daemon=True, name="fastlm-loader")
            self._thread.start()
        batch = self._queue.get() if self._thread is not None else self._make()
        if isinstance(batch, BaseException):
            raise batch
        batch = batch.to(self.device, non_blocking=True)
        return batch[:, :-1], batch[:, 1:]

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
