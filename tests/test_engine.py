"""The fast engine (npmnv3/engine/) against the readable path and torchvision; its threads and state.

Batches 5 and 9 run in chunks (9 = chunks of 5 and 4 images, whose first layers run image by
image), batch 1 in one plan whose row bands run on two threads when threads > 1; the sizes go
down to maps of 1x1, where the padding is larger than the map.
"""

import functools
import sys
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import npmnv3
from conftest import ARCHS, npmnv3_model, numpy_state_dict, random_torch_model, record, rel_err, torch_forward
from npmnv3.engine import CHUNK, chunk_bounds, parallel

TOL = {np.float32: 1e-4, np.float64: 1e-10}
DTYPES = pytest.mark.parametrize("dtype", (np.float32, np.float64), ids=("float32", "float64"))


@functools.lru_cache(maxsize=None)
def torch_model_for(arch, seed, options=()):
    return random_torch_model(arch, seed=seed, **dict(options))


def check(model, torch_model, x, dtype, label, torchvision=True):
    """model(x) against forward_reference and torchvision: logits and every features.i.

    (torch's float64 convolutions are slow; float64 compares to torchvision on the small inputs only,
    forward_reference is compared everywhere and test_model.py holds it to torchvision.)"""
    logits, feats = model(x, return_intermediates=True)
    ref_logits, ref_feats = model.forward_reference(x, return_intermediates=True)
    tv_logits, tv_feats = torch_forward(torch_model, x, dtype) if torchvision else (ref_logits, ref_feats)
    assert logits.dtype == dtype and logits.shape == tv_logits.shape
    assert list(feats) == list(ref_feats) == list(tv_feats)
    for key in tv_feats:
        assert feats[key].dtype == dtype and feats[key].shape == tv_feats[key].shape, key
        assert feats[key].flags.c_contiguous, key
        assert record(f"fast {label} features", rel_err(feats[key], tv_feats[key])) <= TOL[dtype], key
        assert rel_err(feats[key], ref_feats[key]) <= TOL[dtype], key
    assert record(f"fast {label} logits", rel_err(logits, tv_logits)) <= TOL[dtype]
    assert rel_err(logits, ref_logits) <= TOL[dtype]
    # without intermediates (batches then run their first layers image by image, one image runs
    # its row bands on two threads): the same logits to rounding
    plain = model(x)
    assert plain.dtype == dtype and rel_err(plain, logits) <= TOL[dtype] / 10
    assert rel_err(plain, tv_logits) <= TOL[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@DTYPES
def test_default_model_sizes_and_batches(arch, dtype):
    torch_model = torch_model_for(arch, 11)
    model = npmnv3_model(arch, torch_model, dtype)
    rng = np.random.default_rng(0)
    label = np.dtype(dtype).name
    shapes = [(1, 3, 224, 224), (5, 3, 97, 131), (9, 3, 33, 45), (2, 3, 17, 23), (1, 3, 1, 1), (3, 3, 6, 2)]
    if dtype == np.float64:
        shapes.remove((5, 3, 97, 131))     # the slow readable path in float64: float32 covers it
    for shape in shapes:
        x = rng.standard_normal(shape).astype(dtype)
        check(model, torch_model, x, dtype, label, torchvision=dtype == np.float32 or shape[2] < 32)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", [{"dilated": True}, {"reduced_tail": True}, {"width_mult": 0.75},
                                     {"dilated": True, "reduced_tail": True, "num_classes": 10}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@DTYPES
def test_options(arch, options, dtype):
    torch_model = torch_model_for(arch, 12, tuple(sorted(options.items())))
    model = npmnv3_model(arch, torch_model, dtype, **options)
    rng = np.random.default_rng(1)
    for shape in [(5, 3, 33, 45), (1, 3, 17, 23)]:
        x = rng.standard_normal(shape).astype(dtype)
        check(model, torch_model, x, dtype, np.dtype(dtype).name, torchvision=dtype == np.float32 or shape[0] == 1)


def test_repeated_calls_are_identical_and_leave_the_input_alone():
    model = npmnv3_model("mobilenet_v3_small", torch_model_for("mobilenet_v3_small", 11), np.float32)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((3, 3, 40, 40)).astype(np.float32) for _ in range(2))
    a_copy = a.copy()
    la, fa = model(a, return_intermediates=True)
    lb = model(b)                          # reuses the plans' buffers
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(model(a), model(a))
    assert not np.shares_memory(la, lb)
    la2, fa2 = model(a, return_intermediates=True)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fa2[key])
    # one batch of 3 equals three batches of 1 (chunks against one-image plans), to rounding
    singles = np.concatenate([model(a[i:i + 1]) for i in range(3)])
    assert rel_err(singles, la) <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 5, 9, 16, 17, 32, 33])
