"""Rank 0's engine thread: a bounded queue of sequences, one `Engine.apply` per iteration, events to the requests.

Each iteration's work (cancellations, the waiting echo requests that need no decode step packed into one scoring
batch, at most one newcomer or one beam-search job) is decided here and, under tensor parallelism, broadcast to the
other ranks (`follow`), which apply the same work to their own engine.

A sequence's own fault ends that sequence inside `Engine.apply` (an error event). Anything `apply` raises is an
engine-level failure (a TP rank lost, a CUDA error, a bug outside one sequence's work): every queued and running
request is answered at once (503), new ones too, /health says 503, the other TP ranks are told to stop, and
`on_fatal` makes the process exit with ENGINE_FAILED_EXIT so that a supervisor restarts it.
"""
import os
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Dict, List, Optional

from generation.engine import Engine, Event, SequenceSpec, is_scoring
from model import mpu

HEARTBEAT_S = 5.0  # an idle rank 0 still sends (empty) work this often: the other ranks' broadcasts never time out
# With nothing decoding, a scoring batch that is not full waits this long for more echo requests: concurrent clients
# whose previous answers just went out send their next requests within it, and they share one forward.
SCORE_GATHER_S = 0.02
STOP = {"stop": True}
FATAL = {"fatal": True}  # rank 0's engine failed: every rank exits with ENGINE_FAILED_EXIT
ENGINE_FAILED_EXIT = 3
NOTIFY_TIMEOUT_S = 5.0  # how long rank 0 tries to tell the other ranks of a failure (the group may be broken)


class QueueFull(Exception):
    status = 429


