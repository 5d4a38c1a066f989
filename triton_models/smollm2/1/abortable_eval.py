"""Stops a prompt's evaluation inside llama.cpp once its request is cancelled.

A prompt is evaluated in calls of up to prefill.CHUNK tokens, each of which llama.cpp runs to the end: hundreds of
milliseconds on a CPU for one chunk. A cancelled request (a caller gone, or a batch line the router preempted for
interactive work) held the replica, and every request queued behind it, that long. ggml asks an abort callback
between the nodes of its graph; this one polls the request at most every POLL_S, so a cancel stops the evaluation
within milliseconds and llama_decode returns 2 (aborted), which llama-cpp-python raises as a RuntimeError.

The callback is installed only while a prompt is evaluated: during generation the request is checked once per
token already, and a Python call per graph node would cost a token's time a noticeable share. llama.h (0.3.16's
bundled llama.cpp): the abort callback "currently works only with CPU execution"; a CUDA build
(MESH_MODEL_GPU_LAYERS) evaluates a prompt to its end as before, in far less time.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import llama_cpp

if TYPE_CHECKING:
    from llama_cpp import Llama

# Short against a chunk's evaluation, long against the cost of asking Triton whether the request was cancelled.
POLL_S = 0.005
_NO_CALLBACK = llama_cpp.ggml_abort_callback(0)


class Aborted(Exception):
    """The evaluation stopped part-way because its request was cancelled."""


class AbortableEval:
    def __init__(self, llm: Llama, poll_s: float = POLL_S) -> None:
        self._context = llm._ctx.ctx
        self._poll_s = poll_s
        self._cancelled: Callable[[], bool] = lambda: False
        self._next_poll = 0.0
        self._aborted = False
        # Kept on the object: ggml holds only the pointer, a collected callback would crash the process.
        self._callback = llama_cpp.ggml_abort_callback(self._should_abort)

    def _should_abort(self, _data: ctypes.c_void_p) -> bool:
        if self._aborted:
            return True
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self._poll_s
        try:
            self._aborted = bool(self._cancelled())
        except Exception:  # an exception cannot cross into C; the evaluation goes on, the next poll asks again
            return False
        return self._aborted

    @contextmanager
    def watching(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Evaluations inside stop when `cancelled()` turns true, raising Aborted."""
        self._cancelled, self._next_poll, self._aborted = cancelled, 0.0, False
        llama_cpp.llama_set_abort_callback(self._context, self._callback, None)
        try:
            yield
        except RuntimeError:
            if self._aborted:
                raise Aborted from None
            raise
        finally:
            llama_cpp.llama_set_abort_callback(self._context, _NO_CALLBACK, None)
            self._cancelled = lambda: False
