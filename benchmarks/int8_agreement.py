"""How far npmnv3's int8 MobileNetV3-Large is from torch's quantized model, per layer and per torch engine.

    python benchmarks/int8_agreement.py [--seeds 0,1] [--engines qnnpack,fbgemm,x86]

For each seed: a QAT state dict as saved after calibration and one in the QAT end state (observers off,
weights trained on), converted by torch under each engine; inputs 224 (batch 1) and 97x131 (batch 3).
Prints, per engine, the worst features.i (share of integers equal to torch's, largest difference), whether
every scale and zero point matched, the logits' largest difference in output steps and whether the top-5
agree. The tests assert the QNNPACK numbers; the other engines are only reported.
"""

import argparse

import numpy as np
import torch
import torchref

import npmnv3


def compare(model, torch_model, x, engine):
    ref_logits, ref_feats = torchref.quantized_features_and_logits(torch_model, x, engine)
    logits, feats = model(x, return_intermediates=True)
    rows = []
    for name, (values, scale, zero_point) in ref_feats.items():
        diff = np.abs(feats[name].values.astype(np.int16) - values.astype(np.int16))
        same_qparams = feats[name].scale == np.float32(scale) and feats[name].zero_point == zero_point
        rows.append((name, float((diff == 0).mean()), int(diff.max()), same_qparams))
    step = torch_model.classifier[3].scale
    top5 = all((np.argsort(-a)[:5] == np.argsort(-b)[:5]).all() for a, b in zip(logits, ref_logits))
    return rows, float(np.abs(logits - ref_logits).max() / step), top5


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--engines", default=",".join(e for e in ("qnnpack", "fbgemm", "x86")
                                                      if e in torch.backends.quantized.supported_engines))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for seed in map(int, args.seeds.split(",")):
        qat, _ = torchref.quantized_model(seed=seed)
        states = {"calibrated": torchref.numpy_state_dict(qat)}
        trained = torchref.end_of_training(qat, seed=seed)
        states["QAT end state"] = torchref.numpy_state_dict(trained)
        for label, state in states.items():
            model = npmnv3.quantized_mobilenet_v3_large()
            model.load_state_dict(state)
            qat_copy = torchref.prepare_qat(torchref.random_quantizable_model(seed=seed)).eval()
            qat_copy.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
            for engine in args.engines.split(","):
                torch_model = torchref.convert(qat_copy, engine)
                for n, h, w in ((1, 224, 224), (3, 97, 131)):
                    x = torchref.smooth_images(n, h, w, seed=7).numpy()
                    rows, steps, top5 = compare(model, torch_model, x, engine)
                    worst = min(rows, key=lambda r: r[1])
                    exact_layers = sum(r[1] == 1.0 for r in rows)
                    print(f"seed {seed} {label:13s} {engine:7s} {n}x{h}x{w}: {exact_layers}/{len(rows)} layers exact; "
                          f"worst {worst[0]} {100 * worst[1]:.3f}% exact, max diff {max(r[2] for r in rows)}; "
                          f"qparams {'all equal' if all(r[3] for r in rows) else 'DIFFER'}; "
                          f"logits {steps:.1f} steps; top-5 {'equal' if top5 else 'differ'}")


if __name__ == "__main__":
    main()