def test_chunks_cover_the_batch(n):
    chunks = chunk_bounds(n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b and b - a <= CHUNK for a, b in chunks)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(chunks, chunks[1:]))
    assert len(chunks) == 1 if n == 1 else len(chunks) % 2 == 0 or len(chunks) == n


# --------------------------------------------------------------------------- parameters cannot go stale

def test_parameters_are_read_only_and_load_state_dict_reaches_the_engine():
    model = npmnv3_model("mobilenet_v3_small", torch_model_for("mobilenet_v3_small", 11), np.float64)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32))
    before = model(x)
    with pytest.raises(ValueError, match="read-only"):
        model.params["features.0.1.bias"][:] = 1
    with pytest.raises(TypeError, match=r"parameters are read-only; change them with model.load_state_dict"):
        model.params["features.0.1.bias"] = np.ones(16)
    np.testing.assert_array_equal(model(x), before)
    # the way to change one: load_state_dict; the engine then runs on the new values
    model.load_state_dict({"features.0.1.bias": np.ones(16)}, strict=False)
    assert rel_err(model(x), model.forward_reference(x)) <= 1e-10
    assert rel_err(model(x), before) > 1e-3
    _, feats = model(x, return_intermediates=True)
    _, ref = model.forward_reference(x, return_intermediates=True)
    assert rel_err(feats["features.0"], ref["features.0"]) <= 1e-12


def test_engine_follows_a_whole_new_state_dict():
    model = npmnv3_model("mobilenet_v3_small", torch_model_for("mobilenet_v3_small", 11), np.float64)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32))
    first = model(x)
    model.load_state_dict(numpy_state_dict(random_torch_model("mobilenet_v3_small", seed=15)))
    assert rel_err(model(x), model.forward_reference(x)) <= 1e-10
    assert rel_err(model(x), first) > 1e-3


# --------------------------------------------------------------------------- threads

def blas_thread_counts():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


@pytest.mark.parametrize("shape", [(1, 3, 96, 96), (5, 3, 40, 40)], ids=("one image", "batch"))
def test_threads_1_starts_no_thread(shape, monkeypatch):
    model = npmnv3.mobilenet_v3_small(threads=1)
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)

    def refuse(self):
        raise AssertionError(f"a thread was started: {self.name}")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    model(x)
    model(x, return_intermediates=True)
    model.forward_reference(x)


def test_threads_argument_is_checked():
    assert npmnv3.mobilenet_v3_small(threads=3).threads == 3
    assert npmnv3.mobilenet_v3_small().threads >= 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"threads: expected a positive integer or None, got "):
            npmnv3.mobilenet_v3_small(threads=bad)


@pytest.mark.parametrize("shape", [(1, 3, 160, 160), (9, 3, 40, 40)], ids=("one image", "batch"))
def test_results_do_not_depend_on_threads_and_no_thread_outlives_the_call(shape):
    state = npmnv3.mobilenet_v3_large(seed=5).state_dict()
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    results = {}
    before = threading.active_count()
    for threads in (1, 2, 3):
        model = npmnv3.mobilenet_v3_large(threads=threads)
        model.load_state_dict(state)
        results[threads] = [model(x) for _ in range(3)]
        assert threading.active_count() == before
    for threads, outs in results.items():
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])        # no behaviour depends on timing
    if shape[0] > 1:    # chunks depend on N alone: the very same floats on any number of threads
        np.testing.assert_array_equal(results[1][0], results[2][0])
    else:               # one image on several threads runs in row bands: GEMMs of other sizes
        assert rel_err(results[1][0], results[2][0]) <= 1e-5
    np.testing.assert_array_equal(results[2][0], results[3][0])


def test_blas_threads_and_switch_interval_are_restored_after_a_forward_and_after_a_failing_one(monkeypatch):
    from npmnv3.engine import plan as plan_module
    before, interval = blas_thread_counts(), sys.getswitchinterval()
    assert interval != npmnv3.threads.SWITCH_INTERVAL
    model = npmnv3.mobilenet_v3_small(threads=2)
    x = np.random.default_rng(6).standard_normal((3, 3, 64, 64)).astype(np.float32)
    seen = []
    real = plan_module._bias_act

    def spy(*args):
        seen.append((blas_thread_counts(), sys.getswitchinterval()))
        real(*args)
    monkeypatch.setattr(plan_module, "_bias_act", spy)
    model(x)
    assert seen and all(counts == [1] * len(counts) for counts, _ in seen)     # held at 1 during the pass
    assert all(s == npmnv3.threads.SWITCH_INTERVAL for _, s in seen)          # the chunks' threads: short
    assert blas_thread_counts() == before and sys.getswitchinterval() == interval
    seen.clear()
    npmnv3.mobilenet_v3_small(threads=1)(x)
    assert seen and all(s == interval for _, s in seen)                       # one thread: left alone

    def fail(*args):
        raise RuntimeError("a layer failed")
    monkeypatch.setattr(plan_module, "_bias_act", fail)
    for shape in [(3, 3, 48, 48), (1, 3, 48, 48)]:
        with pytest.raises(RuntimeError, match="a layer failed"):
            npmnv3.mobilenet_v3_small(threads=2)(np.zeros(shape, np.float32))
        assert blas_thread_counts() == before and sys.getswitchinterval() == interval