class ShuttingDown(QueueFull):
    status = 503


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, metrics, distributed: bool,
                 on_fatal: Optional[Callable[[], None]] = None):
        self.engine, self.max_queue, self.metrics, self.distributed = engine, max_queue, metrics, distributed
        self.on_fatal = on_fatal  # called on the engine thread once the engine has failed (server.py: exit)
        self.waiting: deque = deque()
        self.cancelled: List[int] = []
        self.sinks: Dict[int, Callable[[Event], None]] = {}
        self.submitted: Dict[int, float] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.drain_at = None  # after a signal: when whatever still runs is cancelled
        self.shutdown_events: List[Event] = []  # cancellations of queued sequences, sent after the next apply
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.failed = None  # the exception that stopped the engine thread, if any

    # --- called from the HTTP side -------------------------------------------------------------------------------
    def submit(self, specs: List[SequenceSpec], sink: Callable[[Event], None]) -> None:
        """Queue the sequences, all or none (QueueFull past --max-queue); `sink` gets their events."""
        with self.cond:
            if self.failed is not None:
                raise ShuttingDown("the engine has failed; the server is exiting")
            if self.stopping or self.drain_at is not None:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) + len(specs) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} waiting, --max-queue {self.max_queue})")
            for spec in specs:
                self.sinks[spec.seq_id] = sink
                self.submitted[spec.seq_id] = time.perf_counter()
                self.waiting.append(spec)
            self.cond.notify()

    def cancel(self, seq_ids: List[int]) -> None:
        """Drop the sequences (a client went away): queued ones at once, running ones at the next step."""
        with self.cond:
            queued = {s.seq_id for s in self.waiting}
            self.waiting = deque(s for s in self.waiting if s.seq_id not in seq_ids)
            for seq_id in seq_ids:
                self.sinks.pop(seq_id, None)
                self.submitted.pop(seq_id, None)
                if seq_id not in queued:
                    self.cancelled.append(seq_id)
            self.cond.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def alive(self) -> bool:
        return self.thread.is_alive() and self.failed is None

    def start(self) -> None:
        self.thread.start()

    def drain(self, grace: float) -> None:
        """The server is going down: refuse new requests, give the running ones `grace` seconds, then cancel them.
        Safe in a signal handler (one attribute store, no lock)."""
        if self.drain_at is None:
            self.drain_at = time.monotonic() + grace

    def _drain_due(self) -> bool:
        return self.drain_at is not None and time.monotonic() >= self.drain_at

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is queued or running and end the thread (and, under TP, the other ranks' loops)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    # --- the engine thread ---------------------------------------------------------------------------------------
    def _next_work(self) -> dict:
        """Wait until there is something to do (or a heartbeat is due); the work of the next iteration."""
        with self.cond:
            deadline = time.monotonic() + HEARTBEAT_S
            while not (self.stopping or self.cancelled or self.engine.live() or self._admissible()
                       or any(is_scoring(s) for s in self.waiting)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return {}
                self.cond.wait(min(left, 1.0))
            deadline = time.monotonic() + SCORE_GATHER_S
            while self._gathering() and time.monotonic() < deadline:
                self.cond.wait(max(0.0, deadline - time.monotonic()))
            if self.stopping:
                return STOP
            if self._drain_due():
                self.shutdown_events += [Event(s.seq_id, finish_reason="cancelled") for s in self.waiting]
                self.waiting.clear()
                self.cancelled += [s.spec.seq_id for s in self.engine.slots if s is not None]
            work = {"cancel": self.cancelled}
            self.cancelled = []
            score = self._scoring_batch()
            if score:
                work["score"] = score
            if self._admissible():
                spec = self.waiting.popleft()
                work["beam" if spec.num_beams > 1 else "admit"] = [spec]
            return work

    def _gathering(self) -> bool:
        """Whether to wait for more echo requests: some wait, fewer than a batch, nothing else to do."""
        if self.stopping or self.cancelled or self.engine.live() or self._admissible() or self.drain_at is not None:
            return False
        waiting = sum(is_scoring(s) for s in self.waiting)
        return 0 < waiting < len(self.engine.slots)

    def _scoring_batch(self) -> List[SequenceSpec]:
        """The waiting echo requests that need no decode step, in queue order, as many as one forward takes: at most
        --max-slots of them, right-padded to at most the model's sequence length in tokens."""
        taken, longest = [], 0
        for spec in self.waiting:
            if not is_scoring(spec):
                continue
            longest = max(longest, len(spec.ids) + 2)
            if len(taken) == len(self.engine.slots) or (taken and longest * (len(taken) + 1) >
                                                         self.engine.max_sequence_length):
                break
            taken.append(spec)
        if taken:
            chosen = {id(s) for s in taken}
            self.waiting = deque(s for s in self.waiting if id(s) not in chosen)
        return taken

    def _admissible(self) -> bool:
        return bool(self.waiting) and not is_scoring(self.waiting[0]) and (self.waiting[0].num_beams > 1
                                                                            or self.engine.can_admit())

    def _run(self) -> None:
        try:
            while True:
                work = self._next_work()
                if work is STOP:
                    self._shutdown()
                    return
                if not work and not self.distributed:
                    continue
                events = self._apply(work)
                events, self.shutdown_events = events + self.shutdown_events, []
                self._dispatch(events)
        except BaseException as e:  # noqa: BLE001 - the engine is broken: answer every request, then exit
            self._fatal(e)

    def _apply(self, work: dict) -> List[Event]:
        if self.distributed:
            mpu.broadcast_object(work)
        start, tokens = time.perf_counter(), self.engine.decode_tokens
        if work.get("score"):
            self.metrics.scoring_batch(len(work["score"]))
        events = self.engine.apply(work)
        self.metrics.step(time.perf_counter() - start, self.engine.decode_tokens - tokens)
        return events

    def _dispatch(self, events: List[Event]) -> None:
        with self.cond:
            routed = [(self.sinks.get(e.seq_id), e) for e in events]
            for e in events:
                started = self.submitted.pop(e.seq_id, None)
                if started is not None:
                    self.metrics.first_token(time.perf_counter() - started)
                if e.finish_reason is not None:
                    self.sinks.pop(e.seq_id, None)
        for sink, event in routed:
            if sink is not None:
                try:
                    sink(event)
                except Exception:  # noqa: BLE001 - a request whose event loop is gone must not stop the others
                    pass

    def _shutdown(self) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        events = [Event(s.seq_id, finish_reason="cancelled") for s in waiting]
        running = [s.spec.seq_id for s in self.engine.slots if s is not None]
        if running:
            events += self._apply({"cancel": running})
        if self.distributed:
            mpu.broadcast_object(STOP)
        self._dispatch(events)

    def _fatal(self, error: BaseException) -> None:
        """The engine cannot go on: refuse everything (503), tell the other ranks, let the process exit."""
        with self.cond:
            self.failed = error
            sinks, self.sinks = dict(self.sinks), {}
            self.waiting.clear()
        print(f"> engine failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        traceback.print_exception(error, file=sys.stderr)
        message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        for seq_id, sink in sinks.items():
            try:
                sink(Event(seq_id, finish_reason="error", error=message))
            except Exception:  # noqa: BLE001
                pass
        if self.distributed:
            _notify_others(FATAL)
        if self.on_fatal is not None:
            self.on_fatal()


def _notify_others(message: dict) -> None:
    """Broadcast `message` to the other ranks, giving up after NOTIFY_TIMEOUT_S (a lost rank can block it)."""
    def send():
        try:
            mpu.broadcast_object(message)
        except Exception:  # noqa: BLE001 - a rank that is gone already knows
            pass

    sender = threading.Thread(target=send, name="notify", daemon=True)
    sender.start()
    sender.join(NOTIFY_TIMEOUT_S)


def exit_engine_failed(rank: int) -> None:
    """End this process at once with ENGINE_FAILED_EXIT: torch.distributed may be broken, so no teardown (a
    collective that never returns would hang the exit)."""
    print(f"> server rank {rank} exiting with status {ENGINE_FAILED_EXIT}: the engine failed", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os._exit(ENGINE_FAILED_EXIT)


def follow(engine: Engine) -> None:
    """A tensor-parallel rank other than 0: apply rank 0's work until it says stop; exit when the engine fails
    (rank 0's, told by FATAL, or this rank's own, e.g. rank 0 lost)."""
    while True:
        try:
            work = mpu.broadcast_object(None)
            if work == STOP:
                return
            if work == FATAL:
                exit_engine_failed(mpu.get_rank())
            engine.apply(work)
        except Exception as e:  # noqa: BLE001 - this rank cannot go on; rank 0 fails on its next collective
            print(f"> server rank {mpu.get_rank()}: engine failed: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            exit_engine_failed(mpu.get_rank())
