"""The fast engine (npmnv3/fast.py) against the readable path and against torchvision.

Batches 5 and 9 run on the thread pool in chunks (9 = tasks of 5 and 4 images, whose first blocks
run image by image), batch 1 on the calling thread; the sizes go down to maps of 1x1, where the
padding is larger than the map.
"""

import functools

import numpy as np
import pytest

import npmnv3
from conftest import ARCHS, npmnv3_model, numpy_state_dict, random_torch_model, record, rel_err, torch_forward
from npmnv3.fast import CHUNK, FastEngine

pytest.importorskip("torch")
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
    if torchvision:
        tv_logits, tv_feats = torch_forward(torch_model, x, dtype)
    else:
        tv_logits, tv_feats = ref_logits, ref_feats
    assert logits.dtype == dtype and logits.shape == tv_logits.shape
    assert list(feats) == list(ref_feats) == list(tv_feats)
    for key in tv_feats:
        assert feats[key].dtype == dtype and feats[key].shape == tv_feats[key].shape, key
        assert feats[key].flags.c_contiguous, key
        assert record(f"fast {label} features", rel_err(feats[key], tv_feats[key])) <= TOL[dtype], key
        assert rel_err(feats[key], ref_feats[key]) <= TOL[dtype], key
    assert record(f"fast {label} logits", rel_err(logits, tv_logits)) <= TOL[dtype]
    assert rel_err(logits, ref_logits) <= TOL[dtype]
    # without intermediates (batches then run their first blocks image by image): the same logits
    plain = model(x)
    assert plain.dtype == dtype and rel_err(plain, logits) <= TOL[dtype] / 10
    assert rel_err(plain, tv_logits) <= TOL[dtype]


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


def test_repeated_calls_are_independent_and_input_untouched():
    torch_model = torch_model_for("mobilenet_v3_small", 11)
    model = npmnv3_model("mobilenet_v3_small", torch_model, np.float32)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal((3, 3, 40, 40)).astype(np.float32) for _ in range(2))
    a_copy = a.copy()
    la, fa = model(a, return_intermediates=True)
    lb = model(b)                          # reuses the cached buffers
    np.testing.assert_array_equal(a, a_copy)
    np.testing.assert_array_equal(model(a), la)
    assert not np.shares_memory(la, lb)
    la2, fa2 = model(a, return_intermediates=True)
    for key in fa:
        np.testing.assert_array_equal(fa[key], fa2[key])
    # one batch of 3 equals three batches of 1 (the threaded path against the single-thread one)
    singles = np.concatenate([model(a[i:i + 1]) for i in range(3)])
    assert rel_err(singles, la) <= 1e-5


def test_engine_is_rebuilt_after_load_state_dict():
    small = torch_model_for("mobilenet_v3_small", 11)
    model = npmnv3_model("mobilenet_v3_small", small, np.float64)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32))
    first = model(x)
    model.load_state_dict(numpy_state_dict(random_torch_model("mobilenet_v3_small", seed=15)))
    assert rel_err(model(x), model.forward_reference(x)) <= 1e-10
    assert rel_err(model(x), first) > 1e-3


@pytest.mark.parametrize("n", [1, 2, 5, 9, 32, 33])
def test_chunks_cover_the_batch(n):
    engine = FastEngine(npmnv3.mobilenet_v3_small())
    chunks = engine._chunks(n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b and b - a <= CHUNK for a, b in chunks)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(chunks, chunks[1:]))
    if n > 1 and engine.threads > 1:
        assert len(chunks) % engine.threads == 0 or len(chunks) == n


