"""Exercises: write MobileNetV3's kernels yourself and have them checked against the reference.

For each kernel, and for the bneck block built from them, there is a stub with the reference's
signature and a docstring giving the shapes and the formula (its body raises ``NotImplementedError``),
and a checker::

    conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1)      check_conv2d(fn)
    depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1)       check_depthwise_conv2d(fn)
    batch_norm(x, running_mean, running_var, weight, bias, eps=0.001)  check_batch_norm(fn)
    hard_swish(x)                                                      check_hard_swish(fn)
    squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)      check_squeeze_excite(fn)
    bneck(x, block, params)                                            check_bneck(fn)
    requantize(acc, multiplier, zero_point, relu=False)                check_requantize(fn)

``bneck`` takes a ``config.Block`` record and a dict of its weights by state_dict key, as
``npmnv3.model.bneck`` does. ``requantize`` is the step of the int8 network (``npmnv3.quantized``)
that turns a layer's int32 sums into the next layer's uint8 values; its outputs are integers and
must equal ``npmnv3.qkernels.requantize``'s exactly.

Write a function with the same signature (in a notebook, see ``notebooks/07_exercises.ipynb``, or
in a file of your own) and pass the function itself to the checker::

    >>> import numpy as np
    >>> from npmnv3.exercises import check_hard_swish
    >>> def my_hard_swish(x):
    ...     return x * np.clip(x + 3, 0, 6) / 6
    >>> result = check_hard_swish(my_hard_swish)
    check_hard_swish: all 6 cases passed

A checker calls your function on a fixed list of small random cases (``seed`` picks the random
numbers, never the shapes): odd and unequal heights and widths, batch 1 and 3, float64 then float32,
and whatever the kernel makes tricky -- stride 1 and 2, kernel 1, 3 and 5, dilation 1 and 2, padding
0 up to more than the kernel's half width for the convolutions; running variances smaller than eps
for batch norm; inputs on and right beside the kinks at -3, 0 and 3 for hard-swish; non-zero
biases everywhere; for the bneck, blocks with and without expand conv and SE, ReLU and hard-swish,
with and without residual, and a dilated block. It compares each output with ``npmnv3.kernels``
(``npmnv3.model.bneck`` for the block) evaluated in float64 on the same inputs and stops at the
first failing case, printing (unless ``verbose=False``) and returning a :class:`CheckResult` that
says what failed:

* the case: its parameters, the input shapes and the exact call made (for the bneck, the block's
  steps with the shape each one gives);
* an exception raised by your function, with the line it came from (``NotImplementedError`` is
  reported as "not implemented yet");
* a return value that is not a numpy array (``None``: a missing ``return``);
* an input your function changed in place, an array of bneck's ``params`` included (each call gets
  fresh copies, and the copies are compared with the originals afterwards, so this cannot go
  unnoticed nor fool the comparison);
* a wrong output shape (for the convolutions and the bneck, with the output-size formula worked out);
* a wrong output dtype: kernels keep their input's dtype, so float64 out of a float32 input fails;
* otherwise the largest error, where it is and the expected and computed values there.

For the bneck, a report also gives the ``likely cause`` when the failure is that of a usual mistake:
a residual the block does not have, an activation after the projection, the SE after the
projection, BN eps 1e-5, ReLU for hard-swish, the expand conv of a block that has none, ...

A value passes when ``|got - expected| <= tol * max(1, max|expected|)`` with ``tol`` 1e-10 for
float64 and 1e-4 for float32: the same sum taken in another order passes, a wrong formula does not.
The references are ``npmnv3/kernels.py`` (each kernel as plain loops and vectorised) and
``npmnv3.model.bneck`` (the block from those kernels): the solutions.
"""

from __future__ import annotations

import dataclasses
import os
import re
import traceback

import numpy as np

from . import kernels as K
from . import model as M
from . import qkernels as QK
from .config import Bneck, bneck_block

__all__ = [
    "CheckResult", "TOLERANCE",
    "conv2d", "depthwise_conv2d", "batch_norm", "hard_swish", "squeeze_excite", "bneck",
    "check_conv2d", "check_depthwise_conv2d", "check_batch_norm", "check_hard_swish",
    "check_squeeze_excite", "check_bneck", "requantize", "check_requantize",
]

#: Relative tolerance by dtype: a value passes when |got - expected| <= tol * max(1, max|expected|).
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "uint8": 0}    # integers: exactly


# =========================================================================== stubs for the student

def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1):
    """2-D convolution (cross-correlation, as in PyTorch) through im2col.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
        A batch of N images with C channels.
    weight : ndarray of shape (O, C, kh, kw)
        O filters, each with one kh x kw kernel per input channel (OIHW).
    bias : ndarray of shape (O,), or None
        Added to every position of each output channel.
    stride, padding, dilation : int
        Step between windows, zeros added on *each* side of H and W, spacing between kernel taps.

    Returns
    -------
    y : ndarray of shape (N, O, H_out, W_out), same dtype as ``x``
        With ``xpad`` the zero-padded input::

            y[n, o, oh, ow] = bias[o] + sum_{c, i, j} weight[o, c, i, j]
                                        * xpad[n, c, oh * stride + i * dilation, ow * stride + j * dilation]

            H_out = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1      (W_out alike)

    Notes
    -----
    im2col unfolds each receptive field into a column, ``cols`` of shape (N, C * kh * kw,
    H_out * W_out), row ``(c * kh + i) * kw + j`` holding tap (c, i, j); then
    ``y[n] = weight.reshape(O, C * kh * kw) @ cols[n]``: the whole convolution is one matrix
    product per image. The row order of ``cols`` must match the order of ``weight.reshape``.
    """
    raise NotImplementedError("exercise: write this function -- zero-pad, im2col, then a matrix product")


def depthwise_conv2d(x, weight, stride=1, padding=0, dilation=1):
    """Depthwise convolution: every channel convolved with its own kernel (groups = C), no bias.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    weight : ndarray of shape (C, 1, kh, kw)
        One kh x kw kernel per channel (PyTorch's layout for groups = C).
    stride, padding, dilation : int
        As in :func:`conv2d`.

    Returns
    -------
    y : ndarray of shape (N, C, H_out, W_out), same dtype as ``x``
        ::

            y[n, c, oh, ow] = sum_{i, j} weight[c, 0, i, j]
                                         * xpad[n, c, oh * stride + i * dilation, ow * stride + j * dilation]

        with H_out and W_out as in :func:`conv2d`. Channels never mix.

    Notes
    -----
    Vectorise over (n, c, oh, ow) at once: for each tap (i, j), take the strided window
    ``xpad[:, :, i*dilation : ... : stride, j*dilation : ... : stride]`` of shape (N, C, H_out, W_out),
    multiply by ``weight[:, 0, i, j]`` broadcast as (1, C, 1, 1), and accumulate.
    """
    raise NotImplementedError("exercise: write this function -- one shifted, strided window per tap")


def batch_norm(x, running_mean, running_var, weight, bias, eps=0.001):
    """Batch normalisation in inference form, with the running statistics.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    running_mean, running_var : ndarray of shape (C,)
        Statistics of each channel, measured in training.
    weight, bias : ndarray of shape (C,)
        The learned scale (gamma) and shift (beta) of each channel.
    eps : float
        Added to the variance; MobileNetV3 uses 0.001 (PyTorch's default is 1e-5: not here).

    Returns
    -------
    y : ndarray of shape (N, C, H, W), same dtype as ``x``
        ::

            y[:, c] = (x[:, c] - running_mean[c]) / sqrt(running_var[c] + eps) * weight[c] + bias[c]

    Notes
    -----
    Broadcast the (C,) vectors as (1, C, 1, 1). Do not modify ``x`` (no ``x -= ...``).
    """
    raise NotImplementedError("exercise: write this function -- (x - mean) / sqrt(var + eps) * weight + bias")


