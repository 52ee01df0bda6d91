"""`imagerec demo`: train, evaluate and predict on the MNIST subset embedded in the package."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from imagerec.data import read_data
from imagerec.engine.run import train
from imagerec.predict import load


def run_demo(out: str = "runs/demo", epochs: int = 4) -> dict:
    """Train `cnn` on mnist-mini (6,000 train / 1,000 test digits), then predict a few test digits.

    Example:
        >>> run_demo("runs/demo", epochs=4)["test"]["accuracy"]
    """
    # The demo is a throwaway run: a second `imagerec demo` goes to runs/demo2, ... instead of
    # refusing with advice (--resume) that the demo command does not take.
    out_dir, k = Path(out), 2
    while out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        out_dir, k = Path(f"{out}{k}"), k + 1
    result = train(data="mnist-mini", out=str(out_dir), model="cnn", epochs=epochs)
    run_dir = result.run_dir

    # Write a few real test digits as PNG files and classify them like a user would.
    spec = read_data("mnist-mini")
    samples = run_dir / "samples"
    samples.mkdir(exist_ok=True)
    paths = []
    for k, it in enumerate(spec.splits["test"][:: len(spec.splits["test"]) // 8][:8]):
        p = samples / f"test{k}_true{spec.class_names[it.target]}.png"
        Image.fromarray(spec.arrays["test"][it.source.index]).save(p)
        paths.append(p)
    predictions = load(run_dir).predict(paths, top_k=3)
    right = sum(Path(r["path"]).stem.endswith(f"true{r['label']}") for r in predictions)

    test = result.metrics["test"]
    print()
    print(f"trained: {result.model_name} on mnist-mini ({result.metrics['train_images']} training images, "
          f"{result.metrics['epochs_run']} epochs, {result.metrics['train_seconds']:.0f} s)")
    print(f"test accuracy: {test['accuracy']:.2%} on {test['num_samples']} held-out digits "
          f"(macro-F1 {test['macro_f1']:.3f})")
    print(f"predicted {len(predictions)} sample PNGs in {samples}: {right}/{len(predictions)} right, e.g. "
          f"{Path(predictions[0]['path']).name} -> {predictions[0]['label']} ({predictions[0]['score']:.1%})")
    print(f"run saved in: {run_dir}")
    print(f"next: imagerec eval {run_dir}   |   imagerec predict {run_dir} {samples}")
    return result.metrics