@pytest.mark.parametrize("arch", ARCHS)
@DTYPES
def test_one_image_split_over_two_threads(arch, dtype, monkeypatch):
    """N == 1 runs its large layers as row bands on the caller and a helper thread (work stealing):
    the logits of the one-thread plan (within rounding) and exactly those of the same bands run
    serially, with groups actually formed, also for odd sizes; exceptions in a band reach the
    caller; concurrent single-image calls give the very same logits."""
    import threading

    from npmnv3 import fast
    torch_model = torch_model_for(arch, 11)
    model = npmnv3_model(arch, torch_model, dtype)
    rng = np.random.default_rng(4)
    for shape in [(1, 3, 224, 224), (1, 3, 97, 131), (1, 3, 33, 45), (1, 3, 1, 1)]:
        x = rng.standard_normal(shape).astype(dtype)
        engine = fast.FastEngine(model)
        split = engine._plan(1, *shape[2:], split=True)
        if shape[2] == 224:
            assert sum(isinstance(s, fast._Split) for steps, _ in split.stages for s in steps) >= 10
        logits = np.empty((1, engine.num_classes), dtype)
        with fast._worker().busy:
            split.run(x, logits, *(engine.head[k] for k in ("fc0", "fc3")))
        plain = np.empty_like(logits)
        engine._plan(1, *shape[2:]).run(x, plain, *(engine.head[k] for k in ("fc0", "fc3")))
        assert rel_err(logits, plain) <= TOL[dtype] / 10
        serial = np.empty_like(logits)      # its bands one after the other: the very same floats
        engine._run_split_plan(x, serial, serial=True)
        np.testing.assert_array_equal(serial, logits)
        assert rel_err(model(x), model.forward_reference(x)) <= TOL[dtype]

    # the helper's exception reaches the caller, and the helper keeps working afterwards
    x = rng.standard_normal((1, 3, 160, 160)).astype(dtype)
    engine = fast.FastEngine(model)
    plan = engine._plan(1, 160, 160, split=True)
    group = next(s for steps, _ in plan.stages for s in steps if isinstance(s, fast._Split))
    saved = group.pieces

    def boom():
        raise ValueError("band failed")
    group.pieces = [boom] * len(saved)
    with pytest.raises(ValueError, match="band failed"):
        group()
    group.pieces = saved
    logits = np.empty((1, engine.num_classes), dtype)
    with fast._worker().busy:
        plan.run(x, logits, *(engine.head[k] for k in ("fc0", "fc3")))
    assert rel_err(logits, model.forward_reference(x)) <= TOL[dtype]

    # two threads calling with one image each: one gets the helper, the other runs the same plan
    # serially; either way the very same logits
    xs = [rng.standard_normal((1, 3, 160, 160)).astype(dtype) for _ in range(2)]
    refs = [model(xi) for xi in xs]
    results = {}

    def call(i):
        results[i] = [model(xs[i]) for _ in range(5)]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for got in results[i]:
            np.testing.assert_array_equal(got, refs[i])


def test_one_image_split_backs_off_when_slower(monkeypatch):
    """SPLIT_SLOW split forwards slower than the one-thread average -> SPLIT_BACKOFF on one thread
    (which re-measure it), then split again; the same floats either way."""
    from npmnv3 import fast
    model = npmnv3_model("mobilenet_v3_small", torch_model_for("mobilenet_v3_small", 11), np.float32)
    engine = fast.FastEngine(model)
    monkeypatch.setattr(model, "_engine", engine, raising=False)
    x = np.random.default_rng(5).standard_normal((1, 3, 96, 96)).astype(np.float32)
    logits = np.empty((1, engine.num_classes), np.float32)
    engine._run_single(x, logits)
    split = engine._plan(1, 96, 96, split=True)
    assert split.backoff == 1 and split.single is not None     # the first forwards run on one thread
    engine._run_single(x, logits)
    ref = logits.copy()
    split.single = 1e-9             # any split forward is now "slower"
    for i in range(1, fast.SPLIT_SLOW):
        engine._run_single(x, logits)
        assert split.slow == i and split.backoff == 0
    engine._run_single(x, logits)
    assert split.backoff == fast.SPLIT_BACKOFF and split.slow == 0
    for i in range(fast.SPLIT_BACKOFF):
        engine._run_single(x, logits)
        np.testing.assert_array_equal(logits, ref)
    assert split.backoff == 0 and split.single > 1e-6