def hard_swish(x):
    """Hard-swish, MobileNetV3's activation: a piecewise stand-in for swish(x) = x * sigmoid(x).

    Parameters
    ----------
    x : ndarray of any shape
        (N, C, H, W) inside the network, (N, features) in the classifier.

    Returns
    -------
    y : ndarray of the shape and dtype of ``x``
        ::

            hard_swish(x) = x * relu6(x + 3) / 6,   relu6(t) = min(max(t, 0), 6)

                          = 0                 for x <= -3
                          = x * (x + 3) / 6   for -3 <= x <= 3
                          = x                 for x >= 3
    """
    raise NotImplementedError("exercise: write this function -- x * relu6(x + 3) / 6")


def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """Squeeze-and-excitation (torchvision's form): rescale each channel by a learned gate in [0, 1].

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    fc1_weight : ndarray of shape (S, C, 1, 1)
        The "squeeze" 1x1 convolution, C -> S channels (S = make_divisible(C // 4, 8) in MobileNetV3).
    fc1_bias : ndarray of shape (S,)
    fc2_weight : ndarray of shape (C, S, 1, 1)
        The "excite" 1x1 convolution, S -> C channels.
    fc2_bias : ndarray of shape (C,)

    Returns
    -------
    y : ndarray of shape (N, C, H, W), same dtype as ``x``
        For each image n::

            s = mean over (h, w) of x[n]                            (C,)  squeeze
            z = relu(fc1_weight[:, :, 0, 0] @ s + fc1_bias)         (S,)
            e = hard_sigmoid(fc2_weight[:, :, 0, 0] @ z + fc2_bias) (C,)  excitation, in [0, 1]
            y[n, c] = x[n, c] * e[c]

        with hard_sigmoid(t) = relu6(t + 3) / 6 (not the logistic sigmoid).

    Notes
    -----
    A 1x1 convolution of a 1x1 map is a matrix-vector product; for the whole batch at once,
    ``s`` is (N, C) and ``z = relu(s @ W1.T + b1)`` is (N, S).
    """
    raise NotImplementedError("exercise: write this function -- mean, fc1, relu, fc2, hard-sigmoid, scale")


def bneck(x, block, params):
    """One bneck block (inverted residual), the paper's Figure 4, assembled from the kernels above.

    Parameters
    ----------
    x : ndarray of shape (N, C_in, H, W)
    block : npmnv3.config.Block
        The block's record (frozen), as ``config.bneck_block`` builds it from a table row:

        - ``block.expand``: the 1x1 conv C_in -> E (E: the expanded channels), then BN and the
          activation; **None** when E == C_in: the block has no expand conv, and ``params`` no
          weights for one.
        - ``block.depthwise``: the k x k depthwise conv on the E channels (``groups`` = E), then BN and
          the activation; its ``kernel``, ``stride``, ``dilation`` and
          ``padding`` = (kernel - 1) // 2 * dilation.
        - ``block.se``: squeeze-and-excite on the E channels (S = ``se.squeeze`` in between), or None.
        - ``block.project``: the 1x1 conv E -> C_out, then BN and *no* activation (``activation`` None).
        - ``block.residual``: add ``x`` to the output. torchvision's rule: the row's stride is 1 and
          C_in == C_out (a dilated block has a depthwise stride of 1 but no residual).

        A conv's ``activation`` is "RE" (ReLU) or "HS" (hard-swish); ``conv.eps`` is its BatchNorm's
        eps, 0.001 (not PyTorch's default 1e-5).
    params : dict of str -> ndarray
        The weights by torchvision's state_dict keys (``block.parameters()`` lists each key with its
        shape; ``num_batches_tracked`` is not there, it plays no part at inference). For a conv ``conv``
        (``block.expand``, ``block.depthwise``, ``block.project``):

        - ``params[conv.weight_key]``: (O, C, 1, 1) for a 1x1 conv, (E, 1, k, k) for the depthwise one;
        - ``[params[key] for key in conv.batch_norm_keys()]``: its BN's running_mean, running_var,
          weight, bias, each (O,): the order ``kernels.batch_norm`` takes them in.

        For ``se = block.se``: ``params[f"{se.name}.fc1.weight"]`` (S, E, 1, 1), ``f"{se.name}.fc1.bias"``
        (S,), ``f"{se.name}.fc2.weight"`` (E, S, 1, 1), ``f"{se.name}.fc2.bias"`` (E,).

    Returns
    -------
    y : ndarray of shape (N, C_out, H_out, W_out), same dtype as ``x``
        ::

            h = act(bn(conv1x1(x)))      expand, when block.expand is not None (else h = x)   (N, E, H, W)
            h = act(bn(depthwise(h)))    stride s, padding (k - 1) // 2 * d, dilation d       (N, E, H_out, W_out)
            h = squeeze_excite(h)        when block.se is not None                            (N, E, H_out, W_out)
            y = bn(conv1x1(h))           project: linear, no activation                       (N, C_out, H_out, W_out)
            y = y + x                    when block.residual

        with H_out = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1 (W_out alike).

    Notes
    -----
    Call the kernels of ``npmnv3.kernels`` (or your own): ``conv2d`` (bias=None) for the 1x1 convs,
    ``depthwise_conv2d``, ``batch_norm(..., eps=conv.eps)``, ``relu`` / ``hard_swish``,
    ``squeeze_excite``. Take every layer and key from the record: torchvision numbers only the layers
    a block has (``block.0`` is the depthwise conv when there is no expand conv). Modify neither ``x``
    nor the arrays of ``params``.
    """
    raise NotImplementedError("exercise: write this function -- expand (if block.expand), depthwise, "
                              "SE (if block.se), project, + x (if block.residual)")


# =========================================================================== the result

@dataclasses.dataclass(repr=False)
class CheckResult:
    """What a ``check_<kernel>`` found; truthy when every case passed.

    Attributes
    ----------
    kernel : str
        The kernel checked, e.g. ``"conv2d"``.
    passed : bool
        True when every case passed.
    message : str
        The verdict, as printed: one line on success, the first failing case in detail otherwise.
    case : dict or None
        The first failing case: ``number`` (1-based), ``note``, ``call``, the scalar parameters
        (``stride``, ``padding``, ``dilation``, ``eps``, ... and ``dtype``; for the bneck, the
        block's name and table row and ``residual``) and ``shapes`` (input name -> shape, None for
        an input passed as None, {key: shape} for bneck's ``params``; records such as bneck's
        ``block`` are not listed).
    max_error : float or None
        Largest ``|got - expected|`` in that case, when the output could be compared.
    where : tuple or None
        Index of that largest error in the output; or, when an input was modified in place, the
        index of the largest change in that input.
    n_cases : int
        The number of cases the checker has.
    """

    kernel: str
    passed: bool
    message: str
    case: dict | None = None
    max_error: float | None = None
    where: tuple | None = None
    n_cases: int = 0

    def __bool__(self):
        return bool(self.passed)

    def __str__(self):
        return self.message

    def __repr__(self):
        verdict = "passed" if self.passed else f"failed on case {self.case['number'] if self.case else '?'}"
        extra = "" if self.max_error is None else f", max_error={self.max_error:.3g}, where={self.where}"
        return f"CheckResult({self.kernel!r}: {verdict} of {self.n_cases}{extra})"


def requantize(acc, multiplier, zero_point, relu=False):
    """Requantization: a quantized layer's int32 accumulators to the next tensor's uint8 values.

    Parameters
    ----------
    acc : ndarray of any shape, int64 (int32 values)
        The sums ``bias_q + sum (x_q - x_zp) * w_q`` of a convolution or linear layer.
    multiplier : numpy.float32
        M = (s_w * s_x) / s_y: the accumulator's unit (s_w * s_x) in units of the output scale s_y.
    zero_point : int
        The output's zero point (the integer that stands for 0.0).
    relu : bool
        The layer's ReLU, fused: clamp below at the zero point instead of at 0.

    Returns
    -------
    y : ndarray of the shape of ``acc``, uint8
        ::

            y = clamp(rint(float32(acc) * M) + zero_point, lo, 255),   lo = zero_point if relu else 0

    ``rint`` rounds halves to the even neighbour (np.rint), as PyTorch's kernels do; the product is
    taken in float32 (``acc.astype(np.float32) * multiplier``), as theirs is.
    """
    raise NotImplementedError("exercise: write this function -- clamp(rint(float32(acc) * M) + zero_point, lo, 255)")