def test_two_threads_calling_one_model_at_once_get_correct_results():
    model = npmnv3.mobilenet_v3_small(seed=7)
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in
              [(1, 3, 120, 120), (1, 3, 120, 120), (6, 3, 48, 48), (6, 3, 48, 48)]]
    expected = [model(x) for x in inputs]
    failures, barrier = [], threading.Barrier(len(inputs))

    def call(i):
        barrier.wait()
        for _ in range(4):
            if not np.array_equal(model(inputs[i]), expected[i]):
                failures.append(i)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# --------------------------------------------------------------------------- one image in row bands

@pytest.mark.parametrize("arch", ARCHS)
def test_one_image_plan_is_cut_into_groups_of_row_bands(arch):
    model = npmnv3.mobilenet_v3_large() if arch == "mobilenet_v3_large" else npmnv3.mobilenet_v3_small()
    engine = model.engine()
    plan = engine._checkout((1, 224, 224, frozenset(), 0, True))
    groups = [step for step in plan.steps if isinstance(step, parallel.Group)]
    assert len(groups) >= (10 if arch == "mobilenet_v3_large" else 3)
    assert all(len(g.bands) == 2 for g in groups)
    # every call of the plan is in exactly one step: as itself, or cut into one piece per band
    pieces = sum(len(g.bands[0]) for g in groups) + sum(1 for s in plan.steps if isinstance(s, parallel.Call))
    assert pieces == len(plan.calls)


def test_an_exception_in_a_band_reaches_the_caller_and_stops_the_helper():
    x = np.zeros((64, 64))
    calls = [parallel.Call(np.copyto, x, 1.0, cuts=[(0, 0, 1, True)], rows=64, cost=1e3),
             parallel.Call(np.multiply, x, 2.0, out=x, cuts=[(0, 0, 1, True), ("out", 0, 1, True)], rows=64, cost=1e3)]
    steps = parallel.row_groups(calls, bands=2)
    assert len(steps) == 1 and isinstance(steps[0], parallel.Group)
    parallel.run_steps(steps, threads=2)
    np.testing.assert_array_equal(x, 2.0)

    def boom():
        raise ValueError("band failed")
    before = threading.active_count()
    for bad in (0, 1):      # the caller's band, then the helper's
        steps[0].bands[bad] = [boom]
        with pytest.raises(ValueError, match="band failed"):
            parallel.run_steps(steps + [parallel.Call(np.copyto, x, 5.0)], threads=2)
        assert threading.active_count() == before
        steps[0].bands[bad] = [c for c in steps[0].bands[1 - bad]]


def test_row_groups_keep_calls_that_read_across_the_cut_apart():
    """A call reading rows a band of the previous call writes in the other band (a convolution's
    window) starts a new group; a call that is not cut runs alone."""
    padded, b = np.zeros((12, 4)), np.zeros((10, 4))
    a = padded[1:-1]                                                                    # rows 1..10
    window = np.lib.stride_tricks.sliding_window_view(padded, (3, 4))[:, 0]            # (10, 3, 4): rows r..r+2
    write_a = parallel.Call(np.copyto, a, 1.0, cuts=[(0, 0, 1, True)], rows=10, cost=1e3)
    read_window = parallel.Call(np.sum, window, axis=(1, 2), out=b[:, 0], cuts=[(0, 0, 1, False), ("out", 0, 1, True)],
                                rows=10, cost=1e3)
    alone = parallel.Call(np.copyto, b, 0.0)
    steps = parallel.row_groups([write_a, read_window, alone], bands=2)
    assert [type(s).__name__ for s in steps] == ["Group", "Group", "Call"]
    parallel.run_steps(steps, threads=2)
    np.testing.assert_array_equal(b, 0.0)
    parallel.run_steps(steps[:2], threads=2)
    np.testing.assert_array_equal(b[:, 0], [8] + [12] * 8 + [8])     # 3 x 4 windows of ones, zero-padded
