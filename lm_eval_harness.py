"""lm-evaluation-harness over the loaded model, scoring as GLM-130B's own evaluation does (evaluation/harness.py).

    bash scripts/lm_eval.sh --tasks hellaswag,wikitext --limit 100 --output_path results
    torchrun --nproc_per_node MP lm_eval_harness.py <model flags> --tasks ... [other lm_eval arguments]

The model flags are initialize.py's (those of generate.py and evaluate.py, including --seed and --device); every
other argument goes to lm_eval's own command line, with `--model glm130b`. Its --model_args take batch_size,
max_seq_length (window of the rolling scoring, default the model's) and generation_length (tokens newly scored per
window, default 256). Under torchrun every rank runs lm_eval: tensor-parallel ranks make the same calls, and
lm_eval shares the documents out over the data-parallel ranks; rank 0 writes the results.
"""
import os
import sys

from model.errors import UserError, main_entry


@main_entry
def main(argv=None):
    from initialize import initialize, initialize_model_and_tokenizer
    args = initialize(None, sys.argv[1:] if argv is None else argv, known_only=True)
    harness_args = args.unparsed
    if any(a == "--model" or a.startswith("--model=") for a in harness_args):
        raise UserError("--model is set here (glm130b, this model in-process); to evaluate a server use "
                        "lm_eval --model local-completions (README: lm-evaluation-harness)")
    if not any(a in ("--tasks", "-t") or a.startswith("--tasks=") for a in harness_args):
        raise UserError("no task given: pass --tasks (lm-eval task names, e.g. --tasks hellaswag,wikitext)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tokenizer = initialize_model_and_tokenizer(args)
    from evaluation.harness import MODEL_NAME, register
    register(model, tokenizer, args.max_sequence_length)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", "run", "--model", MODEL_NAME, *named(harness_args)]
    cli_evaluate()


def named(harness_args):
    """The arguments with `pretrained=glm130b` in --model_args unless they name the model: lm_eval files results
    under <output_path>/<that name>/ (else under a random name)."""
    out = list(harness_args)
    for k, arg in enumerate(out):
        if arg == "--model_args" and k + 1 < len(out):
            if "pretrained" not in out[k + 1] and not out[k + 1].lstrip().startswith("{"):
                out[k + 1] = ",".join(filter(None, [out[k + 1], "pretrained=glm130b"]))
            return out
        if arg.startswith("--model_args="):
            if "pretrained" not in arg and not arg.split("=", 1)[1].lstrip().startswith("{"):
                out[k] = arg + ",pretrained=glm130b"
            return out
    return out + ["--model_args", "pretrained=glm130b"]


if __name__ == "__main__":
    main()