# =========================================================================== the checking engine

@dataclasses.dataclass
class _Case:
    note: str            # what the case is about, shown in the verdict
    args: list           # [(name, argument)], passed positionally, each call gets copies (see _map_arrays)
    kwargs: dict         # scalar keyword arguments, passed as given
    params: dict         # parameters shown to the student: kwargs and more (kernel size, dtype)
    expected: np.ndarray  # the reference's output, computed in float64 from the same inputs
    dtype: np.dtype
    details: tuple = ()  # lines describing the case further, shown under the call in every failure
    dtype_reason: str = "the dtype of x"     # why the output has ``dtype``, for a wrong-dtype report
    dtype_hint: str = ("Kernels keep the dtype of their input: create arrays with dtype=x.dtype (np.zeros(shape) "
                       "is float64) or return y.astype(x.dtype).")

    def arg(self, name):
        return dict(self.args)[name]

    def call(self, fn_name):
        parts = ["None" if a is None else name for name, a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{fn_name}({', '.join(parts)})"

    def as_dict(self, number, fn_name):
        shapes = {name: _shapes(a) for name, a in self.args if a is None or isinstance(a, (np.ndarray, dict))}
        return {"number": number, "note": self.note, "call": self.call(fn_name), **self.params,
                "shapes": shapes}


def _fmt(v):
    return f"{float(v) + 0.0:.10g}"                   # + 0.0: -0.0 shows as 0


def _index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat_index), shape))


def _map_arrays(a, f):
    """``f`` applied to the arrays of one argument: an array, or each value of a dict of arrays (bneck's
    ``params``). None and records (bneck's ``block``, a frozen dataclass) are returned as they are."""
    if isinstance(a, np.ndarray):
        return f(a)
    if isinstance(a, dict):
        return {key: f(value) for key, value in a.items()}
    return a


def _float64(a):
    return _map_arrays(a, lambda v: np.asarray(v, np.float64))


def _shapes(a):
    """An argument's shape: None for None, a tuple for an array, {key: tuple} for a dict of arrays."""
    return None if a is None else _map_arrays(a, lambda v: tuple(v.shape))


def _describe(name, a):
    """One input as the verdict's ``inputs:`` line shows it."""
    if a is None or isinstance(a, np.ndarray):
        return f"{name} {_shapes(a)}"
    if isinstance(a, dict):
        return f"{name} (dict of {len(a)} arrays)"
    label = getattr(a, "name", None)
    return f"{name} ({type(a).__name__}{'' if label is None else ' ' + str(label)})"


def _make_case(note, args, kwargs, params, reference, dtype, ref_kwargs=None, details=()):
    """Cast the float64 arrays of ``args`` to ``dtype``, and compute the reference output in float64."""
    dtype = np.dtype(dtype)
    args = [(name, _map_arrays(a, lambda v: np.ascontiguousarray(v, dtype))) for name, a in args]
    expected = reference(*[_float64(a) for _, a in args], **(kwargs if ref_kwargs is None else ref_kwargs))
    return _Case(note, args, dict(kwargs), {**params, "dtype": dtype.name}, expected, dtype, tuple(details))


def _raised_at(exc):
    """Where in the traceback: the deepest frame outside numpy, and the outermost (the student's function)."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]        # [0] is the checker's own call
    numpy_dir = os.path.dirname(np.__file__)
    own = [f for f in frames if not os.path.abspath(f.filename).startswith(numpy_dir)]
    if not own:
        return []

    def show(f):
        code = f"\n      {f.line.strip()}" if f.line else ""
        return f'File "{f.filename}", line {f.lineno}, in {f.name}{code}'
    lines = [f"  raised at {show(own[-1])}"]
    if len(own) > 1:
        lines.append(f"  called from {show(own[0])}")
    return lines


def _failure(kernel, fn_name, case, number, n_cases, problem, *, max_error=None, where=None):
    header = f"check_{kernel}: FAILED on case {number} of {n_cases} ({case.note})"
    params = ", ".join(f"{k}={v}" for k, v in case.params.items())
    inputs = ", ".join(_describe(name, a) for name, a in case.args)
    lines = [header,
             f"  case:    {params}",
             f"  inputs:  {inputs}",
             f"  call:    {case.call(fn_name)}"]
    lines += ["  " + line for line in case.details]
    lines += ["  " + line if line else "" for line in problem]
    return CheckResult(kernel, False, "\n".join(lines), case.as_dict(number, fn_name),
                       max_error, where, n_cases)


def _input_change(name, original, passed):
    """How the student's call changed input ``name``: ``(label, detail, where)``, or None if it is intact.

    ``passed`` is the copy the student received; for a dict of arrays each entry is compared, and the
    label names the entry (``params["features.1.block.0.0.weight"]``)."""
    if isinstance(original, dict):
        if passed.keys() != original.keys():
            removed = [repr(k) for k in original if k not in passed]
            added = [repr(k) for k in passed if k not in original]
            detail = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in (("keys removed", removed),
                                                                               ("keys added", added)) if keys)
            return name, detail, None
        for key, value in original.items():
            change = _input_change(f'{name}["{key}"]', value, passed[key])
            if change is not None:
                return change
        return None
    if not isinstance(original, np.ndarray):
        return None                                   # None, or a frozen record
    if isinstance(passed, np.ndarray) and passed.shape == original.shape and np.array_equal(passed, original):
        return None
    if not isinstance(passed, np.ndarray):
        return name, f"it was replaced by a {type(passed).__module__}.{type(passed).__qualname__}", None
    if passed.shape != original.shape:
        return name, f"its shape changed from {original.shape} to {passed.shape}", None
    change = np.abs(passed.astype(np.float64) - original)
    change[~np.isfinite(change)] = np.inf
    where = _index(np.argmax(change), change.shape)
    return name, (f"largest change {_fmt(change[where])} at {name}{list(where)}: "
                  f"was {_fmt(original[where])}, now {_fmt(passed[where])}"), where


def _run_case(kernel, student_fn, fn_name, case, number, n_cases, shape_hint, explain, explain_error):
    """Run one case; a failing CheckResult, or None when the case passes."""
    passed_args = [_map_arrays(a, np.copy) for _, a in case.args]
    try:
        got = student_fn(*passed_args, **case.kwargs)
    except NotImplementedError as exc:
        text = f": {exc}" if str(exc) else ""
        message = (f"check_{kernel}: not implemented yet\n"
                   f"  {fn_name} raised NotImplementedError{text}\n"
                   f"  Write the body of {fn_name}, then run check_{kernel}({fn_name}) again.")
        return CheckResult(kernel, False, message, case.as_dict(number, fn_name), None, None, n_cases)
    except Exception as exc:       # the student's bug, reported with the case that triggered it
        problem = [f"problem: {fn_name} raised {type(exc).__name__}: {exc}"]
        problem += _raised_at(exc)
        if explain_error is not None:
            problem += explain_error(case, exc)
        return _failure(kernel, fn_name, case, number, n_cases, problem)

    if got is None:
        return _failure(kernel, fn_name, case, number, n_cases, [
            f"problem: {fn_name} returned None instead of an array (a missing `return`?)"])
    if not isinstance(got, np.ndarray):
        return _failure(kernel, fn_name, case, number, n_cases, [
            f"problem: {fn_name} returned a {type(got).__module__}.{type(got).__qualname__}, "
            f"not a numpy array (np.ndarray)"])

    for (name, original), passed in zip(case.args, passed_args):
        change = _input_change(name, original, passed)
        if change is None:
            continue
        label, detail, where = change
        return _failure(kernel, fn_name, case, number, n_cases, [
            f"problem: {fn_name} modified its input `{label}` in place ({detail}).",
            "A kernel must leave its inputs unchanged: write `x = x - m` or `y = x * s`, not `x -= m` "
            "or `x *= s`, or work on a copy.",
        ], where=where)

    expected = case.expected
    if got.shape != expected.shape:
        problem = [f"output shape: expected {expected.shape}, got {got.shape} -- the shapes differ"]
        problem += [f"hint: {line}" for line in shape_hint(case)]
        return _failure(kernel, fn_name, case, number, n_cases, problem)

    if got.dtype != case.dtype:
        return _failure(kernel, fn_name, case, number, n_cases, [
            f"output shape: {got.shape}, as expected",
            f"output dtype: expected {case.dtype.name} ({case.dtype_reason}), got {got.dtype.name} -- wrong dtype",
            case.dtype_hint,
        ])

    error = np.abs(got.astype(np.float64) - expected)
    error[~np.isfinite(error)] = np.inf
    tol = TOLERANCE[case.dtype.name]
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    max_error = float(error.max()) if error.size else 0.0
    if max_error <= tol * scale:
        return None
    where = _index(np.argmax(error), error.shape)
    n_bad = int((error > tol * scale).sum())
    problem = [
        f"output shape: {got.shape}, as expected",
        f"max abs error {max_error:.3e} > tolerance {tol * scale:.1e} ({tol:.0e} x max(1, max|expected|)); "
        f"{n_bad} of {error.size} output values are off",
        f"at index {where}: expected {_fmt(expected[where])}, got {_fmt(got[where])}",
    ]
    if explain is not None:
        problem += explain(case, where, got)
    return _failure(kernel, fn_name, case, number, n_cases, problem, max_error=max_error, where=where)


def _same_shape_hint(case):
    return [f"the output has the shape of x, {case.arg('x').shape}"]


def _check(kernel, student_fn, cases, verbose, shape_hint=_same_shape_hint, explain=None, explain_error=None):
    """Run ``cases`` in order and stop at the first failure. The hooks add lines to a failure's report:
    ``shape_hint(case)`` to a wrong shape, ``explain(case, where, got)`` to wrong values,
    ``explain_error(case, exc)`` to an exception raised by the student's function."""
    n_cases = len(cases)
    if not callable(student_fn):
        result = CheckResult(kernel, False, (
            f"check_{kernel}: FAILED -- expected a function, got a {type(student_fn).__name__}. "
            f"Pass the function itself: check_{kernel}(my_{kernel}), not check_{kernel}(my_{kernel}(...))."),
            n_cases=n_cases)
    else:
        fn_name = getattr(student_fn, "__name__", None) or kernel
        result = None
        for number, case in enumerate(cases, 1):
            result = _run_case(kernel, student_fn, fn_name, case, number, n_cases, shape_hint, explain,
                               explain_error)
            if result is not None:
                break
        if result is None:
            result = CheckResult(kernel, True, f"check_{kernel}: all {n_cases} cases passed", n_cases=n_cases)
    if verbose:
        print(result.message)
    return result


