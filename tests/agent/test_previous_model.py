"""The model a swap replaced, kept loaded while its successor proves itself."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.runtimes.base import LoadedModel
from agent.serving import ModelServer

X = {"x": np.ones((1, 2), np.float32)}


class _Runtime:
    def __init__(self, factor: float, fails: bool = False, error: BaseException | None = None):
        self.factor, self.fails, self.error = factor, fails, error
        self.unloads = 0

    def infer(self, inputs):
        if self.error is not None:
            raise self.error
        if self.fails:
            raise ValueError(f"model x{self.factor} cannot take these inputs")
        return {"y": inputs["x"] * self.factor}

    def unload(self) -> None:
        self.unloads += 1


class _Bundle:
    class manifest:  # noqa: N801 - mimics Bundle.manifest
        ref = "stub:1.0.0"


def _model(rt: _Runtime, slot: str) -> LoadedModel:
    return LoadedModel(_Bundle(), rt, slot)  # type: ignore[arg-type]


def _on_trial(new_rt: _Runtime) -> tuple[ModelServer, LoadedModel, _Runtime]:
    """A server whose model ("a", doubling) was just replaced by ``new_rt`` on trial."""
    server = ModelServer()
    old_rt = _Runtime(2.0)
    old = _model(old_rt, "a")
    server.swap(old)
    server.swap(_model(new_rt, "b"), keep_previous=True)
    return server, old, old_rt


def test_a_request_the_new_model_fails_is_answered_by_the_previous_one_and_counted():
    server, old, old_rt = _on_trial(_Runtime(3.0, fails=True))
    out, served = server.infer(X)
    assert served is old and out["y"][0, 0] == 2.0 and server.previous_served == 1
    assert server.health.peek() == (1, 1)  # a failure of the new model all the same
    assert server.totals().errors == 1 and old_rt.unloads == 0


def test_inputs_both_models_refuse_raise_the_active_models_error():
    server = ModelServer()
    server.swap(_model(_Runtime(2.0, fails=True), "a"))
    server.swap(_model(_Runtime(3.0, fails=True), "b"), keep_previous=True)
    with pytest.raises(ValueError, match="x3.0"):
        server.infer(X)
    assert server.previous_served == 0


def test_an_interrupt_is_not_answered_by_the_previous_model():
    server = ModelServer()
    server.swap(_model(_Runtime(2.0), "a"))
    server.swap(_model(_Runtime(3.0, error=KeyboardInterrupt()), "b"), keep_previous=True)
    with pytest.raises(KeyboardInterrupt):
        server.infer(X)


def test_without_keep_previous_the_old_model_unloads_and_nothing_answers_for_the_new():
    server = ModelServer()
    old_rt = _Runtime(2.0)
    server.swap(_model(old_rt, "a"))
    server.swap(_model(_Runtime(3.0, fails=True), "b"))
    assert old_rt.unloads == 1 and server.previous is None
    with pytest.raises(ValueError):
        server.infer(X)


def test_rolling_back_swaps_the_kept_model_in_and_retires_the_failed_one():
    new_rt = _Runtime(3.0, fails=True)
    server, old, old_rt = _on_trial(new_rt)
    server.swap(server.previous)  # the rollback
    assert server.active is old and server.previous is None
    assert old_rt.unloads == 0 and new_rt.unloads == 1
    assert server.infer(X)[0]["y"][0, 0] == 2.0


def test_committing_drops_the_kept_model_and_a_later_swap_replaces_it():
    server = ModelServer()
    rts = [_Runtime(float(k)) for k in range(4)]
    server.swap(_model(rts[0], "a"))
    server.swap(_model(rts[1], "b"), keep_previous=True)
    server.drop_previous()  # committed
    assert rts[0].unloads == 1 and rts[1].unloads == 0 and server.previous is None
    server.swap(_model(rts[2], "a"), keep_previous=True)
    server.swap(_model(rts[3], "b"), keep_previous=True)  # a second activation before a commit
    assert rts[1].unloads == 1 and rts[2].unloads == 0 and server.previous.runtime is rts[2]
    server.drop_previous()
    assert rts[2].unloads == 1 and rts[3].unloads == 0


class _Held(_Runtime):
    """Fails, but only once the test lets the request go on."""

    def __init__(self, factor: float):
        super().__init__(factor, fails=True)
        self.started, self.go = threading.Event(), threading.Event()

    def infer(self, inputs):
        self.started.set()
        self.go.wait(5)
        return super().infer(inputs)


def test_a_request_failing_on_the_new_model_after_its_rollback_is_answered_by_the_restored_one():
    # Review: the rollback had already cleared the kept model, so the request failed.
    new_rt = _Held(3.0)
    server, old, old_rt = _on_trial(new_rt)
    answers: list = []
    t = threading.Thread(target=lambda: answers.append(server.infer(X)))
    t.start()
    assert new_rt.started.wait(5)
    server.swap(server.previous)  # the rollback, while the request runs on the new model
    new_rt.go.set()
    t.join(5)
    (out, served), = answers
    assert served is old and out["y"][0, 0] == 2.0
    server.drop_previous()  # the deployment ends
    assert new_rt.unloads == 1 and old_rt.unloads == 0


def test_a_rollback_takes_back_the_kept_models_own_latency_buffer():
    # Review: it left one retiring entry per rollback, walked by every fold.
    server = ModelServer()
    old = _model(_Runtime(2.0), "a")
    server.swap(old)
    for _ in range(5):
        server.swap(_model(_Runtime(3.0, fails=True), "b"), keep_previous=True)
        server.swap(server.previous)
        server.drop_previous()
    server.infer(X)
    server.totals()  # a fold
    assert [m for m, _buf in server._retiring] == []
    assert server.totals().requests == 1


def test_only_the_unproven_model_is_answered_for():
    server = ModelServer()
    old_rt = _Held(2.0)  # the old model fails a request that started before the swap
    server.swap(_model(old_rt, "a"))
    answers: list = []

    def call():
        try:
            answers.append(server.infer(X))
        except ValueError as e:
            answers.append(e)

    t = threading.Thread(target=call)
    t.start()
    assert old_rt.started.wait(5)
    server.swap(_model(_Runtime(3.0), "b"), keep_previous=True)
    old_rt.go.set()
    t.join(5)
    assert isinstance(answers[0], ValueError)  # not answered by the model still on trial
    server.drop_previous()  # committed: the new model is proven, and its failures are its own
    server.swap(_model(_Runtime(4.0, fails=True), "a"))
    with pytest.raises(ValueError):
        server.infer(X)
