"""favor-eval: AVEB task runners and metrics, AVEB converters, and the paper's ablations on synthetic data.

    metrics.py   WER, word-by-word QA with the yes/no rule, multiple-choice exact match, OCR 1/3 hits,
                 BLEU / METEOR / CIDEr (appendix B)
    aveb.py      converters from the paper's ten public test sets to our JSONL manifest
    runner.py    model over a manifest -> predictions -> per-task scores
    judge.py     optional OpenAI-compatible judge for free-form answers (off by default)
    ablation.py  train + evaluate the full model and its ablations over seeds; the results table
    cli.py       ``favor-eval`` (typer)
"""