# =========================================================================== convolutions

def _conv_shape_hint(case):
    x, w = case.arg("x"), case.arg("weight")
    s, p, d = case.kwargs["stride"], case.kwargs["padding"], case.kwargs["dilation"]
    lines = []
    for axis, size, k in (("H", x.shape[2], w.shape[2]), ("W", x.shape[3], w.shape[3])):
        lines.append(f"{axis}_out = ({axis} + 2*padding - dilation*(k{axis[0].lower()} - 1) - 1) // stride + 1"
                     f" = ({size} + 2*{p} - {d}*({k} - 1) - 1) // {s} + 1"
                     f" = {K.conv_output_size(size, k, s, p, d)}")
    return lines


# N, C, H, W, O, (kh, kw), stride, padding, dilation, bias, note
_CONV_CASES = [
    (1, 1, 5, 5, 1, (3, 3), 1, 0, 1, True, "the smallest: one channel, no padding"),
    (1, 3, 7, 6, 4, (3, 3), 1, 1, 1, True, "padding 1 keeps the size; H != W"),
    (3, 2, 6, 7, 3, (3, 3), 1, 2, 1, True, "padding wider than the kernel's half: output larger than input"),
    (1, 2, 8, 7, 3, (3, 3), 2, 1, 1, True, "stride 2 on an even height: padding on both sides"),
    (3, 2, 9, 6, 2, (5, 5), 1, 2, 1, True, "5x5 kernel, batch 3"),
    (1, 2, 11, 8, 3, (5, 5), 2, 2, 1, True, "5x5 kernel, stride 2"),
    (1, 2, 7, 9, 3, (3, 3), 1, 2, 2, True, "dilation 2"),
    (3, 2, 11, 10, 2, (5, 5), 2, 4, 2, True, "5x5, stride 2, dilation 2, batch 3"),
    (1, 4, 5, 6, 3, (1, 1), 1, 0, 1, True, "1x1 (pointwise) convolution"),
    (1, 3, 7, 5, 2, (1, 1), 2, 0, 1, True, "1x1 convolution with stride 2"),
    (3, 2, 6, 7, 3, (3, 5), 1, 1, 1, True, "non-square 3x5 kernel"),
    (3, 3, 6, 5, 4, (3, 3), 2, 1, 1, False, "no bias (bias=None), as in MobileNetV3"),
]
_CONV_FLOAT32 = (1, 3, 7, 11)          # the cases repeated in float32


def _conv2d_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype, rows in ((np.float64, _CONV_CASES), (np.float32, [_CONV_CASES[i] for i in _CONV_FLOAT32])):
        for n, c, h, w, o, (kh, kw), stride, padding, dilation, has_bias, note in rows:
            x = rng.standard_normal((n, c, h, w))
            weight = rng.standard_normal((o, c, kh, kw))
            bias = rng.standard_normal(o) if has_bias else None
            kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
            cases.append(_make_case(note, [("x", x), ("weight", weight), ("bias", bias)], kwargs,
                                    {**kwargs, "kernel": f"{kh}x{kw}"}, K.conv2d, dtype))
    return cases


def check_conv2d(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`conv2d` against ``npmnv3.kernels.conv2d``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x, weight, bias, stride=, padding=, dilation=) -> y``, as :func:`conv2d`.
    seed : int
        Seed of the random inputs (the shapes and parameters of the 16 cases do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    Cases: kernel 1x1, 3x3, 5x5 and 3x5; stride 1 and 2; dilation 1 and 2; padding 0, 1, 2 and 4;
    odd, even and unequal H and W; batch 1 and 3; bias and bias=None; float64, then four in float32.
    """
    return _check("conv2d", student_fn, _conv2d_cases(seed), verbose, _conv_shape_hint)


# N, C, H, W, (kh, kw), stride, padding, dilation, note
_DW_CASES = [
    (1, 1, 5, 5, (3, 3), 1, 0, 1, "the smallest: one channel, no padding"),
    (1, 3, 7, 6, (3, 3), 1, 1, 1, "padding 1 keeps the size; H != W"),
    (3, 2, 6, 7, (3, 3), 1, 2, 1, "padding wider than the kernel's half: output larger than input"),
    (1, 4, 8, 7, (3, 3), 2, 1, 1, "stride 2 on an even height: padding on both sides"),
    (3, 3, 9, 6, (5, 5), 1, 2, 1, "5x5 kernel, batch 3"),
    (1, 2, 11, 8, (5, 5), 2, 2, 1, "5x5 kernel, stride 2"),
    (1, 3, 7, 9, (3, 3), 1, 2, 2, "dilation 2"),
    (3, 2, 11, 10, (5, 5), 2, 4, 2, "5x5, stride 2, dilation 2, batch 3"),
    (3, 3, 6, 7, (3, 5), 1, 1, 1, "non-square 3x5 kernel"),
]
_DW_FLOAT32 = (1, 3, 7)


def _depthwise_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype, rows in ((np.float64, _DW_CASES), (np.float32, [_DW_CASES[i] for i in _DW_FLOAT32])):
        for n, c, h, w, (kh, kw), stride, padding, dilation, note in rows:
            x = rng.standard_normal((n, c, h, w))
            weight = rng.standard_normal((c, 1, kh, kw))
            kwargs = {"stride": stride, "padding": padding, "dilation": dilation}
            cases.append(_make_case(note, [("x", x), ("weight", weight)], kwargs,
                                    {**kwargs, "kernel": f"{kh}x{kw}"}, K.depthwise_conv2d, dtype))
    return cases


def check_depthwise_conv2d(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`depthwise_conv2d` against ``npmnv3.kernels.depthwise_conv2d``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x, weight, stride=, padding=, dilation=) -> y``, as :func:`depthwise_conv2d`.
    seed : int
        Seed of the random inputs (the shapes and parameters of the 12 cases do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    Cases as for :func:`check_conv2d` (without 1x1 kernels and bias): kernel 3x3, 5x5 and 3x5;
    stride 1 and 2; dilation 1 and 2; padding 0 to 4; batch 1 and 3; float64, then three in float32.
    """
    return _check("depthwise_conv2d", student_fn, _depthwise_cases(seed), verbose, _conv_shape_hint)


# =========================================================================== batch norm

_DEFAULT_EPS = 0.001

# N, C, H, W, eps (None: not passed, the default must be 0.001), note
_BN_CASES = [
    (1, 3, 4, 5, None, "eps not passed: the default must be 0.001"),
    (3, 4, 3, 5, None, "batch 3, eps not passed"),
    (2, 5, 1, 1, 0.001, "1x1 maps, eps=0.001 passed"),
    (1, 3, 5, 3, 0.01, "eps=0.01 passed: the argument must be used"),
]
_BN_FLOAT32 = ((3, 4, 5, 3, None, "batch 3, eps not passed"), (1, 3, 2, 7, 0.01, "eps=0.01 passed"))


def _batch_norm_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype, rows in ((np.float64, _BN_CASES), (np.float32, _BN_FLOAT32)):
        for n, c, h, w, eps, note in rows:
            mean = rng.normal(0.0, 2.0, c)
            # variances from 1e-4 (well below eps: eps matters) up to ~5 (sqrt(var) != var)
            var = 10.0 ** rng.uniform(-4.0, 0.7, c)
            var[rng.integers(c)] = 1e-4
            weight = rng.uniform(0.5, 1.5, c) * rng.choice((-1.0, 1.0), c)
            bias = rng.normal(0.0, 1.0, c)
            x = mean[:, None, None] + np.sqrt(var + 0.1)[:, None, None] * rng.standard_normal((n, c, h, w))
            kwargs = {} if eps is None else {"eps": eps}
            params = {"eps": "not passed (default 0.001)" if eps is None else eps}
            args = [("x", x), ("running_mean", mean), ("running_var", var), ("weight", weight), ("bias", bias)]
            cases.append(_make_case(note, args, kwargs, params, K.batch_norm, dtype,
                                    ref_kwargs={"eps": _DEFAULT_EPS if eps is None else eps}))
    return cases


def _explain_batch_norm(case, where, got):
    c = where[1]
    stats = ", ".join(f"{name}[{c}]={_fmt(case.arg(name)[c])}"
                      for name in ("running_mean", "running_var", "weight", "bias"))
    return [f"channel {c}: {stats}; x{list(where)}={_fmt(case.arg('x')[where])}"]


def check_batch_norm(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`batch_norm` against ``npmnv3.kernels.batch_norm``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x, running_mean, running_var, weight, bias[, eps=]) -> y``, as :func:`batch_norm`.
    seed : int
        Seed of the random inputs and statistics (the shapes of the 6 cases do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    Running variances range from 1e-4 to about 5, each case having one at 1e-4, so that eps
    (0.001 vs 1e-5) and sqrt(var) vs var both change the result; means are non-zero, weights of
    both signs, biases non-zero. Some cases do not pass ``eps`` (the default must be 0.001), some
    pass it (it must be used).
    """
    return _check("batch_norm", student_fn, _batch_norm_cases(seed), verbose, explain=_explain_batch_norm)


# =========================================================================== hard-swish

# on and beside the kinks at -3 and 3, around 0 and the minimum at -1.5, far out on both sides
_HS_SPECIAL = np.array([-3.0, 3.0, 0.0, -3.0 - 1e-6, -3.0 + 1e-6, 3.0 - 1e-6, 3.0 + 1e-6,
                        -3.01, -2.99, 2.99, 3.01, -1.5, -1e-9, 1e-9, -1e-3, 1e-3, -6.0, 6.0,
                        -100.0, 100.0])


def _hard_swish_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    rows = [((1, 3, 5, 4), "the kinks -3 and 3 and values right beside them, 0, +-6, +-100"),
            ((3, 2, 7, 5), "uniform in [-8, 8], batch 3"),
            ((3, 17), "a 2-D input (N, features), as in the classifier")]
    for dtype in (np.float64, np.float32):
        for shape, note in rows:
            x = rng.uniform(-8.0, 8.0, shape)
            if "kinks" in note:
                flat = x.reshape(-1)
                flat[:len(_HS_SPECIAL)] = _HS_SPECIAL
                rng.shuffle(flat)
            cases.append(_make_case(note, [("x", x)], {}, {}, K.hard_swish, dtype))
    return cases


def _explain_hard_swish(case, where, got):
    return [f"there x = {_fmt(case.arg('x')[where])}"]


def check_hard_swish(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`hard_swish` against ``npmnv3.kernels.hard_swish``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x) -> y``, as :func:`hard_swish`.
    seed : int
        Seed of the random inputs (the 6 cases' shapes and special values do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    Inputs include -3, 0 and 3 exactly, values 1e-6 and 0.01 either side of the kinks, the minimum
    at -1.5, and +-6 and +-100 (where a missing cap at 6 shows); shapes NCHW and (N, features).
    """
    return _check("hard_swish", student_fn, _hard_swish_cases(seed), verbose, explain=_explain_hard_swish)


# =========================================================================== squeeze-and-excite

# N, C, H, W, S, note
_SE_CASES = [
    (1, 5, 4, 3, 3, "one image, S < C"),
    (3, 6, 5, 5, 8, "batch 3: each image its own gate; S > C"),
    (3, 8, 1, 1, 4, "1x1 maps"),
    (1, 4, 7, 6, 2, "H != W"),
]
_SE_FLOAT32 = ((3, 6, 5, 4, 3, "batch 3"), (1, 5, 3, 3, 8, "S > C"))


def _se_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype, rows in ((np.float64, _SE_CASES), (np.float32, _SE_FLOAT32)):
        for n, c, h, w, s, note in rows:
            # channel means of a few units, so that fc1 gives both signs (relu matters) and fc2
            # reaches past +-3 (hard_sigmoid saturates) as well as the linear part in between
            x = rng.normal(0.0, 2.0, (n, c, 1, 1)) + rng.standard_normal((n, c, h, w))
            fc1_weight = rng.normal(0.0, 1.0, (s, c, 1, 1))
            fc1_bias = rng.normal(0.0, 1.0, s)
            fc2_weight = rng.normal(0.0, 1.0, (c, s, 1, 1))
            fc2_bias = rng.normal(0.0, 1.5, c)
            args = [("x", x), ("fc1_weight", fc1_weight), ("fc1_bias", fc1_bias),
                    ("fc2_weight", fc2_weight), ("fc2_bias", fc2_bias)]
            cases.append(_make_case(note, args, {}, {"squeeze_channels": s}, K.squeeze_excite, dtype))
    return cases


def _explain_se(case, where, got):
    args = [_float64(a) for _, a in case.args]
    x = args[0]
    s = K.global_avg_pool(x)
    z = K.relu(K.linear(s, args[1][:, :, 0, 0], args[2]))
    e = K.hard_sigmoid(K.linear(z, args[3][:, :, 0, 0], args[4]))
    n, c = where[:2]
    yours = f", your output / x = {_fmt(got[where] / x[where])}" if x[where] != 0 else ""
    return [f"image {n}, channel {c}: x{list(where)} = {_fmt(x[where])}, channel mean s[{n}, {c}] = "
            f"{_fmt(s[n, c])}, expected gate e[{n}, {c}] = {_fmt(e[n, c])}{yours}"]


def check_squeeze_excite(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`squeeze_excite` against ``npmnv3.kernels.squeeze_excite``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> y``, as :func:`squeeze_excite`.
    seed : int
        Seed of the random inputs and weights (the shapes of the 6 cases do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    S differs from C (both smaller and larger), biases are non-zero, and the inputs make some fc1
    outputs negative (the ReLU matters) and some fc2 outputs fall beyond -3 and 3 (the
    hard-sigmoid saturates) while others do not (hard vs logistic sigmoid differ there).
    """
    return _check("squeeze_excite", student_fn, _se_cases(seed), verbose, explain=_explain_se)


# =========================================================================== the bneck block

_ACTIVATION_NAMES = {"RE": "ReLU", "HS": "hard-swish"}
_SE_PARTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")

# in, k, exp, out, SE, NL, s, dilation (a config.Bneck row), N, H, W, note
_BNECK_CASES = [
    (4, 3, 4, 4, False, "RE", 1, 1, 1, 7, 5,
     "no expand conv (expanded == in_channels), residual: like features.1 of the large model"),
    (8, 3, 8, 8, True, "RE", 2, 1, 3, 7, 6,
     "no expand conv, SE, stride 2: no residual though the channels match (features.1 of the small model)"),
    (4, 3, 12, 6, False, "RE", 2, 1, 3, 9, 6, "expand conv, stride 2 on an even width, channels change"),
    (6, 5, 12, 6, True, "RE", 1, 1, 1, 7, 9, "5x5 depthwise, SE, residual"),
    (6, 3, 16, 8, True, "HS", 1, 1, 3, 5, 7, "hard-swish; stride 1 but in_channels != out_channels: no residual"),
    (8, 5, 20, 10, True, "HS", 2, 1, 1, 11, 8, "hard-swish, 5x5, SE, stride 2"),
    (6, 5, 18, 6, True, "HS", 2, 2, 1, 9, 7,
     "dilation 2 (the dilated tail): depthwise stride 1, and no residual though the shapes match"),
    (8, 3, 20, 8, False, "HS", 1, 1, 3, 6, 5, "hard-swish, residual, batch 3"),
]
_BNECK_FLOAT32 = (0, 3, 5, 6)


def _bn_parameters(z, rng, eps, gain=(0.8, 2.5), shift=1.0):
    """A BatchNorm's (running_mean, running_var, weight, bias) for the conv output ``z`` (float64).

    The running variances range from 1e-4 (below eps: eps matters) to ~5, one of them 1e-4 and one 3; the
    running means sit off the channels' actual means; the weights (of both signs) are scaled to the
    channels' actual spread, so that the normalised values have a spread drawn from ``gain`` whatever
    the variances (the default: over a few units on both sides of 0, past -3 and 3, so that every part
    of the activation matters); the biases are N(0, ``shift``).
    """
    c = z.shape[1]
    spread = np.maximum(z.std(axis=(0, 2, 3)), 1e-3)
    var = 10.0 ** rng.uniform(-4.0, 0.7, c)
    low, high = rng.choice(c, 2, replace=False)
    var[low], var[high] = 1e-4, 3.0
    mean = z.mean(axis=(0, 2, 3)) + spread * rng.normal(0.0, 0.5, c)
    sign = rng.permutation(np.resize((1.0, -1.0), c))                  # both signs, in every BN
    weight = sign * rng.uniform(*gain, c) * np.sqrt(var + eps) / spread
    bias = rng.normal(0.0, shift, c)
    return mean, var, weight, bias


def _bneck_parameters(block, x, rng):
    """Random float64 parameters for ``block`` whose every part shows in its output on ``x``.

    Drawn layer by layer on the block's actual intermediate values: BatchNorm statistics as in
    ``_bn_parameters`` (the projection's output of the size of x); for the SE, fc1 outputs of both
    signs (the ReLU matters: one channel positive and one negative for every image) and fc2 outputs
    mostly between -3 and 3, with one channel's gate saturated at 1 and one at 0 for every image.
    Returned in ``block.parameters()`` order, without the ``num_batches_tracked`` counters.
    """
    params = {}

    def conv_bn_act(h, conv, gain=(0.8, 2.5), shift=1.0):
        params[conv.weight_key] = rng.standard_normal(conv.parameters()[0][1])
        z = M.conv_bn_act(h, dataclasses.replace(conv, norm=False, activation=None), params)   # the conv alone
        statistics = _bn_parameters(z, rng, conv.eps, gain, shift)
        params.update(zip(conv.batch_norm_keys(), statistics))
        y = K.batch_norm(z, *statistics, eps=conv.eps)
        return M.ACTIVATIONS[conv.activation](y) if conv.activation else y

    h = x if block.expand is None else conv_bn_act(x, block.expand)
    h = conv_bn_act(h, block.depthwise)
    se = block.se
    if se is not None:
        s = K.global_avg_pool(h)                                        # (N, E)
        fc1 = rng.standard_normal((se.squeeze, se.channels))
        fc1 /= max(float((s @ fc1.T).std()), 1e-3)
        pre = s @ fc1.T                                                 # (N, S)
        fc1_bias = rng.normal(0.0, 0.5, se.squeeze) - pre.mean(axis=0)
        positive, negative = rng.choice(se.squeeze, 2, replace=False)
        fc1_bias[positive] = 0.5 - pre[:, positive].min()               # through the ReLU for every image
        fc1_bias[negative] = -0.5 - pre[:, negative].max()              # cut by the ReLU for every image
        z = K.relu(pre + fc1_bias)
        fc2 = rng.standard_normal((se.channels, se.squeeze))
        fc2 *= 1.5 / max(float((z @ fc2.T).std()), 1e-3)
        fc2_bias = rng.normal(0.0, 1.0, se.channels)
        pre = z @ fc2.T                                                 # (N, E): the gate is relu6(pre + bias + 3) / 6
        high, low = rng.choice(se.channels, 2, replace=False)
        fc2_bias[high] = 3.5 - pre[:, high].min()                       # gate 1 for every image
        fc2_bias[low] = -3.5 - pre[:, low].max()                        # gate 0 for every image
        for part, value in zip(_SE_PARTS, (fc1[:, :, None, None], fc1_bias, fc2[:, :, None, None], fc2_bias)):
            params[f"{se.name}.{part}"] = value
        h = M.squeeze_excite(h, se, params)
    conv_bn_act(h, block.project, gain=(0.5, 1.5), shift=0.5)      # of the size of x: the residual counts
    return {key: params[key] for key, _, kind in block.parameters() if kind != "counter"}


def _no_residual_reason(block):
    """Why ``block`` (with ``block.residual`` false) does not add its input back."""
    if block.in_channels != block.out_channels:
        return f"in_channels {block.in_channels} != out_channels {block.out_channels}"
    if block.depthwise.stride != 1:
        return f"stride {block.depthwise.stride}, the output is smaller than x"
    return ("a dilated block, whose depthwise conv has stride 1 so that the shapes match; but its table row "
            "has stride 2, and torchvision adds x only when the row's stride is 1")


def _bneck_steps(block, x_shape):
    """The ``block:`` lines of a bneck case's report: each step with the shape it gives."""
    n, c, h, w = x_shape
    dw, se, e, c_out = block.depthwise, block.se, block.depthwise.in_channels, block.project.out_channels
    ho, wo = dw.output_size(h, w)
    act = _ACTIVATION_NAMES[dw.activation]
    rows = [("x", (n, c, h, w), f"the input ({block.name})")]
    if block.expand is None:
        rows.append(("expand", None, f"none: expanded == in_channels == {c} (block.expand is None, "
                                     f"and params has no weights for it)"))
    else:
        rows.append(("expand", (n, e, h, w), f"1x1 conv {c} -> {e}, BN, {act}"))
    rows.append(("depthwise", (n, e, ho, wo), f"{dw.kernel}x{dw.kernel} on each of the {e} channels, stride "
                 f"{dw.stride}, padding {dw.padding}, dilation {dw.dilation}, BN, {act}"))
    if se is None:
        rows.append(("SE", None, "none (block.se is None)"))
    else:
        rows.append(("SE", (n, e, ho, wo), f"squeeze-and-excite on the {e} channels (squeeze {se.squeeze})"))
    rows.append(("project", (n, c_out, ho, wo), f"1x1 conv {e} -> {c_out}, BN, no activation"))
    if block.residual:
        rows.append(("residual", (n, c_out, ho, wo), "+ x (block.residual is True: stride 1 and "
                                                      f"in_channels == out_channels == {c})"))
    else:
        rows.append(("residual", None, f"none: block.residual is False ({_no_residual_reason(block)})"))
    return [f"{'block:' if i == 0 else '':<8} {step:<10} {'-' if shape is None else str(shape):<16} {what}"
            for i, (step, shape, what) in enumerate(rows)]


def _bneck_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for dtype, numbers in ((np.float64, range(len(_BNECK_CASES))), (np.float32, _BNECK_FLOAT32)):
        for i in numbers:
            *fields, n, h, w, note = _BNECK_CASES[i]
            row = Bneck(*fields)
            block = bneck_block(row, f"features.{i + 1}")       # the float32 repeats keep their row's name
            x = rng.standard_normal((n, row.in_channels, h, w))
            params = _bneck_parameters(block, x, rng)
            shown = {"block": block.name, **dataclasses.asdict(row), "residual": block.residual}
            cases.append(_make_case(note, [("x", x), ("block", block), ("params", params)], {}, shown,
                                    M.bneck, dtype, details=_bneck_steps(block, x.shape)))
    return cases


def _padding_formula(conv):
    return f"(k - 1) // 2 * dilation = ({conv.kernel} - 1) // 2 * {conv.dilation} = {conv.padding}"


def _bneck_shape_hint(case):
    block, (_, _, h, w) = case.arg("block"), case.arg("x").shape
    dw = block.depthwise
    k, s, p, d = dw.kernel, dw.stride, dw.padding, dw.dilation
    lines = [f"the output is (N, block.project.out_channels, H_out, W_out), H_out and W_out those of the "
             f"depthwise conv, whose padding is {_padding_formula(dw)}:"]
    for axis, size in (("H", h), ("W", w)):
        lines.append(f"{axis}_out = ({axis} + 2*padding - dilation*(k - 1) - 1) // stride + 1"
                     f" = ({size} + 2*{p} - {d}*({k} - 1) - 1) // {s} + 1 = {K.conv_output_size(size, k, s, p, d)}")
    return lines


def _bneck_variant(x, block, params, *, eps=None, activation=None, project_activation=None, se="depthwise",
                   residual=None):
    """``model.bneck`` in float64 with one part changed, to recognise a mistake: ``eps`` for every BN,
    ``activation`` for the expand and depthwise convs, an activation after the projection, the SE
    ``"depthwise"`` (after the depthwise conv, right), ``"project"`` (after the projection) or None
    (left out), and ``residual`` instead of ``block.residual``."""
    def changed(conv, act):
        return None if conv is None else dataclasses.replace(conv, activation=act, eps=conv.eps if eps is None else eps)

    act = activation or block.depthwise.activation
    variant = dataclasses.replace(
        block, expand=changed(block.expand, act), depthwise=changed(block.depthwise, act),
        se=block.se if se == "depthwise" else None, project=changed(block.project, project_activation),
        residual=block.residual if residual is None else residual)
    if se != "project" or block.se is None:
        return M.bneck(x, variant, params)
    y = M.squeeze_excite(M.bneck(x, dataclasses.replace(variant, residual=False), params), block.se, params)
    return y + x if variant.residual else y


def _bneck_mistakes(block):
    """``[(changes for _bneck_variant, explanation)]``: the usual mistakes that could be made on ``block``."""
    act = block.depthwise.activation
    other = "RE" if act == "HS" else "HS"
    fields = "block.depthwise.activation"
    if block.expand is not None:
        fields = "block.expand.activation and " + fields
    e = block.depthwise.in_channels
    mistakes = []
    if block.residual:
        mistakes.append(({"residual": False}, "this block without its residual: block.residual is True "
                         "(stride 1 and in_channels == out_channels), so x is added to the projection's output"))
    else:
        mistakes.append(({"residual": True}, f"this block with x added back, but it has no residual connection "
                         f"(block.residual is False: {_no_residual_reason(block)}); add x only when block.residual "
                         f"is true"))
    mistakes.append(({"project_activation": act}, f"this block with a {_ACTIVATION_NAMES[act]} after the "
                     f"projection: the projection is linear (block.project.activation is None), BN and no activation"))
    if block.se is not None:
        mistakes.append(({"se": "project"}, f"this block with squeeze-and-excite after the projection: it goes "
                         f"between the depthwise conv and the projection, on the {e} expanded channels"))
        mistakes.append(({"se": None}, f"this block without its squeeze-and-excite: block.se is not None, apply it "
                         f"to the depthwise conv's output"))
    mistakes.append(({"eps": 1e-5}, f"this block with BatchNorm eps=1e-5 (PyTorch's default): MobileNetV3's "
                     f"BatchNorms use eps=0.001, pass eps=conv.eps to batch_norm"))
    mistakes.append(({"activation": other}, f"this block with {_ACTIVATION_NAMES[other]} in place of "
                     f"{_ACTIVATION_NAMES[act]}: its activation is {act!r} ({_ACTIVATION_NAMES[act]}), see {fields}"))
    return mistakes


def _explain_bneck(case, where, got):
    """The ``likely cause:`` line of wrong values: the first usual mistake whose output is the student's."""
    block, x, params = case.arg("block"), _float64(case.arg("x")), _float64(case.arg("params"))
    tol = TOLERANCE[case.dtype.name]
    for changes, explanation in _bneck_mistakes(block):
        try:
            variant = _bneck_variant(x, block, params, **changes)
        except ValueError:                   # e.g. x added to an output of another shape: not this mistake
            continue
        if variant.shape == got.shape and np.all(np.abs(got.astype(np.float64) - variant)
                                                 <= tol * max(1.0, float(np.abs(variant).max()))):
            return [f"likely cause: your output is that of {explanation}."]
    return ["check each step against the block's steps above (none of the usual mistakes gives your output)"]


def _explain_bneck_error(case, exc):
    """``likely cause:`` lines for an exception: a layer the block does not have, a key ``params`` does not
    hold, or x added to an output of another shape."""
    block, x, text = case.arg("block"), case.arg("x"), str(exc)
    absent = {}
    if block.expand is None:
        absent["expand"] = (f"this block has no expand conv: expanded == in_channels == {block.in_channels}, so "
                            f"block.expand is None and params holds no weights for one; skip the expand step "
                            f"when block.expand is None")
    if block.se is None:
        absent["se"] = ("this block has no squeeze-and-excite: block.se is None and params holds no SE weights; "
                        "skip the SE when block.se is None")
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if isinstance(key, str) and key not in case.arg("params"):
        layers = "; ".join(f"{step} {layer.name}" for step, layer in
                           (("expand", block.expand), ("depthwise", block.depthwise), ("SE", block.se),
                            ("project", block.project)) if layer is not None)
        return ([f"likely cause: params has no key {key!r}. This block's layers: {layers}. torchvision "
                 f"numbers only the layers a block has: take the keys from the records (conv.weight_key, "
                 f"conv.batch_norm_keys(), f\"{{se.name}}.fc1.weight\", ...)"]
                + [f"likely cause: {line}" for line in absent.values()])
    if isinstance(exc, AttributeError) and "'NoneType'" in text and absent:
        # the absent layer that the failing lines name (block.expand.weight_key, se.name ...), else each one
        code = " ".join(frame.line or "" for frame in traceback.extract_tb(exc.__traceback__))
        named = [line for layer, line in absent.items() if re.search(rf"\b{layer}\b", code)]
        return [f"likely cause: {line}" for line in named or absent.values()]
    if isinstance(exc, ValueError) and "broadcast" in text and "(" + ",".join(map(str, x.shape)) + ")" in text:
        if not block.residual:
            return [f"likely cause: x {x.shape} cannot be added to the output {case.expected.shape}: this block has "
                    f"no residual connection (block.residual is False: {_no_residual_reason(block)}); add x only "
                    f"when block.residual is true"]
        return [f"likely cause: block.residual is True, so before x is added the output must have the shape of x, "
                f"{x.shape}; compare your shapes with the steps above: the depthwise conv's padding is "
                f"{_padding_formula(block.depthwise)}"]
    return []


def check_bneck(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`bneck` against ``npmnv3.model.bneck``.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(x, block, params) -> y``, as :func:`bneck`.
    seed : int
        Seed of the random inputs and weights (the blocks and shapes of the 12 cases do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case, with the block's steps
        and their shapes, and the likely cause when the failure is that of a usual mistake.

    Notes
    -----
    Blocks built by ``config.bneck_block`` from rows with and without expand conv (expanded ==
    in_channels) and SE; ReLU and hard-swish; kernel 3 and 5; stride 1 with residual, stride 2, stride 1
    with in_channels != out_channels; a dilated row (dilation 2, depthwise stride 1, no residual although
    the shapes match); batch 1 and 3; float64, then four in float32. ``params`` is a dict of fresh copies
    at every call (``block`` is frozen); a change to ``x`` or to any array of ``params`` is reported.
    Every BatchNorm has a running variance below eps, off-centre running means and weights of both
    signs; every SE has gates saturated at 0 and at 1 and others in between. The mistakes recognised
    (``likely cause:``): a residual the block does not have (or a missing one), an activation after the
    projection, the SE after the projection or left out, BN eps 1e-5, ReLU for hard-swish (and the
    reverse), the expand conv or the SE of a block that has none, a wrong depthwise padding.
    """
    return _check("bneck", student_fn, _bneck_cases(seed), verbose, _bneck_shape_hint, _explain_bneck,
                  _explain_bneck_error)


# =========================================================================== requantization

# multiplier, zero_point, relu, note; the accumulators of each case are drawn around what it is about
_REQUANTIZE_CASES = [
    (0.0123, 128, False, "typical values: a multiplier of about 1/80, zero point in the middle"),
    (0.5, 10, False, "halves: acc * M = k + 1/2 exactly, rounded to the even k"),
    (0.25, 3, False, "outputs below 0 and above 255 are clamped"),
    (0.0078125, 100, True, "fused ReLU: clamped at the zero point, not at 0"),
    (1.5e-6, 120, False, "sums beyond 2**24: float32(acc) and the float32 product decide near-halves"),
    (0.031213872, 0, True, "a depthwise layer's multiplier, zero point 0 with ReLU"),
]


def _requantize_cases(seed):
    rng = np.random.default_rng(seed)
    cases = []
    for multiplier, zero_point, relu, note in _REQUANTIZE_CASES:
        if "2**24" in note:
            acc = _float32_sensitive(rng, np.float32(multiplier), (1, 6, 3, 5))
        elif "halves" in note:
            acc = 2 * rng.integers(-300, 300, (3, 4, 5, 2)) + 1                       # odd: acc / 2 = k + 1/2
        elif "clamped" in note:
            acc = rng.integers(-2000, 2000, (2, 3, 4, 5))
        else:
            acc = rng.integers(-20000, 20000, (1, 5, 3, 7))
        acc = acc.astype(np.int64)
        m = np.float32(multiplier)
        kwargs = {"multiplier": m, "zero_point": zero_point, "relu": relu}
        expected = QK.requantize(acc, m, zero_point, relu)
        cases.append(_Case(note, [("acc", acc)], kwargs, {"multiplier": float(m), "zero_point": zero_point,
                                                          "relu": relu, "dtype": "uint8"},
                           expected, np.dtype(np.uint8), dtype_reason="quantized activations are uint8",
                           dtype_hint="Return the clamped integers as uint8: y.astype(np.uint8)."))
    return cases


def _float32_sensitive(rng, multiplier, shape):
    """Accumulators beyond 2**25 giving outputs in range, half of them right beside a half step
    ((k + 1/2) / M), where float32 arithmetic (float32(acc) * M) rounds to another integer than the
    exact product acc * M does."""
    size = int(np.prod(shape))
    k = rng.integers(50, 100, size)
    near = (np.round((k + 0.5) / np.float64(multiplier)).astype(np.int64)[:, None] + np.arange(-64, 65)).ravel()
    differ = near[np.rint(near.astype(np.float32) * multiplier) != np.rint(near * np.float64(multiplier))]
    plain = rng.integers(int(50 / multiplier), int(100 / multiplier), size)
    picked = np.concatenate([rng.permutation(differ)[:size // 2], plain])[:size]
    return (rng.permutation(picked) * rng.choice([-1, 1], size)).reshape(shape)


def _explain_requantize(case, where, got):
    acc = case.arg("acc")[where]
    m, zero_point, relu = case.kwargs["multiplier"], case.kwargs["zero_point"], case.kwargs["relu"]
    scaled = np.float32(np.float32(acc) * m)
    value = int(got[where])
    lines = [f"there acc = {int(acc)}, float32(acc) * M = {float(scaled)!r}, zero point {zero_point}"]
    in_float64 = int(np.clip(np.rint(int(acc) * np.float64(m)) + zero_point, zero_point if relu else 0, 255))
    if relu and value < zero_point:
        lines.append("likely cause: ReLU clamped at 0 (or left out); its real 0 is the zero point, "
                     f"so the output never goes below {zero_point}")
    elif value == in_float64:
        lines.append("likely cause: the product taken in float64; PyTorch multiplies in float32 "
                     "(acc.astype(np.float32) * multiplier), and that decides values this close to a half")
    elif scaled % 1 == 0.5:
        lines.append("likely cause: a half rounded up or away from zero; np.rint rounds halves to the even "
                     "integer, as PyTorch does")
    return lines


def check_requantize(student_fn, *, seed=0, verbose=True):
    """Check a student's :func:`requantize` against ``npmnv3.qkernels.requantize``: every output integer equal.

    Parameters
    ----------
    student_fn : callable
        ``student_fn(acc, multiplier=..., zero_point=..., relu=...) -> y``, as :func:`requantize`.
    seed : int
        Seed of the random accumulators (the 6 cases and their parameters do not change).
    verbose : bool
        Print the verdict.

    Returns
    -------
    result : CheckResult
        Truthy when all cases pass; otherwise describes the first failing case.

    Notes
    -----
    Cases: typical layer values; exact halves (rounding half to even); clamping at 0 and 255; a fused
    ReLU with a non-zero zero point; accumulators beyond 2**24 (float32 rounds them before the product);
    a depthwise layer's multiplier. A uint8 output is required (quantized activations are uint8).
    """
    return _check("requantize", student_fn, _requantize_cases(seed), verbose, explain=_explain_requantize)
